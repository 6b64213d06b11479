"""quant.base fp8: the card must have FP8 tensor cores, and the rounded base is a (slightly) different model."""

from __future__ import annotations

from onecard.lint.context import LintContext
from onecard.lint.findings import Finding

# notes/fp8.md, the pre-registered quality run (H200, 2026-12-02, bench/results/fp8_quality_2026-12-02.json):
# SmolLM2-135M, LoRA r16, 200 steps at lr 2e-5, FP8 base against bf16.
MEASURED_LOSS_GAP_PCT = 4.33     # mean training loss of steps 151-200, FP8 over bf16
MEASURED_WORST_GRAD_COSINE = 0.804  # step-0 adapter gradients, FP8 against bf16, the worst of 420 tensors
# The measurement speaks for models of its size: under this many parameters the rule warns, above it it informs
# (nothing larger is measured, so how the gap moves with size is not known here).
WARN_BELOW_PARAMS = 1_000_000_000


def fp8_base_gpu(ctx: LintContext) -> list[Finding]:
    """An FP8 base needs e4m3 tensor cores on the card the recipe is planned for (the loader refuses it elsewhere)."""
    from onecard.catalog.gpus import get_gpu
    from onecard.errors import UserError

    if ctx.recipe.quant.base != "fp8":
        return []
    try:
        gpu = get_gpu(ctx.recipe.plan.gpu)
    except UserError:
        return []
    if gpu.fp8_dense_tflops is not None:
        return []
    return [Finding("fp8-base-gpu", "error", f"quant.base fp8 on {gpu.id}, which has no FP8 tensor cores",
                    "FP8 GEMMs need compute capability 8.9+ (Ada, Hopper, Blackwell): training would be refused",
                    "set quant.base: none (bf16 base) or method: qlora, or plan for an FP8 card (plan.gpu)")]


def fp8_base_quality(ctx: LintContext) -> list[Finding]:
    """What an FP8 base is known to cost in quality, so that a long run is not the first to find out."""
    if ctx.recipe.quant.base != "fp8":
        return []
    params = ctx.inputs.shape.total_params() if ctx.inputs is not None else None
    small = params is not None and params < WARN_BELOW_PARAMS
    size = f"a {params / 1e9:.2g}B-parameter model" if params is not None else "a model of unknown size"
    return [Finding("fp8-base-quality", "warning" if small else "info",
                    f"quant.base fp8 rounds the frozen base to e4m3 (3 mantissa bits), so {size} trains as a "
                    "slightly different function",
                    f"measured on SmolLM2-135M: 200 LoRA steps ended {MEASURED_LOSS_GAP_PCT}% above the bf16 run's "
                    f"loss, step-0 adapter gradients down to cosine {MEASURED_WORST_GRAD_COSINE} (notes/fp8.md); "
                    "larger models are not measured",
                    "compare a short run's held-out loss with quant.base: none before a long one; the adapter is an "
                    "ordinary peft adapter and loads on the bf16 base either way", "quant.base")]

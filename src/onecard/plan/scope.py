"""`onecard scope`: the largest model that fits a card, per method -- computed from the memory model.

Nothing here is a table of answers: every cell is :func:`plan_memory` run over the catalog presets and over a sweep
of dense Llama-like shapes (0.5B to ~405B), so the answer moves when the memory model or the card changes.
The sweep's shapes follow Llama 3's proportions (head_dim 128, 8 KV heads, MLP 3.5x hidden, ~128 hidden units
per layer, 128k vocabulary: meta-llama/Meta-Llama-3-8B and Llama-3.1-405B configs), so a "~14B" there is a Llama-3
style 14B, not any particular released model.
"""

from __future__ import annotations

from dataclasses import dataclass

from onecard.catalog.gpus import GPU
from onecard.catalog.models import PRESETS, ModelShape
from onecard.plan.inputs import PlanInputs
from onecard.plan.memory import GIB, plan_memory


@dataclass(frozen=True)
class MethodSpec:
    key: str
    label: str
    changes: dict


METHODS = [
    MethodSpec("lora", "LoRA (bf16 base)", dict(method="lora")),
    MethodSpec("qlora", "QLoRA (NF4 base)", dict(method="qlora")),
    MethodSpec("dora", "DoRA (bf16 base)", dict(method="dora")),
    MethodSpec("full", "full SFT (bf16, AdamW)", dict(method="full", optimizer="adamw_torch_fused")),
    MethodSpec("pretrain", "continued pre-training (full, 8-bit AdamW)",
               dict(method="full", task="pretrain", optimizer="adamw_8bit")),
    MethodSpec("dpo", "DPO with LoRA (chosen+rejected)", dict(method="lora", task="dpo")),
]


def dense_shape(hidden: int) -> ModelShape:
    """A Llama-3-proportioned dense decoder with the given hidden size."""
    layers = max(8, round(hidden / 128))
    inter = int(round(3.5 * hidden / 256)) * 256
    heads = hidden // 128
    shape = ModelShape("dense", "llama", hidden, inter, layers, heads, min(8, heads), 128256,
                       head_dim=128, max_position_embeddings=131072, rope_theta=500000.0)
    return shape.with_(id=f"dense-{shape.total_params() / 1e9:.1f}b")


def dense_sweep() -> list[ModelShape]:
    return [dense_shape(h) for h in range(768, 16384 + 1, 256)]


def _base(gpu: GPU, seq_len: int, micro_batch: int, kernels: str) -> PlanInputs:
    return PlanInputs(shape=PRESETS["llama-3-8b"], gpu=gpu, seq_len=seq_len, micro_batch=micro_batch,
                      kernels=kernels, fused_ce=kernels != "none")


def largest_fitting(base: PlanInputs, shapes: list[ModelShape], monotone: bool = False, fits=None):
    """(shape, plan) of the largest shape (by parameters) that fits (``fits(plan)``, default ``plan.fits``), or
    None."""
    best = None
    for shape in sorted(shapes, key=ModelShape.total_params):
        plan = plan_memory(base.with_(shape=shape))
        if plan.fits if fits is None else fits(plan):
            best = (shape, plan)
        elif monotone and best is not None:
            break  # one family, growing: memory only grows from here
    return best


def scope_table(gpu: GPU, seq_len: int = 2048, micro_batch: int = 1, kernels: str = "onecard") -> dict:
    base = _base(gpu, seq_len, micro_batch, kernels)
    presets, sweep = list(PRESETS.values()), dense_sweep()
    rows = []
    for spec in METHODS:
        inp = base.with_(**spec.changes)
        preset = largest_fitting(inp, presets)
        dense = largest_fitting(inp, sweep, monotone=True)
        rows.append({
            "method": spec.key, "label": spec.label,
            "largest_preset": preset[0].id if preset else None,
            "largest_preset_params_b": round(preset[0].total_params() / 1e9, 2) if preset else None,
            "largest_preset_gib": round(preset[1].total_bytes / GIB, 2) if preset else None,
            "largest_dense_params_b": round(dense[0].total_params() / 1e9, 1) if dense else None,
            "largest_dense_gib": round(dense[1].total_bytes / GIB, 2) if dense else None,
            **_streamed_row(inp, presets, sweep),
        })
    return {"gpu": gpu.id, "capacity_gib": round(gpu.memory_gib, 2), "seq_len": seq_len, "micro_batch": micro_batch,
            "kernels": kernels, "rows": rows, "claims": check_claims(base), "label": "estimated"}


def _streamed_row(inp: PlanInputs, presets, sweep) -> dict:
    """The same ceilings with the base weights streamed from host memory (adapter methods of an SFT run only)."""
    from onecard.plan.streaming import fits_with_streaming

    if inp.method not in ("lora", "qlora", "dora") or inp.task != "sft":
        return {"streamed_preset": None, "streamed_dense_params_b": None}
    preset = largest_fitting(inp, presets, fits=fits_with_streaming)
    dense = largest_fitting(inp, sweep, monotone=True, fits=fits_with_streaming)
    return {"streamed_preset": preset[0].id if preset else None,
            "streamed_dense_params_b": round(dense[0].total_params() / 1e9, 1) if dense else None}


CLAIMS = [
    ("QLoRA of a 70B model", "llama-3-70b", dict(method="qlora")),
    ("LoRA of an 8B model in bf16", "llama-3-8b", dict(method="lora")),
    ("QLoRA of a 14B model", "qwen2.5-14b", dict(method="qlora")),
    ("full fine-tuning of an 8B model", "llama-3-8b", dict(method="full", optimizer="adamw_8bit")),
    ("full fine-tuning of a 1B model", "llama-3.2-1b", dict(method="full")),
]


def check_claims(base: PlanInputs) -> list[dict]:
    """Popular "X fits in Y GB" claims, checked on this card: where one fails, why (the largest component) and
    the cheapest change that makes it work."""
    from onecard.plan.suggest import suggest_fixes

    out = []
    for text, model, changes in CLAIMS:
        plan = plan_memory(base.with_(shape=PRESETS[model], **changes))
        entry = {"claim": f"{text} fits in {base.gpu.memory_gib:.0f} GB", "model": model, "fits": plan.fits,
                 "total_gib": round(plan.total_bytes / GIB, 2), "verdict": plan.verdict}
        if not plan.fits:
            entry["why"] = f"{_weights_why(plan)}; the whole plan needs {plan.total_bytes / GIB:.1f} GiB"
            fixes = suggest_fixes(plan)
            entry["would_work"] = [f"{f.change} ({f.total_bytes / GIB:.1f} GiB)" for f in fixes[:3]] or [
                "nothing in the catalog: more GPUs than 8"]
        out.append(entry)
    return out


def _weights_why(plan) -> str:
    from onecard.plan.static import nf4_linear_bytes

    p = plan.inputs
    if p.method == "qlora":
        nf4 = nf4_linear_bytes(p.shape, p.double_quant)
        rest = plan.component("weights").bytes - nf4
        return f"NF4 weights alone are {nf4 / 1e9:.1f} GB (+{rest / 1e9:.1f} GB embeddings/norms)"
    weights = plan.component("weights")
    return f"{weights.label} alone are {weights.bytes / 1e9:.1f} GB"

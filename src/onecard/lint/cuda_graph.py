"""training.cuda_graph: what a recorded step cannot hold, refused before loading (train/graphed_step.py says why)."""

from __future__ import annotations

from onecard.lint.findings import Finding

_FIELD = "training.cuda_graph"


def _refused(what: str, why: str, fix: str) -> Finding:
    return Finding("cuda-graph", "error", f"a CUDA-graph step with {what}", why, f"{fix}, or set {_FIELD}: false",
                   _FIELD)


def cuda_graph(ctx) -> list[Finding]:
    """Each way a recipe asks the recorded step to do what a CUDA graph cannot replay."""
    recipe = ctx.recipe
    t = recipe.training
    if not t.cuda_graph:
        return []
    out = []
    if recipe.task not in ("sft", "pretrain"):
        out.append(_refused(f"task {recipe.task}", "the recorded step is the token cross-entropy's (SFT, pretrain)",
                            "set task: sft"))
    if recipe.data.packing:
        out.append(_refused("data.packing", "packed rows need a mask built from the data on the host, which a "
                            "recorded step cannot redo per batch", "set data.packing: false"))
    if t.offload_activations:
        out.append(_refused("training.offload_activations", "offloaded checkpoints copy to host memory inside "
                            "the step", "set training.offload_activations: false"))
    if t.offload_weights is True or (t.offload_weights == "auto" and ctx.stream_plan is not None):
        out.append(_refused("training.offload_weights: true" if t.offload_weights is True else
                            "training.offload_weights: auto (the plan streams the base weights)",
                            "streamed weights copy from host memory inside the step",
                            "train on a card the model fits without streaming"))
    if t.kernels in ("none", "liger") or t.fused_ce is False:
        out.append(_refused(f"training.kernels {t.kernels}, fused_ce {t.fused_ce}", "the recorded loss is "
                            "onecard's fused linear cross-entropy, which divides by a token count held on the GPU",
                            "set training.kernels: onecard and training.fused_ce: auto"))
    if ctx.on_cpu:
        out.append(_refused("a CPU run", "CUDA graphs record CUDA kernels", "train on a CUDA GPU"))
    return out

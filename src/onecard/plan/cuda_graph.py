"""What a step recorded as a CUDA graph (training.cuda_graph, train/graphed_step.py) cannot hold, read from the
recipe alone: the one list that lint refuses by (lint/cuda_graph.py) and that the planner checks before it says a
graph would take the host off a host-bound step (plan/timecost.py)."""

from __future__ import annotations


def graph_refusals(recipe, streams: bool) -> list[tuple[str, str, str]]:
    """(what, why, fix) for each part of ``recipe`` a recorded step cannot replay; ``streams``: the plan streams the
    base weights (``training.offload_weights: auto`` on a card the model does not fit)."""
    t = recipe.training
    out = []
    if recipe.task not in ("sft", "pretrain"):
        out.append((f"task {recipe.task}", "the recorded step is the token cross-entropy's (SFT, pretrain)",
                    "set task: sft"))
    if recipe.data.packing:
        out.append(("data.packing", "packed rows need a mask built from the data on the host, which a recorded "
                    "step cannot redo per batch", "set data.packing: false"))
    if t.offload_activations:
        out.append(("training.offload_activations", "offloaded checkpoints copy to host memory inside the step",
                    "set training.offload_activations: false"))
    if t.offload_weights is True or (t.offload_weights == "auto" and streams):
        out.append(("training.offload_weights: true" if t.offload_weights is True else
                    "training.offload_weights: auto (the plan streams the base weights)",
                    "streamed weights copy from host memory inside the step",
                    "train on a card the model fits without streaming"))
    if t.kernels in ("none", "liger") or t.fused_ce is False:
        out.append((f"training.kernels {t.kernels}, fused_ce {t.fused_ce}", "the recorded loss is onecard's fused "
                    "linear cross-entropy, which divides by a token count held on the GPU",
                    "set training.kernels: onecard and training.fused_ce: auto"))
    return out

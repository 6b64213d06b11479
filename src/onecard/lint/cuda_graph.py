"""training.cuda_graph: what a recorded step cannot hold, refused before loading (train/graphed_step.py says why)."""

from __future__ import annotations

from onecard.lint.findings import Finding
from onecard.plan.cuda_graph import graph_refusals

_FIELD = "training.cuda_graph"


def _refused(what: str, why: str, fix: str) -> Finding:
    return Finding("cuda-graph", "error", f"a CUDA-graph step with {what}", why, f"{fix}, or set {_FIELD}: false",
                   _FIELD)


def cuda_graph(ctx) -> list[Finding]:
    """Each way a recipe asks the recorded step to do what a CUDA graph cannot replay (plan/cuda_graph.py), and a
    CPU run."""
    if not ctx.recipe.training.cuda_graph:
        return []
    refusals = graph_refusals(ctx.recipe, streams=ctx.stream_plan is not None)
    if ctx.on_cpu:
        refusals.append(("a CPU run", "CUDA graphs record CUDA kernels", "train on a CUDA GPU"))
    return [_refused(*r) for r in refusals]

"""``training.offload_weights`` at train time: decide from the plan, check host RAM, switch streaming on.

The decision is the planner's (plan/streaming.py) for the GPU actually present: ``auto`` streams only when the
plan does not fit the card otherwise, ``true`` streams the layers the planner does not keep resident, ``false``
never streams. On the CPU it is a no-op (there is no device memory to save) and says so when asked for.
Host RAM is read with psutil before anything loads; a run whose pinned bytes cannot fit is refused.

Known gap: the base is loaded onto the card before its layers are streamed (train/model.py loads whole), so a
base whose weights alone exceed the card cannot be trained yet: refused here with that reason rather than left
to an out-of-memory error. The bench builds such shapes layer by layer (bench/build.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from onecard.errors import UserError
from onecard.recipe import Recipe


@dataclass
class StreamDecision:
    stream: bool
    resident_layers: int = 0
    message: str = ""
    plan: object = None  # plan.streaming.StreamPlan


def _gpu_id(recipe: Recipe) -> str:
    import torch

    from onecard.catalog.gpus import match_device_name

    gpu = match_device_name(torch.cuda.get_device_name())
    return gpu.id if gpu is not None else recipe.plan.gpu


def decide(recipe: Recipe, device: str) -> StreamDecision:
    """Whether and how to stream; raises UserError when streaming is needed and cannot work here."""
    choice = recipe.training.offload_weights
    if choice is False:
        return StreamDecision(False)
    if not device.startswith("cuda"):
        msg = "training.offload_weights: true is a no-op on the CPU (no GPU memory to save)" if choice is True else ""
        return StreamDecision(False, message=msg)
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import GIB, plan_memory
    from onecard.plan.streaming import host_ram_check, plan_streaming

    mem = plan_memory(inputs_from_recipe(recipe, gpu=_gpu_id(recipe)))
    if choice == "auto" and mem.fits:
        return StreamDecision(False)
    sp = plan_streaming(mem, host_ram_gib=recipe.plan.host_ram_gib)
    if sp.streamed_layers == 0:
        return StreamDecision(False, message="training.offload_weights: every layer fits on the card: nothing streamed")
    if sp.verdict != "fits with streaming":
        raise UserError(f"the plan does not fit even with streamed weights ({sp.device_bytes / GIB:.1f} GiB on the "
                        "card)", where="training.offload_weights", fix="onecard plan RECIPE shows what else to change")
    _check_host_ram(sp, host_ram_check)
    return StreamDecision(True, sp.resident_layers, f"streaming the base weights of {sp.streamed_layers} layers "
                          f"from {sp.host_weight_bytes / GIB:.1f} GiB of pinned host memory "
                          f"({sp.resident_layers} resident, {sp.slots} slots)", sp)


def _check_host_ram(sp, host_ram_check) -> None:
    import psutil

    problem = host_ram_check(sp.host_total_bytes, psutil.virtual_memory().available)
    if problem:
        raise UserError(problem, where="training.offload_weights",
                        fix="free host memory, use a machine with more RAM, or a smaller model / QLoRA")


def refuse_unloadable(recipe: Recipe, decision: StreamDecision, device: str) -> None:
    """Before loading: the loader puts the whole base on the card first (module docstring)."""
    if not decision.stream:
        return
    import torch

    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import GIB, plan_memory

    weights = plan_memory(inputs_from_recipe(recipe, gpu=_gpu_id(recipe))).component("weights").bytes
    free = torch.cuda.mem_get_info()[0]
    if weights > free:
        raise UserError(f"the base weights ({weights / GIB:.1f} GiB) are loaded onto the card before they are "
                        f"streamed, and only {free / GIB:.1f} GiB are free", where="training.offload_weights",
                        fix="onecard bench --offload-weights measures this shape (built layer by layer); a "
                        "layer-wise loader for onecard train is not there yet")


def start_streaming(model, decision: StreamDecision, device: str, console=None):
    """After the adapters and checkpointing are set up: the WeightStream (revert() undoes it), or None."""
    if decision.message and console is not None:
        console.print(f"[cyan]{decision.message}[/cyan]")
    if not decision.stream:
        return None
    from onecard.patch.stream_weights import apply_weight_streaming

    return apply_weight_streaming(model, device, resident=decision.resident_layers)

"""``training.offload_weights`` at train time: decide from the plan, check host RAM, switch streaming on.

The decision is the planner's (plan/streaming.py) for the GPU actually present: ``auto`` streams only when the
plan does not fit the card otherwise, ``true`` streams the layers the planner does not keep resident, ``false``
never streams. On the CPU it is a no-op (there is no device memory to save) and says so when asked for.
Host RAM is read with psutil before anything loads; a run whose pinned bytes cannot fit is refused.

A base that streams is read layer by layer (train/layerwise.py), its streamed layers parked in pinned host memory
as they are read, so it never has to fit the card whole: Llama 3 70B in NF4 loads onto a 24 GB card.
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
    park_layers: tuple[int, ...] = ()  # the streamed layers, which the loader parks in host memory as it reads them

    def summary(self) -> dict:
        """What summary.json records of it (and plans the run's plan-vs-measured with)."""
        return {"streamed_weights_resident_layers": self.resident_layers} if self.stream else {}


def _gpu_id(recipe: Recipe) -> str:
    import torch

    from onecard.catalog.gpus import match_device_name

    gpu = match_device_name(torch.cuda.get_device_name())
    return gpu.id if gpu is not None else recipe.plan.gpu


def card_inputs(recipe: Recipe):
    """The plan's inputs for the GPU present, at the size ``--memory-cap-gib`` emulates if given."""
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.train.memory_cap import memory_cap_gib

    return inputs_from_recipe(recipe, gpu=_gpu_id(recipe)).capped(memory_cap_gib())


def decide(recipe: Recipe, device: str) -> StreamDecision:
    """Whether and how to stream; raises UserError when streaming is needed and cannot work here."""
    choice = recipe.training.offload_weights
    if choice is False:
        return StreamDecision(False)
    if not device.startswith("cuda"):
        msg = "training.offload_weights: true is a no-op on the CPU (no GPU memory to save)" if choice is True else ""
        return StreamDecision(False, message=msg)
    from onecard.plan.memory import GIB, plan_memory
    from onecard.plan.streaming import host_ram_check, plan_streaming

    mem = plan_memory(card_inputs(recipe))
    if choice == "auto" and mem.fits:
        return StreamDecision(False)
    sp = plan_streaming(mem, host_ram_gib=recipe.plan.host_ram_gib)
    if sp.streamed_layers == 0:
        return StreamDecision(False, message="training.offload_weights: every layer fits on the card: nothing streamed")
    if recipe.training.uncheckpointed_layers:  # a streamed layer must be checkpointed (patch/stream_weights.py)
        raise UserError(f"the plan needs streamed base weights ({sp.streamed_layers} layers), and streamed layers must "
                        "be checkpointed, but training.uncheckpointed_layers is "
                        f"{recipe.training.uncheckpointed_layers}", where="training.uncheckpointed_layers",
                        fix="set it to 0 (or lower what else the plan holds: onecard plan RECIPE)")
    if sp.verdict != "fits with streaming":
        raise UserError(f"the plan does not fit even with streamed weights ({sp.device_bytes / GIB:.1f} GiB on the "
                        "card)", where="training.offload_weights", fix="onecard plan RECIPE shows what else to change")
    _check_host_ram(sp, host_ram_check)
    from onecard.patch.stream_weights import streamed_layer_ids

    park = tuple(streamed_layer_ids(sp.resident_layers + sp.streamed_layers, sp.resident_layers))
    return StreamDecision(True, sp.resident_layers, f"streaming the base weights of {sp.streamed_layers} layers "
                          f"from {sp.host_weight_bytes / GIB:.1f} GiB of pinned host memory "
                          f"({sp.resident_layers} resident, {sp.slots} slots)", sp, park)


def _check_host_ram(sp, host_ram_check) -> None:
    import psutil

    problem = host_ram_check(sp.host_total_bytes, psutil.virtual_memory().available)
    if problem:
        raise UserError(problem, where="training.offload_weights",
                        fix="free host memory, use a machine with more RAM, or a smaller model / QLoRA")


def start_streaming(model, decision: StreamDecision, device: str, console=None):
    """After the adapters and checkpointing are set up: the WeightStream (revert() undoes it), or None."""
    if decision.message and console is not None:
        console.print(f"[cyan]{decision.message}[/cyan]")
    if not decision.stream:
        return None
    from onecard.patch.stream_weights import apply_weight_streaming

    return apply_weight_streaming(model, device, resident=decision.resident_layers)

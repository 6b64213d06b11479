"""The SFT / continued pre-training recipe: seed -> model -> kernels -> data -> optimizer -> loop -> save -> eval.

What SFT supplies to the spine (train/spine.py) is its step (train/sft_step.py), or with training.cuda_graph that
step replayed from a CUDA graph (train/graphed_sft.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from onecard.errors import UserError
from onecard.recipe import Recipe
from onecard.train.sft_step import SFTStep
from onecard.train.spine import Schedule, lint_or_stop, run_steps, seed_everything, start_run


def train_sft_model(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False):
    """(model, tokenizer, summary) of one SFT/pretrain run on one device."""
    from onecard.data import build_dataset, pad_token_id
    from onecard.train.checkpoint import check_resume_world
    from onecard.train.model import load_model_and_tokenizer, resolve_device
    from onecard.train.preflight import say_before_training
    from onecard.train.rundir import check_run_dir
    from onecard.train.summary import evaluate_and_save, finish, reset_peak_after_setup

    run_dir = recipe.run_dir
    check_run_dir(run_dir, resume, overwrite)
    if resume:
        check_resume_world(run_dir, 1)  # a checkpoint written by N processes resumes on N
    device = resolve_device(None)
    lint_or_stop(recipe, console, device=device)
    from onecard.train import stream_setup
    from onecard.train.memory_cap import apply_requested_cap

    seed_everything(recipe.training.seed, recipe.training.deterministic)  # before CUDA starts: cuBLAS's config
    apply_requested_cap(device, console)  # --memory-cap-gib: before anything is allocated on the card
    streaming = stream_setup.decide(recipe, device)  # training.offload_weights; host RAM checked before loading
    model, tokenizer = load_model_and_tokenizer(recipe, device, streaming.park_layers)
    kernels = apply_recipe_kernels(model, recipe, device, console)
    dataset = build_dataset(recipe, tokenizer, split="train")
    schedule = Schedule.from_recipe(recipe, len(dataset.examples))
    say_before_training(recipe, schedule, dataset.stats, console)  # the schedule, truncated and dropped lines
    stream_setup.start_streaming(model, streaming, device, console)  # before the optimizer: adapters on the GPU
    optimizer, state = start_run(model, recipe, device, resume, overwrite, console)
    started = state.global_step
    setup = reset_peak_after_setup(device)
    varlen_before, split_before = kernels.varlen_calls(), kernels.split_checkpoint_calls()
    step = sft_step_class(recipe, streaming.stream, kernels.fused_loss)(
        model, optimizer, recipe, device, dataset, pad_token_id(tokenizer), kernels.fused_loss, tokenizer)
    state, timing = run_steps(step, schedule, state, console)
    ran = {"kernels_patched": kernels.patched(), "varlen_attention_calls": kernels.varlen_calls() - varlen_before,
           "split_checkpoint_calls": kernels.split_checkpoint_calls() - split_before}
    kernels.revert()  # the saved adapter/model and any later eval see plain transformers modules
    summary = finish(run_dir, recipe, model, tokenizer, state, timing, dataset, device, started,
                     extra={"kernels": kernels.name, **ran, **setup, "data_summary": dataset.summary,
                            **streaming.summary()})
    if recipe.eval.at_end and recipe.has_eval_data:
        summary["eval"] = evaluate_and_save(model, tokenizer, recipe, summary)
    model.eval()
    return model, tokenizer, summary


# --------------------------------------------------------------------------- kernels


@dataclass
class AppliedKernels:
    name: str          # what ran: "onecard", "liger" or "none"
    fused_loss: bool   # the causal-LM forward returns the fused linear-CE loss (no full logits)
    handle: Any = None

    def revert(self) -> None:
        if self.handle is not None:
            self.handle.revert()

    def patched(self) -> dict[str, int]:
        """What the kernels replaced, module kind -> count (empty after revert)."""
        return dict(self.handle.patched) if self.handle is not None else {}

    def varlen_calls(self) -> int:
        """Attention calls so far that packed rows sent through varlen_attn (onecard's attention only)."""
        if self.name != "onecard":
            return 0
        from onecard.patch import packed

        return packed.varlen_calls

    def split_checkpoint_calls(self) -> int:
        """Offloaded checkpoints taken as two half-layers so far (patch/blocks.py)."""
        from onecard.patch import blocks

        return blocks.CALLS["split"]


def device_kernels(recipe: Recipe, device: str) -> str:
    """The kernels to try on this device: ``auto`` means onecard's on CUDA and plain transformers elsewhere
    (onecard.patch then says in one line when the model's family has none)."""
    choice = recipe.training.kernels
    if choice == "auto":
        return "onecard" if device.startswith("cuda") else "none"
    return choice


def apply_recipe_kernels(model, recipe: Recipe, device: str, console=None) -> AppliedKernels:
    """Patch the model instance with the recipe's kernels (onecard.patch); ``fused_ce`` can turn the loss off."""
    name = device_kernels(recipe, device)
    if name == "none":
        return AppliedKernels("none", False)
    from onecard.patch import apply_kernels

    fused_ce = recipe.training.fused_ce
    handle = apply_kernels(model, name, fused_loss=fused_ce in ("auto", True))
    if handle.notice and console is not None:
        console.print(f"[yellow]{handle.notice}[/yellow]")
    return AppliedKernels(name if handle.active else "none", "fused_linear_ce" in handle.patched, handle)


# --------------------------------------------------------------------------- the step


def sft_step_class(recipe: Recipe, streaming: bool, fused_loss: bool) -> type:
    """SFTStep, or with training.cuda_graph the recorded one. What lint cannot check from the recipe alone
    (lint/cuda_graph.py) is decided here at run time: whether weights stream (offload_weights: auto) and whether
    the fused loss applied."""
    if not recipe.training.cuda_graph:
        return SFTStep
    where, fix = "training.cuda_graph", "set training.cuda_graph: false"
    if streaming:
        raise UserError("the base weights stream from host memory (offload_weights: auto chose it), which a CUDA "
                        "graph cannot record", where=where, fix=f"{fix}, or use a card the model fits")
    if not fused_loss:
        raise UserError("onecard's fused linear cross-entropy did not apply to this model, and the recorded step "
                        "needs it (it divides by a token count held on the GPU)", where=where, fix=fix)
    from onecard.train.graphed_sft import GraphedSFTStep

    return GraphedSFTStep

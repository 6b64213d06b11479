"""The SFT / continued pre-training recipe: seed -> model -> kernels -> data -> optimizer -> loop -> save -> eval.

What SFT supplies to the spine (train/spine.py) is its step: the token cross-entropy of one accumulation window,
summed and divided by the window's count of trained tokens (the fused linear-CE kernel computes the same without
materialising the logits), and the held-out eval between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onecard.errors import UserError
from onecard.recipe import Recipe
from onecard.train.spine import Schedule, Step, lint_or_stop, run_steps, seed_everything, start_run


def train_sft_model(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False):
    """(model, tokenizer, summary) of one SFT/pretrain run on one device."""
    from onecard.data import build_dataset, pad_token_id
    from onecard.train.checkpoint import check_resume_world
    from onecard.train.model import load_model_and_tokenizer, resolve_device
    from onecard.train.preflight import say_before_training
    from onecard.train.rundir import check_run_dir
    from onecard.train.summary import evaluate_and_save, finish, has_eval_data, reset_peak_after_setup

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
    if recipe.eval.at_end and has_eval_data(recipe):
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
    """SFTStep, or with training.cuda_graph the recorded one; what lint checks from the recipe alone (lint/cuda_graph.py)
    is decided here at run time: whether weights stream (offload_weights: auto) and whether the fused loss applied."""
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


def token_ce_sum(logits, labels):
    """Summed next-token cross-entropy over trained positions (labels -100 are skipped), and their count."""
    import torch.nn.functional as F

    # Shift the labels, not the logits: logits[:, :-1] is a strided view, so its fp32 upcast and reshape
    # would hold one more batch x seq x vocab block; an fp32 upcast of contiguous logits reshapes as a view.
    shift_labels = F.pad(labels.to(logits.device), (0, 1), value=-100)[:, 1:]
    flat_logits = logits.float().reshape(-1, logits.size(-1))
    loss_sum = F.cross_entropy(flat_logits, shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss_sum, int((shift_labels != -100).sum())


def trained_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def micro_batch_loss(model, batch, device: str, fused_items: float | None, objective) -> float:
    """Forward and backward of ``objective(loss)`` for one micro-batch; returns its summed token cross-entropy.

    ``fused_items`` set: the patched model returns summed CE / ``num_items_in_batch`` itself (fused linear-CE, no
    full logits), and ``objective`` gets that. Otherwise it gets the summed CE of the logits. Inputs come from
    ``onecard.data.model_inputs``: packed rows go without the 2-D mask so that transformers keeps packed examples
    apart.
    """
    from onecard.data import model_inputs

    inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in model_inputs(batch).items()}
    inputs.setdefault("use_cache", False)
    if fused_items is not None:
        loss = model(**inputs, labels=batch["labels"].to(device), num_items_in_batch=fused_items).loss
        objective(loss).backward()
        return float(loss.detach()) * fused_items
    logits = model(**inputs).logits
    loss_sum, _ = token_ce_sum(logits, batch["labels"])
    del logits  # not kept alive through backward (notes/bench.md: ~3.9 GiB at Llama 3 8B, b8, seq 2048)
    objective(loss_sum).backward()
    return float(loss_sum.detach())


def accumulate_gradients(model, micro_batches: list[dict[str, Any]], device: str,
                         fused_loss: bool = False) -> tuple[float, int]:
    """Backward over one accumulation window, each micro-batch's summed loss divided by the window's token count.

    Returns (window loss = summed CE / trained tokens, trained tokens). The gradient equals that of one
    big batch holding every example of the window, whatever the micro-batch split.
    """
    window_tokens = max(1, sum(trained_tokens(b) for b in micro_batches))
    if fused_loss:  # the model already divides by num_items_in_batch = the window's token count
        fused_items, objective = window_tokens, (lambda loss: loss)
    else:
        fused_items, objective = None, (lambda loss_sum: loss_sum / window_tokens)
    total = sum(micro_batch_loss(model, batch, device, fused_items, objective) for batch in micro_batches)
    return total / window_tokens, window_tokens


class SFTStep(Step):
    def __init__(self, model, optimizer, recipe: Recipe, device: str, dataset, pad_id: int, fused_loss: bool,
                 tokenizer):
        super().__init__(model, optimizer, recipe, device)
        self.dataset, self.pad_id, self.fused_loss, self.tokenizer = dataset, pad_id, fused_loss, tokenizer

    def backward(self, window: list[list[int]]) -> dict[str, Any]:
        from onecard.data import collate

        micro = [collate([self.dataset.examples[i] for i in idx], self.pad_id) for idx in window]
        loss, n_trained = accumulate_gradients(self.model, micro, self.device, self.fused_loss)
        n_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        return {"loss": loss, "tokens": n_tokens, "trained_tokens": n_trained}

    def after_step(self, step: int, logger) -> None:
        from onecard.train.summary import eval_if_due

        eval_if_due(self.model, self.tokenizer, self.recipe, step, logger)

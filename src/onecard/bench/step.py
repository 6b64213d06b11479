"""Timed optimizer steps on random tokens, and the memory they took.

A step is the real thing: forward with labels (the loss), backward, optimizer step, zero_grad -- no shortcuts, so
peak memory includes gradients, optimizer state and the logits. Warm-up steps run first and are not timed (the
first step allocates AdamW state, and cuBLAS/SDPA pick their kernels); peak memory covers warm-up and timed steps.
"""

from __future__ import annotations

import time
from typing import Any

GIB = 2**30


def random_batch(vocab_size: int, micro_batch: int, seq: int, device: str, seed: int = 0) -> dict[str, Any]:
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab_size, (micro_batch, seq), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


def build_optimizer(model, device: str, lr: float = 1e-5):
    """The training spine's parameter groups in torch's AdamW (fused on CUDA)."""
    import torch

    from onecard.train.optim import param_groups

    groups = param_groups(model, 0.0)
    return torch.optim.AdamW(groups, lr=lr, fused=True if device.startswith("cuda") else None)


def train_step(model, optimizer, batch, loss_path: str = "hf") -> float:
    """One optimizer step. ``loss_path``: "hf" = ``model(labels=...)`` (transformers' loss, or a patched fused
    loss); "spine" = logits then ``onecard.train.sft_step.token_ce_sum`` / token count, as ``onecard train`` does."""
    if loss_path == "spine":
        from onecard.train.sft_step import token_ce_sum

        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        loss_sum, n_tokens = token_ce_sum(logits, batch["labels"])
        loss = loss_sum / max(n_tokens, 1)
        del logits
    else:
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def graphed_train_step(graphed, optimizer, batch) -> float:
    """One optimizer step whose forward and backward replay a CUDA graph (train/graphed_step.py): gradients are
    zeroed in place, since the graph adds into the tensors it was recorded with."""
    loss = graphed.step(batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return float(loss)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(model, batch, *, steps: int, warmup: int, device: str, loss_path: str = "hf",
                cuda_graph: bool = False) -> dict[str, Any]:
    """Run ``warmup`` then ``steps`` optimizer steps; seconds per timed step, loss, peak memory. ``cuda_graph``:
    forward and backward recorded once and replayed (the recording's warm-up passes come first, untimed)."""
    from onecard.train.host_gc import freeze_startup_objects, unfreeze

    optimizer = build_optimizer(model, device)
    losses, times = [], []
    freeze_startup_objects()  # as the training spine's loop does
    try:
        if cuda_graph:
            from onecard.train.graphed_step import capture

            graphed = capture(model, batch)
            one_step = lambda: graphed_train_step(graphed, optimizer, batch)  # noqa: E731
        else:
            one_step = lambda: train_step(model, optimizer, batch, loss_path)  # noqa: E731
        for _ in range(warmup):
            losses.append(one_step())
        _sync(device)
        for _ in range(steps):
            start = time.perf_counter()
            losses.append(one_step())  # float() syncs: the step is finished
            _sync(device)
            times.append(time.perf_counter() - start)
    finally:
        unfreeze()
    tokens = batch["input_ids"].numel()
    s_per_step = sum(times) / len(times)
    result = {"s_per_step": s_per_step, "step_s_min": min(times), "step_s_max": max(times),
              "tokens_per_s": tokens / s_per_step, "loss_first": losses[0], "loss_last": losses[-1]}
    result.update(peak_memory(device))
    del optimizer
    return result


def peak_memory(device: str) -> dict[str, Any]:
    import torch

    if not device.startswith("cuda"):
        import resource

        return {"peak_allocated_gib": None, "peak_reserved_gib": None,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}


def free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # Pinned host blocks (streamed weights, offloaded checkpoints) stay in torch's host cache after they are
        # freed, rounded up to powers of two: a probe's next micro-batch asks for other sizes, so without this the
        # cache grows by every candidate's pinned bytes until the host runs out.
        empty_host_cache()


def empty_host_cache() -> None:
    """Return torch's cached pinned host blocks to the OS: public as torch.accelerator.empty_host_cache from
    torch 2.13; torch 2.11 (the GPU machine's) has only the private binding behind it."""
    import torch

    release = getattr(torch.accelerator, "empty_host_cache", None) or torch._C._host_emptyCache
    release()

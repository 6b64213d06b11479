"""One micro-batch's forward and backward, recorded once as a CUDA graph and replayed each step.

Why: at a small micro-batch an FP8 base leaves the GPU so little work per kernel that the step's speed is the
speed of the Python thread queuing ~10^4 kernels (Qwen 2.5 14B, micro-batch 2: 0.43-0.85 s of host time against a
GPU that is done as soon as the last kernel is queued; docs/kernels.md). A CUDA graph records those kernels once and
replays them with one launch, so the host's speed drops out of the step.

How: torch.cuda.graph, as PyTorch's "whole-network capture" recipe does it (torch.cuda.graphs, CUDA semantics
notes), for the forward with labels and ``loss.backward()``; the optimizer step stays eager. Before capture a few
eager forward/backward passes run on a side stream (cuBLAS/cuBLASLt handles and workspaces, Triton compilation,
autograd's device thread), then every trainable parameter gets a zero gradient, so the captured backward adds into
``.grad`` in place: the gradients keep their addresses, a replay accumulates into them as eager backward would
(micro-batches of a window are more replays), and ``zero_grad`` must zero in place (``set_to_none=False``).
Checkpoint recomputes, onecard's fused kernels and the adapter copies are kernels like any other and are replayed.
Memory: the capture allocates from a private pool whose freed blocks later allocations of the same capture reuse,
so the pool holds about the eager step's peak, once.

The trap: whatever the captured code decided on the host is frozen into the graph -- shapes, Python scalars,
which branch ran, tensors created once. So one graph serves one batch shape: a batch of another shape is refused,
not replayed; the inputs are copied into the graph's own tensors, never swapped. Code that looks at the data on the
host cannot be recorded, and a capture that fails leaves torch's CUDA state unusable for the rest of the process.
So one warm-up pass runs with host syncs raising (torch.cuda.set_sync_debug_mode), which refuses such a step before
any capture and names the file and line. The batch is input_ids and labels only, each row one whole causal
sequence, and the step runs under patch/unmasked_causal.py: transformers then builds no attention mask (a capture
would otherwise get the dense S x S one, transformers being unable to look at the data while recording), sdpa takes
its flash kernel through ``is_causal``, and onecard's packed-row check, which needs a mask, has nothing to read.
Offloaded checkpoints and streamed weights copy to and from the host inside the step, and are refused by the
callers.
"""

from __future__ import annotations

import os
import traceback

import torch

WARMUP_PASSES = 3  # PyTorch's recipe warms up on a side stream; three passes also cover the recompute's first use
SYNC_CHECK_PASS = 1  # the warm-up pass run with host syncs raising: after the first (compilation, autotuning)


class GraphCaptureError(RuntimeError):
    """The step could not be recorded as a CUDA graph (a host sync or another uncapturable operation inside)."""


class GraphedStep:
    """``step(batch)`` copies ``batch`` into the graph's input tensors, replays forward and backward, and returns the
    loss (a fresh tensor: the graph's own output is overwritten by the next replay)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], loss: torch.Tensor):
        self.graph, self.inputs, self.loss = graph, inputs, loss

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if set(batch) != set(self.inputs):
            raise ValueError(f"the CUDA graph was recorded for a batch of {sorted(self.inputs)}, got {sorted(batch)}")
        for key, static in self.inputs.items():
            value = batch[key]
            if value.shape != static.shape:
                raise ValueError(f"the CUDA graph was recorded for {key} of shape {tuple(static.shape)}, "
                                 f"got {tuple(value.shape)}: one graph serves one batch shape")
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.loss.detach().clone()


def _forward_backward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = model(**inputs, use_cache=False).loss
    loss.backward()
    return loss


def _zero_grads_in_place(model) -> None:
    for param in model.parameters():
        if param.requires_grad:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            else:
                param.grad.zero_()


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame outside torch: the code that asked for the sync."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    frame = frames[-1] if frames else traceback.extract_tb(exc.__traceback__)[-1]
    return f"{frame.filename}:{frame.lineno}"


def _warm_up(model, inputs: dict[str, torch.Tensor]) -> None:
    """Eager passes on a side stream; one of them with every host sync raising, so that a step a graph cannot
    record is refused here, before a capture whose failure would leave torch's CUDA state unusable (its RNG still
    expecting the capture, the graph's memory pool still reserved)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(WARMUP_PASSES):
            if i != SYNC_CHECK_PASS:
                _forward_backward(model, inputs)
                continue
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                _forward_backward(model, inputs)
            except RuntimeError as exc:
                if "synchroniz" not in str(exc):
                    raise
                raise GraphCaptureError(f"the step waits for the GPU on the host at {_where(exc)}, which a CUDA "
                                        "graph cannot record") from exc
            finally:
                torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.current_stream().wait_stream(side)


def capture(model, batch: dict[str, torch.Tensor]) -> GraphedStep:
    """Record ``model(**batch).loss.backward()`` (``batch`` holds input_ids and labels on the GPU) as a CUDA graph.
    The warm-up passes' gradients are zeroed: after this every trainable parameter has a zero ``.grad``."""
    if not batch["input_ids"].is_cuda:
        raise GraphCaptureError("a CUDA graph needs the model and batch on a CUDA GPU")
    from onecard.patch import unmasked_causal

    reason = unmasked_causal.refusal(model, batch)
    if reason:
        raise GraphCaptureError(reason)
    inputs = {key: value.clone() for key, value in batch.items()}
    with unmasked_causal.causal_rows_without_mask(model, inputs):
        _warm_up(model, inputs)
        _zero_grads_in_place(model)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's cached blocks go back before the graph's pool takes its own
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                loss = _forward_backward(model, inputs)
        except Exception as exc:  # noqa: BLE001 -- re-raised with its cause named; capture failures are RuntimeErrors
            raise GraphCaptureError(f"the step could not be recorded as a CUDA graph: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:300]}") from exc
    return GraphedStep(graph, inputs, loss)  # capture queued the kernels without running them: the grads are zero

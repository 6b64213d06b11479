"""A training step's forward and backward replayed from a CUDA graph (train/graphed_step.py): the same losses and
weights as eager steps, gradients that accumulate over replays, and loud refusals where a graph cannot serve."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _kernel_env  # noqa: E402,F401

from onecard.errors import UserError  # noqa: E402
from onecard.train import graphed_step  # noqa: E402

class _CountingGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def test_a_batch_of_another_shape_is_refused_not_replayed():
    graph = _CountingGraph()
    inputs = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 8, dtype=torch.long)}
    step = graphed_step.GraphedStep(graph, inputs, torch.tensor(1.5))
    batch = {"input_ids": torch.arange(16).view(2, 8), "labels": torch.arange(16).view(2, 8)}
    assert float(step.step(batch)) == 1.5 and graph.replays == 1
    assert torch.equal(inputs["input_ids"], batch["input_ids"])  # copied into the graph's own tensors
    with pytest.raises(ValueError, match=r"recorded for input_ids of shape \(2, 8\), got \(2, 7\)"):
        step.step({"input_ids": torch.zeros(2, 7, dtype=torch.long), "labels": torch.zeros(2, 7, dtype=torch.long)})
    assert graph.replays == 1


def test_capture_refuses_a_cpu_batch():
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(graphed_step.GraphCaptureError, match="CUDA GPU"):
        graphed_step.capture(torch.nn.Linear(2, 2), batch)


@pytest.mark.parametrize("fields, where", [({"offload_activations": True}, "--cuda-graph"),
                                           ({"offload_weights": True}, "--cuda-graph"),
                                           ({"kernels": "none"}, "--cuda-graph")])
def test_bench_refuses_a_graph_where_it_cannot_serve(fields, where):
    from onecard.bench.config import BenchConfig

    with pytest.raises(UserError) as err:
        BenchConfig(**{"model": "tiny", "kernels": "onecard", "cuda_graph": True, **fields})
    assert err.value.where == where


def test_bench_row_names_the_graph():
    from onecard.bench.config import BenchConfig

    cfg = BenchConfig(model="tiny", kernels="onecard", cuda_graph=True)
    assert cfg.label().endswith(" cuda-graph") and "--cuda-graph" in cfg.command()
    assert "cuda-graph" not in BenchConfig(model="tiny", kernels="onecard").label()


def _cuda_model(fp8: bool):
    from _kernel_env import tiny_cuda_lora
    from onecard.patch import apply_kernels

    model = tiny_cuda_lora(fp8)
    model.train()
    apply_kernels(model, "onecard")
    return model


def _needs_cuda(fp8: bool) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores")


def _trained(model, batches, graphed: bool):
    from onecard.bench.step import build_optimizer, graphed_train_step, train_step

    optimizer = build_optimizer(model, "cuda", lr=1e-3)
    if graphed:
        step = graphed_step.capture(model, batches[0])
        losses = [graphed_train_step(step, optimizer, b) for b in batches]
    else:
        losses = [train_step(model, optimizer, b) for b in batches]
    weights = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, weights


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_graphed_steps_train_as_eager_steps_do(fp8):
    """Four optimizer steps on four different batches, replayed against eager: every loss and every adapter weight
    within 1e-3 relative (cuBLAS may split sums differently; a stale input, a missed zeroing or a doubled
    gradient is off by far more)."""
    _needs_cuda(fp8)
    from _kernel_env import rel_err

    batches = [{"input_ids": ids, "labels": ids.clone()} for ids in
               (torch.randint(0, 320, (2, 256), generator=torch.Generator().manual_seed(i)).cuda() for i in range(4))]
    got_losses, got = _trained(_cuda_model(fp8), batches, graphed=True)
    want_losses, want = _trained(_cuda_model(fp8), batches, graphed=False)
    assert got_losses == pytest.approx(want_losses, rel=1e-3)
    assert len(set(round(x, 4) for x in got_losses)) == 4  # each replay read its own batch
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-3, name


@pytest.mark.gpu
def test_gpu_replays_accumulate_gradients():
    _needs_cuda(False)
    model = _cuda_model(False)
    ids = torch.randint(0, 320, (2, 128), generator=torch.Generator().manual_seed(0)).cuda()
    step = graphed_step.capture(model, {"input_ids": ids, "labels": ids.clone()})
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and not p.grad.any() for p in params)
    step.step({"input_ids": ids, "labels": ids})
    once = [p.grad.clone() for p in params]
    step.step({"input_ids": ids, "labels": ids})
    for p, g in zip(params, once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
def test_gpu_a_host_sync_in_the_step_fails_the_capture_by_name():
    _needs_cuda(False)
    model = _cuda_model(False)
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: float(out.sum()) and None)
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with pytest.raises(graphed_step.GraphCaptureError, match=r"waits for the GPU on the host at .*test_graphed_step"):
        graphed_step.capture(model, {"input_ids": ids, "labels": ids.clone()})
    # refused before any capture: the process's CUDA state is still usable
    assert graphed_step.capture(_cuda_model(False), {"input_ids": ids, "labels": ids.clone()}) is not None

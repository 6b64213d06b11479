"""Several GPUs, through accelerate: the strategy, one rank's view of the job, per-rank data, global token counts.

The processes are started by train/launch.py (torchrun, on one node or several) or by the user's own launcher;
each wraps its model in an ``accelerate.Accelerator`` -- DDP when the model fits one card, FSDP2 (``fully_shard``)
when it does not (or for full fine-tuning). The FSDP settings live here, in Python, passed to ``Accelerator(fsdp_plugin=...)``, not
in an accelerate YAML, because onecard's own launcher is torchrun, not ``accelerate launch``.

The maths that make N GPUs equal one GPU with the same global batch (tests/test_distributed_launch.py):
- a global step takes ``micro_batch_size x N x grad_accum`` examples in epoch order, split into ``grad_accum``
  sets of ``micro_batch_size x N``; rank r takes slice ``[r*mb, (r+1)*mb)`` of each set (:func:`rank_slices`);
- each rank's summed token loss is divided by the window's *global* count of trained tokens (one all-reduce), and
  multiplied by N, because DDP and FSDP average gradients over ranks (sum / N) where we want the sum;
- DPO/KTO the same with the window's pair or example count (train/preference_step.py ``Share``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from onecard.catalog.families import NOT_UNDER_FSDP, NOT_UNDER_FSDP_FIX
from onecard.errors import UserError

CPU_ENV = "ONECARD_DISTRIBUTED_CPU"            # "1": N CPU processes on gloo (tests, CI)
STRATEGY_ENV = "ONECARD_DISTRIBUTED_STRATEGY"  # ddp | fsdp, chosen by the launcher, read by every rank
STRATEGIES = ("auto", "ddp", "fsdp")


def world_size() -> int:
    """Processes in this run: torchrun's WORLD_SIZE in a worker, 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_worker() -> bool:
    return "LOCAL_RANK" in os.environ and world_size() > 1


# --------------------------------------------------------------------------- launch (parent process)


def choose_strategy(recipe, requested: str = "auto") -> str:
    """ddp when one card holds the whole training state, else fsdp (full fine-tuning always shards).

    "Holds" is the planner's verdict for ``plan.gpu`` with one GPU: the same numbers ``onecard plan`` prints.
    """
    if requested not in STRATEGIES:
        raise UserError(f"unknown strategy {requested!r}", where="--strategy", fix=f"use one of {', '.join(STRATEGIES)}")
    if requested != "auto":
        return requested
    if recipe.method == "full":
        return "fsdp"
    try:
        from onecard.plan.inputs import inputs_from_recipe
        from onecard.plan.memory import plan_memory

        inputs = inputs_from_recipe(recipe).with_(num_gpus=1)
        return "ddp" if plan_memory(inputs).fits else "fsdp"
    except UserError:
        return "ddp"  # a model the planner has no shape for: replicate; --strategy fsdp overrides


def check_strategy(recipe, strategy: str) -> None:
    """What the chosen strategy cannot run (:data:`NOT_UNDER_FSDP`; a DPO/KTO reference copy under FSDP)."""
    if strategy == "fsdp" and recipe.method in NOT_UNDER_FSDP:
        raise UserError(NOT_UNDER_FSDP[recipe.method], where="method", fix=NOT_UNDER_FSDP_FIX)
    if strategy == "fsdp" and recipe.task in ("dpo", "kto"):
        from onecard.recipe import resolve_reference

        if resolve_reference(recipe) == "copy":
            raise UserError(f"task {recipe.task} with a frozen copy of the model as its reference cannot run under "
                            "FSDP: FSDP shards the model it wraps, and the copy would sit whole on every GPU -- "
                            "the memory FSDP was chosen to save", where="preference.reference",
                            fix="an adapter method (method lora or qlora: the reference is the adapter switched "
                                "off, no copy), or --strategy ddp if the model and its copy fit one GPU")


ALLOC_CONF_ENVS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the older name, and torch >= 2.9's (recorded)


# --------------------------------------------------------------------------- inside each rank


def quant_storage_kwargs() -> dict[str, Any]:
    """bitsandbytes kwargs for QLoRA under FSDP: NF4 bytes stored in a bf16 tensor, the FSDP-QLoRA recipe of
    Answer.AI / HF. accelerate 1.16 ``fsdp2_prepare_model`` leaves uint8-stored Params4bit out of ``fully_shard``
    (whole on every GPU: its "cannot survive fully_shard's DTensor conversion" warning, accelerate issues #3874 and
    #3983); a floating storage dtype is sharded like any bf16 weight. Empty elsewhere."""
    if os.environ.get(STRATEGY_ENV) != "fsdp" or not is_worker():
        return {}
    import torch

    return {"bnb_4bit_quant_storage": torch.bfloat16}


@dataclass
class Dist:
    """One rank's view of the job: accelerate's Accelerator plus the few collectives the loop needs."""

    accelerator: Any
    strategy: str
    device: str

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def world(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64 (token counts stay exact far beyond 2**24)."""
        import torch
        import torch.distributed as tdist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor.tolist()

    def any_true(self, flag: bool) -> bool:
        return self.all_sum([1.0 if flag else 0.0])[0] > 0

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (torch's ``broadcast_object_list``): what only rank 0 may read -- the
        run directory lives on its node -- reaches the others this way."""
        import torch.distributed as tdist

        box = [value if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def to_main(self, value: Any) -> list[Any] | None:
        """Every rank's ``value``, in rank order, on rank 0 (None elsewhere): what only rank 0 may write."""
        import torch.distributed as tdist

        out = [None] * self.world if self.is_main else None
        tdist.gather_object(value, out, dst=0)
        return out

    def from_main_each(self, values: list[Any] | None) -> Any:
        """Rank 0's ``values[r]`` on rank r (torch's ``scatter_object_list``)."""
        import torch.distributed as tdist

        box = [None]
        tdist.scatter_object_list(box, values if self.is_main else None, src=0)
        return box[0]

    def send_to_main(self, value: Any, rank: int) -> Any:
        """Rank ``rank``'s ``value`` on rank 0 (returned there; None elsewhere), point to point."""
        import torch.distributed as tdist

        if rank == 0:
            return value if self.is_main else None
        box = [value]
        if self.rank == rank:
            tdist.send_object_list(box, dst=0)
        elif self.is_main:
            tdist.recv_object_list(box, src=rank)
            return box[0]
        return None

    def send_from_main(self, value: Any, rank: int) -> Any:
        """Rank 0's ``value`` on rank ``rank`` (returned there; None on the ranks in between), point to point."""
        import torch.distributed as tdist

        if rank == 0:
            return value if self.is_main else None
        box = [value]
        if self.is_main:
            tdist.send_object_list(box, dst=rank)
        elif self.rank == rank:
            tdist.recv_object_list(box, src=0)
            return box[0]
        return None

    def main_decides(self, check) -> Any:
        """Run ``check()`` on rank 0 only and hand every rank its result, or raise its UserError on every rank: the
        ranks stop alike, and only rank 0 reads the run directory."""
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", check())
            except UserError as err:
                outcome = ("error", (err.what, err.where, err.fix, type(err).__name__))
        kind, payload = self.from_main(outcome)
        if kind == "error":
            what, where, fix, _ = payload
            raise UserError(what, where=where, fix=fix)
        return payload

    def clip_grad_norm_(self, model, max_norm: float) -> float:
        """Clip every rank's gradients by the norm of the *whole* model's gradients; returns that norm.

        Under FSDP each rank holds a shard of every gradient, so the norm must be all-reduced over ranks. accelerate
        1.16 ``Accelerator.clip_grad_norm_`` takes its FSDP route (for FSDP2 ``_clip_grad_norm_dtensor_aware``: the
        norm of the DTensor gradients, all-reduced) ONLY when the parameters passed equal
        ``list(model.parameters())``; handed the trainable subset under FSDP1 it clipped each rank by its own
        shard's norm (the FSDP parity run on 2 x H200 drifted 2.6% from one GPU in 20 steps, notes/multigpu.md).
        So FSDP passes all parameters; frozen ones have no gradient and add nothing. DDP gradients are already
        identical on every rank.
        """
        if self.strategy == "fsdp":
            return float(self.accelerator.clip_grad_norm_(list(model.parameters()), max_norm))
        params = [p for p in model.parameters() if p.requires_grad]
        return float(self.accelerator.clip_grad_norm_(params, max_norm))


def init(recipe) -> Dist:
    """The Accelerator for this rank, FSDP2 plugin included under FSDP."""
    from accelerate import Accelerator

    cpu = os.environ.get(CPU_ENV) == "1"
    strategy = os.environ.get(STRATEGY_ENV) or choose_strategy(recipe)
    plugin = fsdp_plugin() if strategy == "fsdp" else None
    accelerator = Accelerator(cpu=cpu, fsdp_plugin=plugin)
    if cpu and plugin is not None:
        _fsdp_on_cpu(accelerator, plugin)
    if accelerator.num_processes != recipe.training.num_gpus:
        raise UserError(f"training.num_gpus is {recipe.training.num_gpus} but {accelerator.num_processes} processes "
                        "were launched", where="training.num_gpus", fix="launch with onecard train --num-gpus N")
    device = "cpu" if cpu else f"cuda:{accelerator.local_process_index}"
    return Dist(accelerator, strategy, device)


def _fsdp_on_cpu(accelerator, plugin) -> None:
    """FSDP2 for CPU processes (tests, CI). accelerate 1.16 turns an ``fsdp_plugin`` into FSDP only for accelerator
    devices (``AcceleratorState.__init__``, the MULTI_GPU/NPU/XPU/... branch) and would silently run CPU processes
    as plain DDP. torch 2.13's ``fully_shard`` runs on a CPU device mesh over gloo, so the distributed type GPUs get
    is set here: the same wrap, clipping, state dict and save code then runs on CPU as on GPUs
    (tests/test_distributed_fsdp.py)."""
    from accelerate.utils import DistributedType

    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def fsdp_plugin():
    """FSDP2 (``fully_shard``), parameters resharded after each forward (FULL_SHARD), one unit per decoder layer
    (``transformer_based_wrap``: the model's ``_no_split_modules``) plus accelerate's embedding and head units.
    A layer's unit holds its frozen bf16 weights and its fp32 adapters together -- FSDP2 all-gathers mixed dtypes,
    where FSDP1's flat parameters needed peft's one-unit-per-LoRA-linear policy -- so an adapter's weights are
    whole wherever the layer's forward reads them (DoRA's magnitude included). No accelerate activation
    checkpointing: the loop uses transformers' ``gradient_checkpointing_enable`` (non-reentrant), as on one GPU."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, cpu_ram_efficient_loading=False, activation_checkpointing=False,
        state_dict_type="FULL_STATE_DICT", auto_wrap_policy="transformer_based_wrap")


def prepare(dist: Dist, model, optimizer, recipe, low_memory: bool = False):
    """(model, optimizer) wrapped through ``accelerator.prepare`` -- together, as FSDP2 requires: accelerate swaps
    the optimizer's parameters for the sharded DTensors. Under sharded QLoRA peft's fp32 upcast of frozen norms and
    embeddings is undone (bf16, as trl does; the planner counts them so). ``low_memory``: the model was loaded by
    train/fsdp_load.py (rank 0's in host memory, the others' on meta), and the wrap hands out rank 0's weights."""
    check_strategy(recipe, dist.strategy)
    if dist.strategy == "fsdp" and recipe.method == "qlora" and dist.device.startswith("cuda"):
        _frozen_to_bf16_(model)  # on CPU compute is fp32 and prepare_kbit keeps fp32, as on one process
    if low_memory:
        from onecard.train.fsdp_load import share_quant_states

        if recipe.method == "qlora":
            share_quant_states(dist, model)
        dist.accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = True  # read by fsdp2_prepare_model
    return dist.accelerator.prepare(model, optimizer)


def _frozen_to_bf16_(model) -> None:
    import torch

    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)


# --------------------------------------------------------------------------- data


def rank_slices(window: list[int], micro_batch: int, world: int, rank: int) -> list[list[int] | None]:
    """This rank's micro-batches of one optimizer step's example indices.

    ``window`` holds ``micro_batch x world x grad_accum`` indices (fewer at an epoch's end); it is cut into sets of
    ``micro_batch x world`` and rank r takes ``set[r*mb:(r+1)*mb]``. An empty slice (a short last set) is ``None``:
    the rank still runs a forward and backward with weight zero, because DDP and FSDP need every rank in every
    gradient reduction.
    """
    size = micro_batch * world
    out: list[list[int] | None] = []
    for start in range(0, len(window), size):
        part = window[start:start + size][rank * micro_batch:(rank + 1) * micro_batch]
        out.append(part or None)
    return out


# --------------------------------------------------------------------------- sharded checkpoints


def local_shards(model, optimizer) -> dict[str, Any]:
    """This rank's shards of the trainable parameters and of the optimizer state, as plain CPU tensors (FSDP2
    holds DTensors: their local part), keyed by the model's parameter names and the optimizer's own indices."""
    import torch

    params = {n: _local(p).detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = _torch_optimizer(optimizer).state_dict()
    state["state"] = {k: {n: _local(v).detach().cpu().clone() if torch.is_tensor(v) else v for n, v in s.items()}
                      for k, s in state["state"].items()}
    return {"params": params, "optimizer": state}


def load_local_shards(model, optimizer, blob: dict[str, Any]) -> None:
    """:func:`local_shards` back into this rank's parameters and optimizer. torch's ``Optimizer.load_state_dict``
    leaves plain tensors; the state of a DTensor parameter is made a DTensor of the same layout again, as the
    optimizer step mixes them in one foreach op."""
    import torch
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in blob["params"].items():
            _local(params[name]).copy_(tensor)
    inner = _torch_optimizer(optimizer)
    inner.load_state_dict(blob["optimizer"])
    for group in inner.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            state = inner.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.to_local().shape:
                    state[key] = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                                    run_check=False, shape=param.shape, stride=param.stride())


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it

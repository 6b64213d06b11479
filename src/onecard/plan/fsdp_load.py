"""Per-GPU memory of FSDP2's low-memory loading (train/fsdp_load.py), and the QLoRA quantisation constants that
stay whole on every GPU.

Rank 0 reads the base into host memory (a QLoRA base is quantised on its GPU one decoder layer at a time); the other
ranks build it on meta; the wrap then broadcasts one tensor at a time from rank 0 and each rank keeps its shard
(accelerate 1.16 ``fsdp2_load_full_state_dict``: the whole tensor on the GPU, ``distribute_tensor``, then the next).
So the load peak per GPU is the worse of two moments, not the whole model:
- rank 0 quantising a layer: that layer's linears in the load dtype plus their NF4 result (QLoRA only; nothing is
  sharded yet);
- the end of the hand-over: this rank's shards of the base, the replicated QuantStates, and the largest tensor
  broadcast whole (the embedding or LM head on every Llama/Qwen shape; a packed NF4 linear is smaller).
Left out: the CUDA caching allocator's rounding of the freed whole tensors (the step's slack covers the same pool).
"""

from __future__ import annotations

from math import ceil

from onecard.plan import static
from onecard.plan.inputs import PlanInputs


def quant_constant_bytes(p: PlanInputs) -> int:
    """The QuantStates of every NF4 linear (absmax, nested absmax, code maps): not parameters, so FSDP2 does not shard
    them; every GPU holds them all (bitsandbytes reads ``module.quant_state`` whole in each matmul)."""
    if p.method != "qlora":
        return 0
    return sum(static.nf4_tensor_bytes(n, p.double_quant) - ceil(n / 2)
               for kind, n in static.param_tensors(p.shape) if kind == "linear")


def largest_whole_tensor_bytes(p: PlanInputs) -> int:
    """The biggest single tensor the hand-over broadcasts whole: bf16 (or the recipe's dtype) for the embedding, head
    and norms; packed NF4 (half a byte per weight) for a QLoRA linear."""
    sizes = [ceil(n / 2) if p.method == "qlora" and kind == "linear" else n * p.dtype_bytes
             for kind, n in static.param_tensors(p.shape)]
    return max(sizes)


def quantise_layer_bytes(p: PlanInputs) -> int:
    """Rank 0 quantising one decoder layer (QLoRA): its linears read in the load dtype plus their NF4 result."""
    if p.method != "qlora":
        return 0
    linears = [n_in * n_out for _, n_in, n_out in p.shape.linear_layers_per_block()]
    return sum(n * p.dtype_bytes + static.nf4_tensor_bytes(n, p.double_quant) for n in linears)


def fsdp_load_bytes(p: PlanInputs, context_bytes: int) -> int:
    """Peak bytes on one GPU while the model loads and is sharded (0 on one GPU: the step's weights are its own),
    CUDA context included. Sharded QLoRA keeps norms and embeddings bf16 (train/distributed.py)."""
    if p.num_gpus <= 1:
        return 0
    base = static.base_weight_bytes(p.shape, p.method, p.dtype_bytes, double_quant=p.double_quant, kbit_upcast=False)
    constants = quant_constant_bytes(p)
    handed_over = (base - constants) // p.num_gpus + constants + largest_whole_tensor_bytes(p)
    return max(quantise_layer_bytes(p), handed_over) + context_bytes

"""The planner's FSDP2 load phase (plan/fsdp_load.py), from the model shapes: per GPU its shards of the base, the
QuantStates whole, and the largest tensor broadcast whole -- not the whole model -- or, on rank 0 of a QLoRA run,
one decoder layer being quantised."""

from __future__ import annotations

from math import ceil

from onecard.catalog.gpus import GPUS
from onecard.catalog.models import PRESETS
from onecard.plan import static
from onecard.plan.fsdp_load import fsdp_load_bytes, largest_whole_tensor_bytes, quant_constant_bytes
from onecard.plan.inputs import PlanInputs
from onecard.plan.memory import CUDA_CONTEXT_BYTES, plan_memory


def inputs(model="llama-3-70b", method="qlora", num_gpus=2, **kw) -> PlanInputs:
    return PlanInputs(shape=PRESETS[model], gpu=GPUS["rtx4090"], method=method, num_gpus=num_gpus, kernels="none",
                      fused_ce=False, **kw)


def test_one_gpu_has_no_load_phase():
    assert fsdp_load_bytes(inputs(num_gpus=1), CUDA_CONTEXT_BYTES) == 0
    assert plan_memory(inputs(num_gpus=1)).load_bytes == 0


def test_qlora_load_is_the_shards_plus_quant_states_plus_the_embedding():
    p, s = inputs(), PRESETS["llama-3-70b"]
    embedding = s.vocab_size * s.hidden_size * 2  # bf16, the largest single tensor of Llama 3 70B
    assert largest_whole_tensor_bytes(p) == embedding
    linears = [n_in * n_out for _, n_in, n_out in s.linear_layers_per_block()] * s.num_hidden_layers
    # double quant: a uint8 absmax per 64 weights, an fp32 absmax per 256 blocks, the fp32 offset and two code maps
    constants = sum(ceil(n / 64) + ceil(ceil(n / 64) / 256) * 4 + 4 + (256 + 16) * 4 for n in linears)
    assert quant_constant_bytes(p) == constants
    base = static.base_weight_bytes(s, "qlora", 2, kbit_upcast=False)
    want = (base - constants) // 2 + constants + embedding + CUDA_CONTEXT_BYTES
    assert fsdp_load_bytes(p, CUDA_CONTEXT_BYTES) == want
    assert want < base  # never the whole model
    plan = plan_memory(p)
    assert plan.load_bytes == want and any(f"{want:,} bytes" in n for n in plan.notes)


def test_load_falls_with_the_gpu_count_towards_what_is_never_sharded():
    loads = [fsdp_load_bytes(inputs(num_gpus=n), 0) for n in (2, 4, 8)]
    assert loads[0] > loads[1] > loads[2] > quant_constant_bytes(inputs()) + largest_whole_tensor_bytes(inputs())


def test_lora_load_is_half_the_bf16_base_plus_one_tensor_on_two_gpus():
    p, s = inputs("llama-3-8b", method="lora"), PRESETS["llama-3-8b"]
    base = s.total_params() * 2
    assert fsdp_load_bytes(p, 0) == base // 2 + s.vocab_size * s.hidden_size * 2


def test_rank_0_quantising_a_layer_is_the_load_peak_when_shards_are_small():
    """At many GPUs the shards shrink below one bf16 layer plus its NF4 copy, which rank 0 holds while quantising."""
    s = PRESETS["llama-3-70b"]
    layer = sum(n_in * n_out for _, n_in, n_out in s.linear_layers_per_block())
    p = inputs(num_gpus=4096)
    assert fsdp_load_bytes(p, 0) >= layer * 2 + layer // 2

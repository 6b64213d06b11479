"""Low-memory loading under FSDP2: rank 0 alone reads the weights, into host memory; the other ranks build the model
on the ``meta`` device (shapes, no memory); the FSDP2 wrap hands each rank its shards from rank 0.

The idea is Answer.AI fsdp_qlora's ``low_memory`` loading. The hand-over is accelerate's: with
``cpu_ram_efficient_loading`` (accelerate 1.16 ``fsdp2_prepare_model``) rank 0's state dict is kept, every rank's
model goes to ``meta``, ``fully_shard`` wraps the shapes, and ``fsdp2_load_full_state_dict`` broadcasts one tensor
at a time from rank 0 and keeps this rank's shard (``distribute_tensor``): on a GPU, the shards so far plus one
whole tensor. accelerate skips that path for a model holding ``Params4bit`` (its "cannot be moved to meta" note:
torch ops drop the subclass), so QLoRA goes in by :func:`share_quant_states` first: every ``Linear4bit``'s packed
NF4 weight -- stored in bf16 (``bnb_4bit_quant_storage``, train/distributed.py) -- becomes a plain frozen bf16
parameter that accelerate broadcasts and shards like any other, and its ``QuantState`` (absmax, code, nested
state: small, and read whole by every matmul) is sent from rank 0 to each rank and set on the module, where
bitsandbytes' ``fix_4bit_weight_quant_state_from_module`` finds it once FSDP has replaced the parameter (the way
FSDP-QLoRA runs in bitsandbytes 0.50). Rank 0 quantises a QLoRA base on its GPU one decoder layer at a time
(train/layerwise.py), each layer going back to host memory: no GPU ever holds the whole model.

What this costs: rank 0's host memory holds the whole base (NF4 for QLoRA, e.g. ~35 GiB for Llama 3 70B; bf16
otherwise), the others' none.
"""

from __future__ import annotations

from onecard.errors import UserError

QUANT_STATE_GROUP = 16  # Linear4bit modules per message from rank 0 (about two decoder layers' QuantStates)


def low_memory(dist) -> bool:
    """FSDP2 over several ranks loads this way (every rank loading the whole model is what FSDP is there to avoid)."""
    return dist.strategy == "fsdp" and dist.world > 1


def load_placed(recipe, source: str, device: str, dtype, attn_implementation: str, place: str):
    """The base of ``load_base(place=...)``: "host" (read into host memory) or "meta" (shapes only)."""
    import torch
    from transformers import AutoModelForCausalLM

    storage = torch.bfloat16  # packed NF4 in bf16, so that fully_shard shards it (train/distributed.py)
    if place == "meta":
        return meta_skeleton(recipe, source, device, dtype, attn_implementation, storage)
    if recipe.method == "qlora":
        from onecard.train.layerwise import load_layerwise

        model, _ = load_layerwise(recipe, source, "cpu", dtype, (), attn_implementation, quantize_on=device,
                                  quant_storage=storage)
        return model
    if recipe.quant.base == "fp8":
        raise UserError("quant.base fp8 converts the weights on the GPU as they load; FSDP2's low-memory loading "
                        "reads them on rank 0's host", where="quant.base", fix="use quant.base: none with --num-gpus")
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation,
                                                trust_remote_code=recipe.model.trust_remote_code,
                                                revision=recipe.model.revision, use_safetensors=True)


def meta_skeleton(recipe, source: str, device: str, dtype, attn_implementation: str, storage):
    """The model of ``source``'s config on meta: every parameter a shape, nothing read. The rotary embedding's
    buffers are computed in ``__init__`` and are not in a state dict, so it is rebuilt on ``device`` (as
    train/layerwise.py does); a QLoRA base gets meta ``Linear4bit`` modules whose packed shapes come from rank 0
    (:func:`share_quant_states`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from onecard.train.layerwise import local_snapshot, quantize_linears_

    config = AutoConfig.from_pretrained(local_snapshot(source, recipe.model.revision),
                                        trust_remote_code=recipe.model.trust_remote_code)
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    decoder = model.get_decoder()
    if hasattr(decoder, "rotary_emb"):
        with torch.device(device):
            decoder.rotary_emb = type(decoder.rotary_emb)(config=config)
    if recipe.method == "qlora":
        for layer in decoder.layers:
            quantize_linears_(layer, "meta", compute_dtype=getattr(torch, recipe.quant.compute_dtype),
                              quant_storage=storage, quant=recipe.quant)
        model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit (peft/tuners/lora/model.py)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:  # accelerate re-registers non-persistent buffers from each rank's own copy, which must be real
        raise RuntimeError(f"buffers left on meta: {left[:5]}")
    return model


def meta_parameter_count(model) -> tuple[int, int]:
    """(parameters on meta, parameters): what this rank holds before the wrap."""
    params = list(model.parameters())
    return sum(1 for p in params if p.is_meta), len(params)


def share_quant_states(dist, model) -> int:
    """Every ``Linear4bit``'s packed weight as a plain frozen bf16 parameter (rank 0's data; meta elsewhere, in
    rank 0's packed shape) and rank 0's ``QuantState`` on the module, on this rank's device; returns how many.
    Sent as CPU tensors (a pickled CUDA tensor would unpickle onto the sender's GPU index)."""
    import bitsandbytes as bnb
    import torch

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    for start in range(0, len(linears), QUANT_STATE_GROUP):
        group = linears[start:start + QUANT_STATE_GROUP]
        sent = {n: (tuple(m.weight.shape), m.weight.dtype, _quant_state(m, n)) for n, m in group} if dist.is_main \
            else None
        got = dist.from_main(sent)
        for name, module in group:
            shape, dtype, state = got[name]
            state.to(dist.device)  # QuantState.to moves its tensors in place
            module.quant_state = state
            data = module.weight.data if dist.is_main else torch.empty(shape, dtype=dtype, device="meta")
            module.weight = torch.nn.Parameter(data, requires_grad=False)
    return len(linears)


def _quant_state(module, name: str):
    state = getattr(module.weight, "quant_state", None)
    if state is None or module.weight.device.type != "cpu":
        raise RuntimeError(f"{name}: rank 0's Linear4bit is not a quantised weight in host memory")
    return state

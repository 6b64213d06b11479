"""Build the model a bench configuration trains: random preset weights made on the GPU, or a real local model.

Why random weights: speed and memory do not depend on the values (one caveat measured on the H200 here: a bf16
matmul on all-zero inputs runs ~13% faster than on random data, KINDS.md, so weights are filled with N(0, 0.02),
never left zero), and a random 70B shape needs no 140 GB download.

Why layer by layer for QLoRA: a 70B model in bf16 is 141 GB, more than the H200 holds. The bench builds it the way
``onecard train`` loads a base too large for the card (train/layerwise.py): a ``meta`` skeleton, then each decoder
layer materialised in bf16 on the GPU, filled, and converted (NF4 ``Linear4bit``, or e4m3 ``Fp8Linear`` for
``quant_base: fp8``), so at most one bf16 layer exists at a time; streamed layers are parked in host memory as
they are made.
"""

from __future__ import annotations

import os
from pathlib import Path

from onecard.bench.config import BenchConfig
from onecard.train.layerwise import quantize_linears_

ADAPTER_DTYPE_ENV = "ONECARD_BENCH_ADAPTER_DTYPE"  # "bfloat16": measure bf16 adapters instead of peft's fp32


def is_preset(name: str) -> bool:
    from onecard.catalog.models import find_preset

    return find_preset(name) is not None


def hf_config(cfg: BenchConfig):
    """A transformers config for the preset (or the tiny CPU model when ``cfg.model == "tiny"``)."""
    from transformers import AutoConfig

    if cfg.model == "tiny":
        from onecard.tiny import tiny_config

        return tiny_config("llama", vocab_size=320, max_position_embeddings=max(512, cfg.seq))
    from onecard.catalog.models import find_preset

    s = find_preset(cfg.model)
    kwargs = dict(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                  num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
                  num_key_value_heads=s.num_key_value_heads, vocab_size=s.vocab_size,
                  max_position_embeddings=max(s.max_position_embeddings, cfg.seq),
                  tie_word_embeddings=s.tie_word_embeddings, use_cache=False)
    if s.head_dim:
        kwargs["head_dim"] = s.head_dim
    if s.model_type == "llama":
        kwargs["attention_bias"] = s.attention_bias
    if s.model_type == "mistral":
        kwargs["sliding_window"] = None  # Mistral v0.3 has none; a window would change the attention path
    return AutoConfig.for_model(s.model_type, **kwargs)


def fill_random_(module, std: float = 0.02) -> None:
    """In-place N(0, std) for matrices and biases, 1 for norm scales (as a trained RMSNorm is near 1)."""
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.is_meta:
                continue
            if param.ndim == 1 and "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std)


def build_base(cfg: BenchConfig, device: str):
    """The base model (no adapter), random weights, in bf16 on CUDA (fp32 on CPU); NF4 linears for qlora."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = hf_config(cfg)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if cfg.method == "qlora":
        if not device.startswith("cuda") and cfg.model != "tiny":
            from onecard.errors import UserError

            raise UserError("qlora (bitsandbytes NF4) benchmarks of presets need a CUDA GPU", where="--method")
        return build_nf4_layerwise(config, device, park_layers=_park_layers(cfg, config))
    if cfg.quant_base == "fp8":
        from onecard.patch.fp8 import fp8_layer_

        return build_random_layerwise(config, device, fp8_layer_, park_layers=_park_layers(cfg, config))
    if cfg.offload_weights:  # never the whole bf16 model on the (capped) GPU: each layer parked as it is made
        return build_random_layerwise(config, device, None, park_layers=_park_layers(cfg, config))
    # no_init_weights: skip transformers' per-module init (we overwrite every tensor with fill_random_ anyway).
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if config.tie_word_embeddings:
        model.tie_weights()
    fill_random_(model)
    return model


def _park_layers(cfg: BenchConfig, config) -> list[int]:
    """The decoder layers whose weights a streaming build parks in host memory as it makes them (none without
    streaming): the ones patch/stream_weights.py will stream."""
    if not cfg.offload_weights:
        return []
    from onecard.patch.stream_weights import streamed_layer_ids

    return streamed_layer_ids(config.num_hidden_layers, cfg.resident_layers)


def build_nf4_layerwise(config, device: str, quant_storage=None, park_layers=()):
    """A random NF4 model built one decoder layer at a time (never the whole bf16 model on the device).

    ``quant_storage``: bitsandbytes' storage dtype of the packed weights (bf16 makes them FSDP-shardable).
    ``park_layers``: see :func:`onecard.train.layerwise.build_layerwise`.
    """
    model = build_random_layerwise(
        config, device, lambda layer: quantize_linears_(layer, device, quant_storage=quant_storage), park_layers)
    model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit (peft/tuners/lora/model.py)
    return model


def build_random_layerwise(config, device: str, convert_layer, park_layers=()):
    """A random model built as the training loader reads a checkpoint too large for the card
    (:func:`onecard.train.layerwise.build_layerwise`), with N(0, 0.02) weights instead of the checkpoint's."""
    from onecard.train.layerwise import build_layerwise

    return build_layerwise(config, device, lambda module, prefix: fill_random_(module), convert_layer, park_layers)


def build_model(cfg: BenchConfig, device: str, plain: bool = False):
    """Base + adapter (or all weights trainable) + checkpointing, the way ``onecard train`` sets it up.

    Returns ``(model, vocab_size)``. Local directories go through the training spine's loader unchanged.
    ``plain``: the --baseline half, set up as plain transformers + peft would be: QLoRA keeps
    prepare_model_for_kbit_training's fp32 upcast of the non-quantised parameters.
    """
    from transformers import set_seed

    from onecard.train.model import apply_adapter, enable_grad_ckpt, load_model_and_tokenizer, prepare_kbit

    if plain and cfg.quant_base != "none":  # the --baseline half is plain transformers + peft on a bf16 base
        from dataclasses import replace

        cfg = replace(cfg, quant_base="none")
    if cfg.quant_base == "fp8":
        from onecard.patch.fp8 import check_fp8_device

        check_fp8_device(device)
    recipe = cfg.to_recipe() if cfg.model != "tiny" else _tiny_recipe(cfg)
    if cfg.model != "tiny" and not is_preset(cfg.model) and Path(cfg.model).expanduser().is_dir():
        model, _tok = load_model_and_tokenizer(recipe, device)
    else:
        model = build_base(cfg, device)
        if cfg.method == "qlora":  # the training spine's preparation (fp32 upcast undone on CUDA)
            import torch

            if plain:
                from peft import prepare_model_for_kbit_training

                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            else:
                model = prepare_kbit(model, torch.bfloat16 if device.startswith("cuda") else torch.float32, device)
        set_seed(0)
        if recipe.is_adapter:
            model = apply_adapter(model, recipe)
            if os.environ.get(ADAPTER_DTYPE_ENV) == "bfloat16":  # experiment: bf16 adapters (and bf16 AdamW state)
                import torch

                for param in model.parameters():
                    if param.requires_grad:
                        param.data = param.data.to(torch.bfloat16)
        else:
            for param in model.parameters():
                param.requires_grad_(True)
    if cfg.grad_ckpt:
        if plain and recipe.training.offload_activations:  # the baseline is plain transformers + peft: no offload
            training = recipe.training.model_copy(update={"offload_activations": False})
            recipe = recipe.model_copy(update={"training": training})
        enable_grad_ckpt(model, recipe)  # the trainer's function: offloads checkpoints when the recipe says so
    if cfg.offload_weights and not plain:
        from onecard.patch.stream_weights import apply_weight_streaming

        model.onecard_weight_stream = apply_weight_streaming(model, device, resident=cfg.resident_layers)
    model.train()
    return model, int(model.config.vocab_size)


def _tiny_recipe(cfg: BenchConfig):
    from onecard.recipe import validate_recipe

    tree = cfg.recipe_tree()
    tree["model"] = {"name_or_path": "tiny", "dtype": "float32"}
    return validate_recipe(tree)

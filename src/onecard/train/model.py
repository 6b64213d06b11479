"""Load the base model and tokenizer the recipe names, and put the adapter on it.

Everything a user can get wrong here (a missing directory, pickled weights, fp16 on a family that
overflows in fp16, LoRA targets the model lacks) becomes a :class:`~onecard.errors.UserError` *before*
anything is written to the run directory. The dtype is always passed explicitly: transformers 5 keeps a
checkpoint's stored dtype unless told otherwise, which silently trains bf16 checkpoints in bf16 on CPU.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from onecard.catalog.families import family_for, is_llama3
from onecard.errors import UserError
from onecard.recipe import Recipe

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


# --------------------------------------------------------------------------- resolving


def resolve_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(recipe: Recipe, device: str, config: dict[str, Any]):
    """auto = bf16 on CUDA, fp32 on CPU; fp16 refused where the family's activations overflow it."""
    import torch

    name = recipe.model.dtype
    if name == "auto":
        name = "bfloat16" if device.startswith("cuda") else "float32"
    if name == "float16":
        family = family_for(str(config.get("model_type", "")))
        if is_llama3(config) or (family is not None and not family.fp16_safe):
            why = "Llama 3 was trained in bf16 and its activations exceed fp16's range (65504)"
            if family is not None and family.note and not is_llama3(config):
                why = family.note
            raise UserError(f"model.dtype float16 is refused for this model: {why}; training would diverge",
                            where="model.dtype", fix="use bfloat16 (any Ampere or newer GPU) or float32")
    return getattr(torch, name)


def resolve_attn(recipe: Recipe, device: str, architecture: str | None = None) -> str:
    """auto = FlashAttention 2 when the ``flash_attn`` package is importable and we are on CUDA, else SDPA where
    transformers' class for ``architecture`` (config.json's ``architectures[0]``) has it, else eager, said in one
    line. transformers 5.24 took SDPA away from Gemma 2 (soft-capped attention), which 5.17 ran through it: an
    explicit ``sdpa`` there is refused before loading rather than failing inside transformers."""
    import importlib.util

    choice = recipe.model.attn_implementation
    has_sdpa = _has_sdpa(architecture)
    if choice == "sdpa" and not has_sdpa:
        raise UserError(f"{architecture} has no SDPA attention in the installed transformers",
                        where="model.attn_implementation: sdpa", fix="use eager (or auto, which picks it)")
    if choice != "auto":
        return choice
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if not has_sdpa:
        logging.getLogger("onecard.train").warning(
            "model.attn_implementation auto: %s has no SDPA attention in the installed transformers; eager "
            "attention runs (its scores take seq_len^2 memory per head)", architecture)
        return "eager"
    return "sdpa"


def _has_sdpa(architecture: str | None) -> bool:
    """Whether transformers' class of that name runs SDPA attention (True when the class is unknown here: the load
    then says so itself)."""
    if not architecture:
        return True
    import transformers

    return bool(getattr(getattr(transformers, architecture, None), "_supports_sdpa", True))


def resolve_source(recipe: Recipe) -> str:
    """A local directory, a cached safetensors dir for a ``.gguf`` file, or a hub id (checked when loaded)."""
    name = recipe.model.name_or_path
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError("GGUF file not found", where=f"model.name_or_path: {name}", fix="check the path")
        try:
            from onecard.train.gguf_import import materialize_gguf
        except ImportError:
            raise UserError("loading .gguf files is not available in this install",
                            where="model.name_or_path", fix="use a Hugging Face directory") from None
        return str(materialize_gguf(path))
    if path.is_dir():
        _check_weight_files(path, recipe.model.allow_pickle)
        return str(path)
    looks_local = name.startswith(("/", ".", "~")) or path.exists() or name.count("/") != 1
    if looks_local:
        raise UserError("model directory not found", where=f"model.name_or_path: {name}",
                        fix="point model.name_or_path at a Hugging Face model directory (config.json + *.safetensors)")
    return name  # "owner/name": a hub id, tried when loading


def _check_weight_files(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        raise UserError("no config.json: not a Hugging Face model directory", where=str(path),
                        fix="point model.name_or_path at the directory holding config.json and the weights")
    files = [p.name for p in path.iterdir()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if pickled and not allow_pickle:
        raise UserError(f"only pickled weights found ({', '.join(sorted(pickled)[:3])}); loading pickles can run "
                        "arbitrary code", where=str(path),
                        fix="convert them to safetensors, or set model.allow_pickle: true if you trust the source")
    if not pickled:
        raise UserError("no weight files (*.safetensors) in the model directory", where=str(path))


def _read_config(source: str, recipe: Recipe) -> dict[str, Any]:
    local = Path(source) / "config.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(source, revision=recipe.model.revision,
                                         trust_remote_code=recipe.model.trust_remote_code)
    except Exception as exc:  # offline, unknown id, private repo: all user-fixable
        raise UserError(f"could not load model {source!r}: neither a local directory nor a reachable hub id "
                        f"({type(exc).__name__})", where="model.name_or_path",
                        fix="download the model to a local directory and point model.name_or_path at it") from None
    return cfg.to_dict()


# --------------------------------------------------------------------------- loading


def quant_config(recipe: Recipe):
    """QLoRA (Dettmers et al. 2023): 4-bit NF4 base, double quantisation, compute in recipe.quant.compute_dtype."""
    import torch
    from transformers import BitsAndBytesConfig

    from onecard.train.distributed import quant_storage_kwargs

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recipe.quant.quant_type,
                              bnb_4bit_use_double_quant=recipe.quant.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, recipe.quant.compute_dtype),
                              **quant_storage_kwargs())  # bf16 storage under FSDP, else bitsandbytes' uint8


def load_base(recipe: Recipe, device: str | None = None, park_layers=(), place: str = "device"):
    """The base model (no adapter) exactly as training sees it: (model, tokenizer, source).

    ``park_layers``: decoder layers whose frozen weights will stream from host memory (train/stream_setup.py); the
    base is then read layer by layer (train/layerwise.py), so it never has to fit the card whole.
    ``place``: "device"; or, for FSDP2's low-memory loading (train/fsdp_load.py), "host" (the weights in host
    memory, a QLoRA base quantised on ``device`` one layer at a time) or "meta" (shapes only, nothing read)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    if recipe.quant.base == "fp8":  # refused before anything is read or downloaded
        from onecard.patch.fp8 import check_fp8_device

        check_fp8_device(device)
    source = resolve_source(recipe)
    config = _read_config(source, recipe)
    dtype = resolve_dtype(recipe, device, config)
    architecture = (config.get("architectures") or [None])[0]
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=resolve_attn(recipe, device, architecture),
                                  trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision,
                                  use_safetensors=None if recipe.model.allow_pickle else True)
    if recipe.method == "qlora":
        _require_bitsandbytes()
        kwargs.update(quantization_config=quant_config(recipe), device_map={"": device})
    if place != "device":
        from onecard.train.fsdp_load import load_placed

        model = load_placed(recipe, source, device, dtype, kwargs["attn_implementation"], place)
    elif park_layers:
        from onecard.train.layerwise import load_layerwise

        model, fp8_handle = load_layerwise(recipe, source, device, dtype, park_layers, kwargs["attn_implementation"])
        if fp8_handle is not None:
            model.onecard_fp8_base = fp8_handle
    else:
        model = _load_whole(source, recipe, device, kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code,
                                              revision=recipe.model.revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss, any id works
    return model, tokenizer, source


def _load_whole(source: str, recipe: Recipe, device: str, kwargs: dict[str, Any]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if recipe.quant.base == "fp8":  # read on the host, quantised per output channel layer by layer on the device
        from onecard.patch.fp8 import fp8_layers_to_device

        model.onecard_fp8_base = fp8_layers_to_device(model, device)  # the handle: .revert() gives a bf16 base back
    elif recipe.method != "qlora":
        model.to(device)
    return model


def _require_bitsandbytes() -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("method qlora needs the bitsandbytes package", where="method",
                        fix="pip install bitsandbytes, or use method lora")


def load_model_and_tokenizer(recipe: Recipe, device: str | None = None, park_layers=(), place: str = "device"):
    """Base model + tokenizer with the recipe's adapter applied (or all weights trainable for full);
    ``park_layers`` and ``place`` as :func:`load_base`."""
    from transformers import set_seed

    model, tokenizer, _ = load_base(recipe, device, park_layers, place)
    if recipe.method == "qlora":
        import torch

        # Gradient checkpointing is switched on by the training loop (non-reentrant), not here.
        model = prepare_kbit(model, getattr(torch, recipe.quant.compute_dtype), resolve_device(device))
    set_seed(recipe.training.seed)  # adapter init draws random numbers: same seed, same adapter
    if recipe.is_adapter:
        model = apply_adapter(model, recipe)  # peft wraps an FP8 base's Fp8Linear layers as any nn.Linear
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    return model, tokenizer


def prepare_kbit(model, compute_dtype, device: str):
    """peft's ``prepare_model_for_kbit_training``, then (on CUDA) its fp32 upcast undone.

    prepare_model_for_kbit_training freezes the base and casts every non-quantised floating parameter
    (embeddings, norms, LM head) to fp32 "for stability". The fp32 embedding and norm weights make the whole
    residual stream fp32: every bitsandbytes Linear4bit then returns fp32 (it casts back to its input's dtype),
    the LoRA matmuls and the LM head run in fp32, and checkpoints and activations double in size. Measured on
    the H200 (notes/bench.md, Llama 3 8B, seq 2048 x 8, checkpointing): QLoRA ran at 0.45x of LoRA's speed
    (0.31x with onecard's kernels) and held 3.7 GiB per sequence. The frozen parameters receive no updates, so
    fp32 buys no precision; only the forward/backward dtype changes, and bf16 is what LoRA on a bf16 model
    computes in. So, as Unsloth does, cast them back to the compute dtype. Kept on CPU (fp32 compute there).
    The adapters are added afterwards and stay fp32 (peft's ``autocast_adapter_dtype``): fp32 master weights
    and AdamW state for the only parameters that train; onecard's fused MLP casts them to bf16 per matmul.
    """
    import torch
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if device.startswith("cuda") and compute_dtype != torch.float32:
        cast_floating_params_(model, compute_dtype)
    return model


def cast_floating_params_(model, dtype) -> int:
    """Cast fp32 non-quantised parameters (not bitsandbytes' packed weights) to ``dtype``; returns how many."""
    import torch

    n = 0
    for param in model.parameters():
        if param.dtype == torch.float32 and getattr(param, "quant_state", None) is None:
            param.data = param.data.to(dtype)
            n += 1
    return n


def apply_adapter(model, recipe: Recipe):
    from peft import LoraConfig, PeftModel, get_peft_model

    if recipe.adapter.init_adapter:
        path = adapter_dir(recipe.adapter.init_adapter)
        return PeftModel.from_pretrained(model, str(path), is_trainable=True)
    config = LoraConfig(r=recipe.adapter.rank, lora_alpha=recipe.adapter.lora_alpha,
                        lora_dropout=recipe.adapter.dropout, target_modules=target_modules(model, recipe),
                        use_dora=recipe.method == "dora", bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def adapter_dir(path_text: str) -> Path:
    """Accept an adapter directory or a run directory holding ``adapter/``."""
    path = Path(path_text).expanduser()
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise UserError("no PEFT adapter (adapter_config.json) found", where=f"adapter.init_adapter: {path_text}",
                    fix="point it at a run directory of an adapter method or at its adapter/ folder")


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers inside the decoder (the lm_head is left out: LoRA does not target it)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")
        if is_linear and "lm_head" not in full_name and "." in full_name:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def target_modules(model, recipe: Recipe) -> list[str]:
    found = linear_module_names(model)
    wanted = recipe.adapter.target_modules
    if wanted == "auto":
        model_type = str(getattr(model.config, "model_type", ""))
        family = family_for(model_type)
        if family is None:
            raise UserError(f"no published LoRA targets for architecture {model_type!r}; linear modules found: "
                            f"{', '.join(found)}", where="adapter.target_modules",
                            fix="list the ones to adapt, e.g. --set 'adapter.target_modules=[...]'")
        return list(family.lora_targets)
    if wanted == "all-linear":  # peft's idiom, resolved here so the run records the names it adapted
        return found
    missing = [name for name in wanted if name not in found]
    if missing:
        raise UserError(f"the model has no linear module named {', '.join(missing)}; it has: {', '.join(found)}",
                        where="adapter.target_modules", fix="use names from that list, or 'auto'")
    return list(wanted)


def uncheckpoint_last_layers(model, n: int) -> None:
    """The last ``n`` decoder layers trained without activation checkpoints (``training.uncheckpointed_layers``):
    transformers' GradientCheckpointingLayer reads its ``gradient_checkpointing`` flag at every call, so the flag is
    cleared on those layers after ``gradient_checkpointing_enable`` set it on all. The last ones because backward
    reaches them first: their kept activations are freed before the checkpointed layers' recomputes run."""
    if n == 0:
        return
    from onecard.patch.stream_weights import decoder_layers

    layers = list(decoder_layers(model))
    if n > len(layers):
        raise UserError(f"training.uncheckpointed_layers is {n}, but the model has {len(layers)} decoder layers",
                        where="training.uncheckpointed_layers", fix=f"use at most {len(layers)}")
    for layer in layers[len(layers) - n:]:
        layer.gradient_checkpointing = False


def enable_grad_ckpt(model, recipe: Recipe) -> None:
    """Non-reentrant checkpointing: works with frozen inputs and keeps dropout's RNG state on recompute.

    ``training.offload_activations``: the layers' checkpoint inputs wait in pinned host memory (patch/offload.py).
    ``training.uncheckpointed_layers``: the last N layers are not checkpointed (:func:`uncheckpoint_last_layers`).
    """
    from onecard.patch.recompute import recompute_contexts  # lets patched MLPs skip work nothing reads

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                       "context_fn": recompute_contexts})
    uncheckpoint_last_layers(model, recipe.training.uncheckpointed_layers)  # before offloading wraps the rest
    if recipe.training.offload_activations:
        from onecard.patch.offload import enable_offloaded_checkpointing

        enable_offloaded_checkpointing(model)
    if recipe.is_adapter and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if hasattr(model, "config"):
        model.config.use_cache = False

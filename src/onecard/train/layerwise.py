"""Build a model one decoder layer at a time, so that the device never holds more than one unconverted layer.

Why: a base whose weights exceed the card (Llama 3 70B in NF4 is ~35 GiB, Qwen 2.5 14B in bf16 ~27.5 GiB, against
a 24 GiB RTX 4090) can still train when its layers stream from host memory (patch/stream_weights.py), but
``from_pretrained`` puts every quantised layer on the device first (its bitsandbytes path quantises on the device;
a CPU entry in ``device_map`` keeps those layers unquantised in fp32 instead, which for 70B is 280 GB of host RAM).
So the skeleton is made on the ``meta`` device (no memory); each decoder layer is materialised on the device,
filled (from the checkpoint's safetensors, or random for the bench), converted (NF4 ``Linear4bit`` as
transformers' bitsandbytes loader makes them, or FP8), and, when it is a streamed layer, parked in pinned host
memory at once. Embeddings, final norm and head go to the device as they are.

The checkpoint is read tensor by tensor with ``safetensors.safe_open`` (memory-mapped), under the names the model's
own ``state_dict`` uses; a checkpoint whose names differ (a family transformers renames on load) is refused with the
names missing, rather than loaded wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from onecard.errors import UserError


def build_layerwise(config, device: str, fill, convert_layer=None, park_layers=(), dtype=None,
                    attn_implementation: str = "sdpa"):
    """The CausalLM of ``config`` built layer by layer: ``fill(module, prefix)`` writes each part's tensors (prefix:
    the part's name in the model's state_dict, with a trailing dot), ``convert_layer(layer)`` quantises a decoder
    layer, and the layers in ``park_layers`` move to pinned host memory as soon as they are made."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    names = {id(m): n for n, m in model.named_modules()}
    decoder = model.get_decoder()
    for name, child in list(decoder.named_children()):
        if name == "layers":
            continue
        if name == "rotary_emb":  # buffers computed in __init__: rebuilt on the device rather than to_empty
            with torch.device(device):
                setattr(decoder, name, type(child)(config=config))
        else:
            child.to_empty(device=device)
            fill(child, names[id(child)] + ".")
    park_layers = set(park_layers)
    for index, layer in enumerate(decoder.layers):
        layer.to_empty(device=device)
        fill(layer, names[id(layer)] + ".")
        if convert_layer is not None:
            convert_layer(layer)
        if index in park_layers:
            from onecard.patch.stream_weights import pack_to_host

            pack_to_host(layer, pin=device.startswith("cuda"), before_adapters=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if config.tie_word_embeddings:
        model.tie_weights()
    else:
        model.lm_head.to_empty(device=device)
        fill(model.lm_head, names[id(model.lm_head)] + ".")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"layer-wise build left tensors on meta: {left[:5]}")
    return model


class CheckpointReader:
    """The tensors of a safetensors checkpoint directory (one file or a sharded index), read by name."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise UserError("no *.safetensors in the model directory", where=str(self.directory),
                                fix="layer-wise loading (streamed weights) reads safetensors only: convert the weights")
        self._handles = {f: safe_open(str(self.directory / f), framework="pt") for f in files}
        self._where = {key: f for f, h in self._handles.items() for key in h.keys()}

    def fill(self, module, prefix: str, dtype) -> None:
        """Copy every parameter and persistent buffer of ``module`` from the checkpoint (cast to ``dtype`` if float)."""
        import torch

        wanted = [(prefix + n, t) for n, t in module.state_dict(keep_vars=True).items()]
        missing = [key for key, _ in wanted if key not in self._where]
        if missing:
            raise UserError(f"the checkpoint has no tensor {missing[0]} (and {len(missing) - 1} more of this part): "
                            "its tensor names differ from the model's", where=str(self.directory),
                            fix="load it once with transformers and save_pretrained it, or set "
                                "training.offload_weights: false")
        with torch.no_grad():
            for key, target in wanted:
                tensor = self._handles[self._where[key]].get_tensor(key)
                if tensor.shape != target.shape:
                    raise UserError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, the model's config "
                                    f"says {tuple(target.shape)}", where=str(self.directory))
                target.copy_(tensor.to(dtype) if tensor.is_floating_point() else tensor)


def local_snapshot(source: str, revision: str | None) -> str:
    """A local directory of the model: ``source`` itself, or the hub cache's snapshot (as from_pretrained fetches)."""
    if Path(source).is_dir():
        return source
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, revision=revision, allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:  # offline, unknown id, private repo: all user-fixable
        raise UserError(f"could not fetch {source!r} for layer-wise loading ({type(exc).__name__})",
                        where="model.name_or_path", fix="download the model to a local directory") from None


def load_layerwise(recipe, source: str, device: str, dtype, park_layers, attn_implementation: str = "sdpa",
                   quantize_on: str | None = None, quant_storage=None):
    """The recipe's base read from its checkpoint layer by layer: NF4 for qlora, e4m3 for ``quant.base: fp8``, else
    ``dtype``; the ``park_layers`` parked in pinned host memory for streaming. Returns ``(model, fp8 handle or None)``.
    ``quantize_on``: the device a QLoRA layer is quantised on, when it is not ``device`` (FSDP2's low-memory load:
    built in host memory, quantised on the GPU one layer at a time, back to the host); ``quant_storage`` as
    :func:`quantize_linears_`."""
    import torch
    from transformers import AutoConfig

    directory = local_snapshot(source, recipe.model.revision)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=recipe.model.trust_remote_code)
    config.use_cache = False
    reader = CheckpointReader(directory)
    convert, fp8_handle = None, None
    if recipe.method == "qlora":
        compute = getattr(torch, recipe.quant.compute_dtype)
        def convert(layer):
            quantize_linears_(layer, quantize_on or device, compute_dtype=compute, quant_storage=quant_storage,
                              quant=recipe.quant)
            if quantize_on and quantize_on != device:
                layer.to(device)  # Params4bit.to moves the packed data and its QuantState
    elif recipe.quant.base == "fp8":
        from onecard.patch.handle import PatchHandle

        from onecard.patch.fp8 import fp8_layer_

        fp8_handle = PatchHandle(kernels="fp8-base")
        convert = lambda layer: fp8_handle.absorb(fp8_layer_(layer))  # noqa: E731
    model = build_layerwise(config, device, lambda module, prefix: reader.fill(module, prefix, dtype), convert,
                            park_layers, dtype=dtype, attn_implementation=attn_implementation)
    if recipe.method == "qlora":
        model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit (peft/tuners/lora/model.py)
    return model, fp8_handle


def quantize_linears_(module, device: str, compute_dtype=None, quant_storage=None, quant=None) -> None:
    """Replace every ``nn.Linear`` under ``module`` by a 4-bit ``bnb.nn.Linear4bit``: the recipe's ``quant``
    section (quant_type, double_quant), as ``onecard.train.model.quant_config`` gives them to transformers; without
    one, QLoRA's NF4 with double quantisation. bf16 compute unless ``compute_dtype``; ``quant_storage`` as
    bitsandbytes' (default uint8)."""
    import bitsandbytes as bnb
    import torch

    compute_dtype = compute_dtype or torch.bfloat16
    quant_type, double = ("nf4", True) if quant is None else (quant.quant_type, quant.double_quant)
    storage = {} if quant_storage is None else {"quant_storage": quant_storage}
    targets = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    for name, lin in targets:
        parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double, quant_type=quant_type,
                              device="meta", **storage)
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=double,
                                     quant_type=quant_type, module=q, **storage).to(device)  # .to() quantises on GPU
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, name.rsplit(".", 1)[-1], q)
        del lin

"""FP8 base weights: swap a model's frozen decoder-layer nn.Linear layers (under peft LoRA layers, or before peft
wraps them) for :class:`Fp8Linear`, with revert.

    handle = apply_fp8_base(model)      # quantises each frozen projection per output channel, frees its bf16 weight
    ...train the adapter...
    handle.revert()                     # nn.Linear again, with the dequantised (FP8-rounded) weights

Loading a checkpoint (train/model.py) uses :func:`fp8_layers_to_device` instead: host-loaded weights quantised one
decoder layer at a time on the device, before peft wraps them.

The LoRA layers stay peft's, in their own dtype, so the adapter saved is an ordinary peft adapter that loads on the
bf16 base. The LM head and embeddings stay in the model dtype (the fused cross-entropy reads the head; both are a
small share of the GEMM time). The RMSNorms whose outputs feed FP8 projections are marked to emit their row-wise
e4m3 copy (kernels/rms_norm.py), which onecard's fused LoRA ops read (patch/modules.py).
"""

from __future__ import annotations

import logging

import torch

from onecard.kernels.fp8 import Fp8Weight, fp8_linear

from .handle import PatchHandle

log = logging.getLogger("onecard.patch")
FP8_NORM_FLAG = "onecard_fp8_rows"  # on an RMSNorm module: emit the row-wise e4m3 copy of its output
MIN_COMPUTE_CAPABILITY = (8, 9)  # e4m3 tensor cores: Ada (8.9) and Hopper (9.0) and later


class Fp8Linear(torch.nn.Linear):
    """A frozen linear whose weight is e4m3 with per-output-channel fp32 scales (kernels/fp8.py).

    An nn.Linear subclass so peft wraps it as a LoRA Linear like any other; ``weight`` reads back the dequantised
    matrix (peft reads it to place adapters and for DoRA's norm; onecard's fused ops use ``fp8_weight``)."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = Fp8Weight.from_dense(linear.weight)
        self.register_buffer("weight_fp8", w.qdata)
        self.register_buffer("weight_scale", w.scale)
        self.compute_dtype = linear.weight.dtype
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self._fp8 = w

    @property
    def fp8_weight(self) -> Fp8Weight:
        w = self._fp8
        if self.weight_fp8.dtype != torch.float8_e4m3fn:
            raise RuntimeError(f"an Fp8Linear's weight was cast to {self.weight_fp8.dtype} (module.to(dtype)?): "
                               "FP8 base weights must stay float8_e4m3fn")
        if w.qdata is not self.weight_fp8 or w.scale is not self.weight_scale:  # moved (.to) or loaded
            self._fp8 = w = Fp8Weight(self.weight_fp8, self.weight_scale, self.compute_dtype)
        return w

    @property
    def weight(self) -> torch.Tensor:
        return self.fp8_weight.dequantize()

    def forward(self, x):
        return fp8_linear(x, self.fp8_weight, self.bias)

    def to_linear(self) -> torch.nn.Linear:
        out = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device=self.weight_fp8.device, dtype=self.compute_dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.requires_grad_(False)
        return out


EMULATE_ENV = "ONECARD_FP8_EMULATE"  # "1": let tests run an FP8 base on the CPU (fp32 emulation of the GEMMs)


def check_fp8_device(device: str | torch.device) -> None:
    """Refuse an FP8 base where there are no e4m3 tensor cores (compute capability < 8.9) or no CUDA at all.
    On the CPU only with ONECARD_FP8_EMULATE=1 (tests), and then said in one line."""
    import os

    from onecard.errors import UserError

    dev = torch.device(device)
    if dev.type == "cpu" and os.environ.get(EMULATE_ENV) == "1":
        log.warning("quant.base fp8 on the CPU: FP8 GEMMs emulated in fp32 (%s=1, tests only)", EMULATE_ENV)
        return
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise UserError("quant.base fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: RTX 40xx, "
                        "L4, L40S, H100, H200); this run is on the CPU", where="quant.base",
                        fix="train on such a GPU, or set quant.base: none")
    cc = torch.cuda.get_device_capability(dev)
    if tuple(cc) < MIN_COMPUTE_CAPABILITY:
        name = torch.cuda.get_device_name(dev)
        raise UserError(f"quant.base fp8 needs compute capability 8.9+ (FP8 tensor cores); {name} is "
                        f"{cc[0]}.{cc[1]}", where="quant.base", fix="set quant.base: none (bf16 base), or method qlora")


def _targets(root, in_layers_only: bool):
    """(parent, attribute name) of each frozen, exact nn.Linear inside a decoder layer (``layers.N.``; anywhere
    under ``root`` when not ``in_layers_only``: ``root`` is one decoder layer)."""
    found = []
    for name, module in root.named_modules():
        if (in_layers_only and ".layers." not in f".{name}.") or "lora_" in name:
            continue
        for child_name, child in module.named_children():
            if type(child) is torch.nn.Linear and not any(p.requires_grad for p in child.parameters()):
                found.append((module, child_name))
    return found


def _gemm_ready(linear: torch.nn.Linear) -> bool:
    """torch._scaled_mm needs both of W's dims divisible by 16 (the token count may be anything)."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def fp8_linears_(root, in_layers_only: bool = True) -> PatchHandle:
    """Replace every frozen decoder-layer nn.Linear under ``root`` by an :class:`Fp8Linear` (its bf16 weight is
    freed); returns the handle whose ``revert()`` puts nn.Linear layers with the dequantised weights back."""
    handle = PatchHandle(kernels="fp8-base")
    for parent, attr in _targets(root, in_layers_only):
        old = getattr(parent, attr)
        if not _gemm_ready(old):
            handle.patched["kept_bf16_not_multiple_of_16"] = handle.patched.get("kept_bf16_not_multiple_of_16", 0) + 1
            continue
        new = Fp8Linear(old)
        setattr(parent, attr, new)
        del old

        handle.add_undo(lambda parent=parent, attr=attr: _restore(parent, attr))
        handle.patched["fp8_linear"] = handle.patched.get("fp8_linear", 0) + 1
    _mark_norms(root, handle)
    return handle


def _restore(parent, attr: str) -> None:
    """Put an nn.Linear back where an Fp8Linear was swapped in, also when peft has wrapped it since (base_layer)."""
    current = getattr(parent, attr)
    if isinstance(current, Fp8Linear):
        setattr(parent, attr, current.to_linear())
    elif isinstance(getattr(current, "base_layer", None), Fp8Linear):
        current.base_layer = current.base_layer.to_linear()


def fp8_layer_(layer) -> PatchHandle:
    """One decoder layer's linears as frozen e4m3 Fp8Linear (per output channel), its bf16 weights freed."""
    layer.requires_grad_(False)  # the frozen base (peft freezes it too); fp8_linears_ swaps frozen layers only
    return fp8_linears_(layer, in_layers_only=False)


def fp8_layers_to_device(model, device) -> PatchHandle:
    """A model loaded on the host, moved to ``device`` one decoder layer at a time with its linears quantised there
    (per output channel), so the device never holds more than one bf16 layer: a 14B base loads into 24 GiB. The rest
    (embeddings, head, final norm) follows in the model dtype. Before peft wraps the model; one handle for all."""
    handle = PatchHandle(kernels="fp8-base")
    for layer in model.get_decoder().layers:
        layer.to(device)
        handle.absorb(fp8_layer_(layer))
    model.to(device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return handle


def _mark_norms(root, handle: PatchHandle) -> None:
    """Flag the norms whose output goes straight into FP8 q/k/v (input_layernorm) or gate/up (Gemma 2's
    pre_feedforward_layernorm, else post_attention_layernorm)."""
    for module in root.modules():
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if attn is None or mlp is None:
            continue
        mlp_norm = "pre_feedforward_layernorm" if hasattr(module, "pre_feedforward_layernorm") else \
            "post_attention_layernorm"
        for norm_name, proj in (("input_layernorm", getattr(attn, "q_proj", None)),
                                (mlp_norm, getattr(mlp, "gate_proj", None))):
            norm = getattr(module, norm_name, None)
            if norm is not None and isinstance(getattr(proj, "base_layer", proj), Fp8Linear):
                setattr(norm, FP8_NORM_FLAG, True)
                handle.add_undo(lambda norm=norm: norm.__dict__.pop(FP8_NORM_FLAG, None))


def block_linear_bytes(model) -> int:
    """Bytes of the frozen decoder-layer linear weights as held now: nn.Linear weights, or Fp8Linear's e4m3 codes
    and scales (what the FP8 target's "base weights <= 0.52x their bf16 bytes" compares)."""
    total = 0
    for name, module in model.named_modules():
        if ".layers." not in f".{name}." or "lora_" in name:
            continue
        if isinstance(module, Fp8Linear):
            total += module.weight_fp8.nbytes + module.weight_scale.nbytes
        elif type(module) is torch.nn.Linear and not module.weight.requires_grad:
            total += module.weight.nbytes
    return total


def apply_fp8_base(model) -> PatchHandle:
    """:func:`fp8_linears_` on a model (peft-wrapped or not); says in one line what it did."""
    handle = fp8_linears_(model)
    n = handle.patched.get("fp8_linear", 0)
    if n == 0:
        handle.notice = "quant.base fp8: no frozen decoder-layer nn.Linear found; the base stays as loaded"
        log.warning(handle.notice)
    else:
        log.info("quant.base fp8: %d frozen linears now e4m3 with per-output-channel scales", n)
    kept = handle.patched.get("kept_bf16_not_multiple_of_16", 0)
    if kept:
        line = f"quant.base fp8: {kept} linears kept in the model dtype (a dim not divisible by 16: torch._scaled_mm)"
        handle.notice = line if handle.notice is None else f"{handle.notice}; {line}"
        log.warning(line)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return handle

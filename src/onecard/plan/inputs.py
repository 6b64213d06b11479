"""Every recipe-to-number resolution of the planner: a validated recipe in, :class:`PlanInputs` (and the FLOPs of
a recipe) out. flops.py, memory.py and speed.py take these plain inputs and never read a recipe themselves.

``kernels: auto`` resolves against the *target* card of the plan (every catalog card is a CUDA card, so auto ->
onecard's kernels where onecard has them for the model family), never against the machine running ``onecard plan``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from onecard.catalog.families import family_for, kernels_for
from onecard.catalog.gpus import GPU, get_gpu
from onecard.catalog.models import ModelShape, resolve_shape
from onecard.plan.flops import FlopsBreakdown, flops_for_inputs
from onecard.versions import installed_version, version_tuple

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class PlanInputs:
    shape: ModelShape
    gpu: GPU
    method: str = "lora"              # lora | qlora | dora | full
    task: str = "sft"                 # sft | pretrain | dpo | kto
    seq_len: int = 2048
    micro_batch: int = 1              # per GPU
    grad_accum: int = 8
    rank: int = 16
    targets: tuple[str, ...] = ALL_TARGETS
    optimizer: str = "adamw_torch_fused"
    grad_ckpt: bool = True
    uncheckpointed_layers: int = 0    # the last N decoder layers not checkpointed (training.uncheckpointed_layers)
    offload_activations: bool = False
    kernels: str = "onecard"          # resolved: none | onecard | liger
    lora_dropout: float = 0.0         # adapter.dropout: above 0 onecard's fused attention/MLP give way to peft's
    fused_ce: bool = True             # chunked cross-entropy fused with the LM head
    attn: str = "sdpa"                # sdpa | flash_attention_2 | eager | flex_attention
    dtype_bytes: int = 2              # base weight dtype: bf16/fp16 = 2, fp32 = 4
    double_quant: bool = True
    # QLoRA: non-4-bit params (embeddings, norms, LM head) in fp32, as prepare_model_for_kbit_training leaves them.
    # onecard casts them back to bf16 on CUDA (train/model.py prepare_kbit); True describes plain transformers + peft.
    kbit_upcast: bool = False
    reference: str = "adapter-disabled"  # DPO/KTO: adapter-disabled (LoRA) | copy (full)
    num_gpus: int = 1
    hold_logits: bool = False         # the loop keeps ``outputs.logits`` alive through backward (onecard frees them)
    packed_example_tokens: int | None = None  # mean example length in packed rows (flops.varlen_span)
    quant_base: str = "none"          # "fp8": e4m3 block linears (plan/fp8.py), recipe quant.base
    offload_weights: str | bool = "auto"  # streamed base weights (plan/streaming.py): auto | True | False
    host_ram_gib: float | None = None  # host RAM planned for; None: plan/streaming.py DEFAULT_HOST_RAM_GIB
    cuda_graph: bool = False          # forward + backward replayed from one CUDA graph (training.cuda_graph)
    heldout_loss: bool = False        # the run scores a held-out split (eval.every_steps or eval.at_end)

    def __post_init__(self) -> None:
        # num_gpus > 1 is FSDP here, and onecard trains FSDP without its kernels (train/distributed_loop.py
        # kernels_for_strategy: the fused LoRA ops would read adapter weights FSDP keeps sharded).
        if self.num_gpus > 1 and self.kernels != "none":
            object.__setattr__(self, "kernels", "none")
            object.__setattr__(self, "fused_ce", False)

    def with_(self, **changes) -> "PlanInputs":
        return replace(self, **changes)

    def capped(self, cap_gib: float | None) -> "PlanInputs":
        """The same plan on a card of ``cap_gib`` (``--memory-cap-gib``), when that is smaller than the card."""
        if cap_gib is None or cap_gib >= self.gpu.memory_gib:
            return self
        return replace(self, gpu=replace(self.gpu, memory_gib=cap_gib))

    @property
    def split_halves(self) -> bool:
        """Offloaded checkpoints of a family onecard's kernels patch whole (catalog/families.py ``decoder_class``)
        are taken per half-layer, attention and MLP (patch/blocks.py): two offloaded inputs per layer, one half
        recomputed at a time, and the attention half's recompute ends before the o projection."""
        return takes_split_halves(self.shape, self.kernels, self.offload_activations, self.grad_ckpt)

    @property
    def recomputed_layers(self) -> int:
        """Decoder layers a checkpoint recomputes in backward: all under grad_ckpt but the uncheckpointed last ones."""
        return max(0, self.shape.num_hidden_layers - self.uncheckpointed_layers) if self.grad_ckpt else 0

    @property
    def is_adapter(self) -> bool:
        return self.method in ("lora", "qlora", "dora")

    @property
    def tokens_per_micro_batch(self) -> int:
        """Tokens through the trained forward per micro-batch: DPO runs chosen and rejected (two sequences)."""
        return self.micro_batch * self.seq_len * (2 if self.task == "dpo" else 1)


def planned_kernels(kernels: str, shape: ModelShape) -> str:
    """auto -> onecard on the target card (all catalog cards are CUDA) when the family has kernels, else none."""
    if kernels != "auto":
        return kernels
    return "onecard" if kernels_for(shape.model_type) is not None else "none"


def planned_attention(attn: str, shape: ModelShape) -> str:
    """What ``model.attn_implementation`` will run: ``auto`` is SDPA, or eager for a family whose class has no SDPA
    path in the installed transformers (catalog/families.py ``no_sdpa_since``; the loader decides the same,
    train/model.py resolve_attn). Read from the installed package's metadata: transformers is not imported."""
    if attn != "auto":
        return attn
    family = family_for(shape.model_type)
    since = family.no_sdpa_since if family is not None else None
    if since is None:
        return "sdpa"
    installed = installed_transformers()  # not installed here: plan for the newest
    return "eager" if installed is None or version_tuple(installed) >= version_tuple(since) else "sdpa"


@functools.lru_cache(maxsize=1)
def installed_transformers() -> str | None:
    return installed_version("transformers")


def resolve_fused_ce(fused_ce, kernels: str) -> bool:
    return kernels in ("onecard", "liger") if fused_ce == "auto" else bool(fused_ce)


def lora_targets(target_modules) -> tuple[str, ...]:
    """The LoRA targets in :class:`ModelShape`'s names. ``auto`` is every family's table in catalog/families.py:
    all linear layers of the decoder block, which a ModelShape spells Llama's way (q/k/v/o, gate/up/down; Phi-3's
    fused qkv_proj and gate_up_proj are the same weights), so all seven."""
    if target_modules in ("auto", "all-linear") or target_modules is None:
        return ALL_TARGETS
    return tuple(str(t) for t in target_modules)


def effective_seq_len(recipe) -> int:
    """Positions per sequence: seq_len when packing, else the mean example length (capped at seq_len) if known."""
    seq = recipe.data.seq_len
    mean = recipe.data.mean_tokens_per_example
    if recipe.data.packing or not mean:
        return seq
    return max(1, min(seq, int(round(mean))))


def packed_example_tokens(recipe) -> int | None:
    """The example length inside packed rows, for ``flops.varlen_span``; None without packing or a known mean."""
    data = recipe.data
    if not data.packing or not data.mean_tokens_per_example:
        return None
    return max(1, min(data.seq_len, int(round(data.mean_tokens_per_example))))


def inputs_from_recipe(recipe, gpu: str | None = None, shape: ModelShape | None = None) -> PlanInputs:
    """PlanInputs from a validated :class:`onecard.recipe.Recipe` (the planner reads nothing else)."""
    shape = shape or resolve_shape(recipe.model.name_or_path)
    card = get_gpu(gpu or recipe.plan.gpu)
    t = recipe.training
    kernels = planned_kernels(t.kernels, shape)
    if recipe.task in ("dpo", "kto"):
        # onecard's preference step needs per-sequence log-probs from full logits, which the fused linear-CE
        # loss does not give: it runs on plain transformers modules (train/preference.py), so plan it so.
        kernels = "none"
    attn = planned_attention(recipe.model.attn_implementation, shape)
    reference = recipe.preference.reference
    if reference == "auto":
        reference = "adapter-disabled" if recipe.is_adapter else "copy"
    return PlanInputs(
        shape=shape, gpu=card, method=recipe.method, task=recipe.task, seq_len=recipe.data.seq_len,
        micro_batch=t.micro_batch_size, grad_accum=t.grad_accum, rank=recipe.adapter.rank,
        targets=lora_targets(recipe.adapter.target_modules), optimizer=t.optimizer, grad_ckpt=t.grad_ckpt,
        uncheckpointed_layers=t.uncheckpointed_layers, offload_activations=t.offload_activations, kernels=kernels,
        lora_dropout=recipe.adapter.dropout if recipe.is_adapter else 0.0,
        fused_ce=resolve_fused_ce(t.fused_ce, kernels),
        attn=attn, dtype_bytes=4 if recipe.model.dtype == "float32" else 2,
        double_quant=recipe.quant.double_quant, reference=reference, num_gpus=t.num_gpus,
        packed_example_tokens=packed_example_tokens(recipe), quant_base=recipe.quant.base,
        offload_weights=t.offload_weights,
        host_ram_gib=recipe.plan.host_ram_gib, cuda_graph=t.cuda_graph,
        heldout_loss=bool(recipe.eval.every_steps or recipe.eval.at_end) and recipe.has_eval_data,
    )


def flops_for_recipe(recipe, shape: ModelShape | None = None, *, grad_ckpt: bool | None = None,
                     method: str | None = None) -> FlopsBreakdown:
    """The FLOPs per token of what the recipe really runs (the same inputs as its plan: kernels as resolved, off
    for DPO/KTO and under FSDP, split halves) at its effective sequence length; ``method`` / ``grad_ckpt`` override
    for what-ifs."""
    inp = inputs_from_recipe(recipe, shape=shape)
    return flops_for_inputs(inp, seq_len=effective_seq_len(recipe), grad_ckpt=grad_ckpt, method=method)


def takes_split_halves(shape, kernels: str, offload_activations: bool, grad_ckpt: bool) -> bool:
    """See :attr:`PlanInputs.split_halves`; also for measured rows (plan/speed.py)."""
    if not (offload_activations and grad_ckpt and kernels == "onecard"):
        return False
    spec = kernels_for(shape.model_type)
    return spec is not None and spec.decoder_class is not None

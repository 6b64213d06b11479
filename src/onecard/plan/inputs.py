"""What the memory planner needs to know, resolved from a recipe or from command-line arguments.

``kernels: auto`` resolves against the *target* card of the plan (every catalog card is a CUDA card, so auto ->
onecard's kernels where onecard has them for the model family), never against the machine running ``onecard plan``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from onecard.catalog.gpus import GPU, get_gpu
from onecard.catalog.models import ModelShape, resolve_shape
from onecard.plan.flops import packed_example_tokens

# Families onecard's fused kernels patch (issue 6: Llama, Mistral, Qwen2, Gemma, Gemma 2); others fall back to none.
KERNEL_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2")
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
    offload_activations: bool = False
    kernels: str = "onecard"          # resolved: none | onecard | liger
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
    offload_weights: str | bool = "auto"  # streamed base weights (plan/streaming.py): auto | True | False
    host_ram_gib: float | None = None  # host RAM planned for; None: plan/streaming.py DEFAULT_HOST_RAM_GIB

    def __post_init__(self) -> None:
        # num_gpus > 1 is FSDP here, and onecard trains FSDP without its kernels (train/distributed_loop.py
        # kernels_for_strategy: the fused LoRA ops would read adapter weights FSDP keeps sharded).
        if self.num_gpus > 1 and self.kernels != "none":
            object.__setattr__(self, "kernels", "none")
            object.__setattr__(self, "fused_ce", False)

    def with_(self, **changes) -> "PlanInputs":
        return replace(self, **changes)

    @property
    def split_halves(self) -> bool:
        """Offloaded checkpoints of a family onecard's kernels patch whole (patch/families.py ``decoder_class``) are
        taken per half-layer, attention and MLP (patch/blocks.py): two offloaded inputs per layer, one half
        recomputed at a time, and the attention half's recompute ends before the o projection."""
        if not (self.offload_activations and self.grad_ckpt and self.kernels == "onecard"):
            return False
        from onecard.patch.families import FAMILY_KERNELS  # pure data, no torch

        spec = FAMILY_KERNELS.get(self.shape.model_type)
        return spec is not None and spec.decoder_class is not None

    @property
    def is_adapter(self) -> bool:
        return self.method in ("lora", "qlora", "dora")

    @property
    def tokens_per_micro_batch(self) -> int:
        """Tokens through the trained forward per micro-batch: DPO runs chosen and rejected (two sequences)."""
        return self.micro_batch * self.seq_len * (2 if self.task == "dpo" else 1)


def resolve_kernels(kernels: str, shape: ModelShape, gpu: GPU | None = None) -> str:
    """auto -> onecard on the target card (all catalog cards are CUDA) when the family has kernels, else none."""
    if kernels != "auto":
        return kernels
    return "onecard" if shape.model_type in KERNEL_FAMILIES else "none"


def resolve_fused_ce(fused_ce, kernels: str) -> bool:
    return kernels in ("onecard", "liger") if fused_ce == "auto" else bool(fused_ce)


def _targets(target_modules) -> tuple[str, ...]:
    if target_modules == "auto" or target_modules is None:
        return ALL_TARGETS
    return tuple(str(t) for t in target_modules)


def inputs_from_recipe(recipe, gpu: str | None = None, shape: ModelShape | None = None) -> PlanInputs:
    """PlanInputs from a validated :class:`onecard.recipe.Recipe` (the planner reads nothing else)."""
    shape = shape or resolve_shape(recipe.model.name_or_path)
    card = get_gpu(gpu or recipe.plan.gpu)
    t = recipe.training
    kernels = resolve_kernels(t.kernels, shape, card)
    if recipe.task in ("dpo", "kto"):
        # onecard's preference step needs per-sequence log-probs from full logits, which the fused linear-CE
        # loss does not give: it runs on plain transformers modules (train/preference.py), so plan it so.
        kernels = "none"
    attn = recipe.model.attn_implementation
    reference = recipe.preference.reference
    if reference == "auto":
        reference = "adapter-disabled" if recipe.is_adapter else "copy"
    return PlanInputs(
        shape=shape, gpu=card, method=recipe.method, task=recipe.task, seq_len=recipe.data.seq_len,
        micro_batch=t.micro_batch_size, grad_accum=t.grad_accum, rank=recipe.adapter.rank,
        targets=_targets(recipe.adapter.target_modules), optimizer=t.optimizer, grad_ckpt=t.grad_ckpt,
        offload_activations=t.offload_activations, kernels=kernels, fused_ce=resolve_fused_ce(t.fused_ce, kernels),
        attn="sdpa" if attn == "auto" else attn, dtype_bytes=4 if recipe.model.dtype == "float32" else 2,
        double_quant=recipe.quant.double_quant, reference=reference, num_gpus=t.num_gpus,
        packed_example_tokens=packed_example_tokens(recipe), offload_weights=t.offload_weights,
        host_ram_gib=recipe.plan.host_ram_gib,
    )

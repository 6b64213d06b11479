"""One benchmark configuration, and the recipe it stands for.

A configuration is the handful of knobs that move memory and speed (model, method, sequence, micro-batch, rank,
checkpointing, kernels); everything else is the recipe schema's default. ``to_recipe`` goes through the same
validation as a recipe file, so a bench row measures exactly what ``onecard train`` would run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from onecard.errors import UserError

METHODS = ("lora", "qlora", "dora", "full")
KERNELS = ("none", "onecard", "liger", "auto")
QUANT_BASES = ("none", "fp8")


@dataclass
class BenchConfig:
    model: str                      # preset id (llama-3-8b), local model directory, or "tiny" (CPU tests)
    method: str = "lora"
    seq: int = 2048
    micro_batch: int = 1
    rank: int = 16
    grad_ckpt: bool = True
    uncheckpointed_layers: int = 0  # the last N layers without checkpoints (recipe training.uncheckpointed_layers)
    kernels: str = "none"
    offload_activations: bool = False  # checkpoints in pinned host memory (patch/offload.py); needs grad_ckpt
    quant_base: str = "none"        # "fp8": e4m3 frozen base (recipe quant.base; patch/fp8.py), lora/dora only
    offload_weights: bool = False   # frozen base weights streamed from pinned host memory (patch/stream_weights.py)
    resident_layers: int = 0        # with offload_weights: N decoder layers stay on the GPU (spread, streamed_layer_ids)
    cuda_graph: bool = False        # forward + backward replayed from one CUDA graph (train/graphed_step.py)
    steps: int = 4                  # timed optimizer steps
    warmup: int = 2                 # untimed steps first (allocator, autotuning, optimizer state)
    baseline: bool = False          # also run plain transformers + peft, same process
    memory_cap_gib: float | None = None
    gpu: str = "h200"               # catalog id the prediction is made for (the card measured on)
    group: str = ""                 # suite bookkeeping: matrix / throughput / claims
    name: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}", where="--method", fix=f"use one of {METHODS}")
        if self.kernels not in KERNELS:
            raise UserError(f"unknown kernels {self.kernels!r}", where="--kernels", fix=f"use one of {KERNELS}")
        for key in ("seq", "micro_batch", "rank", "steps"):
            if int(getattr(self, key)) < 1:
                raise UserError(f"{key} must be at least 1", where=f"--{key.replace('_', '-')}")
        if self.quant_base not in QUANT_BASES:
            raise UserError(f"unknown quant_base {self.quant_base!r}", where="--quant-base", fix=f"use one of {QUANT_BASES}")
        if self.quant_base == "fp8" and self.method not in ("lora", "dora"):
            raise UserError(f"an FP8 base is for lora or dora, not {self.method}", where="--quant-base",
                            fix="use --method lora, or drop --quant-base")
        if self.warmup < 0:
            raise UserError("warmup must be >= 0", where="--warmup")
        if self.offload_weights and not self.grad_ckpt:
            raise UserError("--offload-weights streams each layer's weights per use: it needs checkpointing",
                            where="--offload-weights", fix="drop --no-grad-ckpt, or drop --offload-weights")
        if self.uncheckpointed_layers < 0 or (self.uncheckpointed_layers and not self.grad_ckpt):
            raise UserError("--uncheckpointed-layers leaves checkpointed layers out: it needs checkpointing and a "
                            "count >= 0", where="--uncheckpointed-layers", fix="drop --no-grad-ckpt, or use 0")
        if self.uncheckpointed_layers and self.offload_weights:
            raise UserError("a layer whose base weights stream must be checkpointed", where="--uncheckpointed-layers",
                            fix="drop --uncheckpointed-layers, or drop --offload-weights")
        if self.cuda_graph and (self.offload_activations or self.offload_weights):
            raise UserError("a CUDA graph cannot hold host copies: offloaded checkpoints and streamed weights copy "
                            "to and from host memory during the step", where="--cuda-graph",
                            fix="drop --offload-activations and --offload-weights, or drop --cuda-graph")
        if self.cuda_graph and self.kernels == "none":
            raise UserError("a CUDA graph records the patched model's loss (fused linear-CE); the unpatched loss "
                            "counts tokens on the host, which a graph cannot", where="--cuda-graph",
                            fix="add --kernels onecard, or drop --cuda-graph")
        if self.offload_activations and not self.grad_ckpt:
            raise UserError("--offload-activations offloads the checkpointed layers' inputs: it needs checkpointing",
                            where="--offload-activations", fix="drop --no-grad-ckpt, or drop --offload-activations")

    @classmethod
    def from_dict(cls, data: dict[str, Any], defaults: dict[str, Any] | None = None) -> "BenchConfig":
        merged = {**(defaults or {}), **data}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise UserError(f"unknown bench field(s) {', '.join(unknown)}", where="suite",
                            fix=f"use: {', '.join(sorted(known))}")
        return cls(**merged)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.micro_batch

    def label(self) -> str:
        ck = ("ckpt+offload" if self.offload_activations else "ckpt") if self.grad_ckpt else "no-ckpt"
        if self.uncheckpointed_layers:
            ck += f"(last{self.uncheckpointed_layers}-not)"
        base = " fp8-base" if self.quant_base == "fp8" else ""
        stream = f" stream-weights(res{self.resident_layers})" if self.offload_weights else ""
        graph = " cuda-graph" if self.cuda_graph else ""
        return self.name or (f"{self.model} {self.method}{base} r{self.rank} seq{self.seq} b{self.micro_batch} {ck} "
                             f"{self.kernels}{stream}{graph}")

    def command(self) -> str:
        """The single-configuration command line that reproduces this row."""
        parts = ["onecard bench", f"--model {self.model}", f"--method {self.method}", f"--seq {self.seq}",
                 f"--batch {self.micro_batch}", f"--rank {self.rank}",
                 "--grad-ckpt" if self.grad_ckpt else "--no-grad-ckpt", f"--kernels {self.kernels}",
                 f"--steps {self.steps}", f"--warmup {self.warmup}"]
        if self.uncheckpointed_layers:
            parts.append(f"--uncheckpointed-layers {self.uncheckpointed_layers}")
        if self.offload_activations:
            parts.append("--offload-activations")
        if self.quant_base != "none":
            parts.append(f"--quant-base {self.quant_base}")
        if self.offload_weights:
            parts.append(f"--offload-weights --resident-layers {self.resident_layers}")
        if self.cuda_graph:
            parts.append("--cuda-graph")
        if self.baseline:
            parts.append("--baseline")
        if self.memory_cap_gib:
            parts.append(f"--memory-cap-gib {self.memory_cap_gib:g}")
        return " ".join(parts) + " --json"

    def recipe_tree(self) -> dict[str, Any]:
        fused = self.kernels in ("onecard", "liger", "auto")
        return {
            "name": "bench",
            "model": {"name_or_path": self.model, "dtype": "auto"},  # bf16 on CUDA, fp32 on CPU
            "method": self.method,
            "adapter": {"rank": self.rank},
            "quant": {"base": self.quant_base},
            "data": {"seq_len": self.seq},
            "training": {"micro_batch_size": self.micro_batch, "grad_accum": 1, "grad_ckpt": self.grad_ckpt,
                         "uncheckpointed_layers": self.uncheckpointed_layers,
                         "offload_activations": self.offload_activations,
                         "offload_weights": self.offload_weights, "kernels": self.kernels, "fused_ce": fused,
                         "optimizer": "adamw_torch_fused", "cuda_graph": self.cuda_graph},
            "plan": {"gpu": self.gpu},
        }

    def to_recipe(self):
        from onecard.recipe import validate_recipe

        return validate_recipe(self.recipe_tree())


def config_from_recipe(recipe, **overrides) -> BenchConfig:
    """A bench configuration measuring what a recipe would train (one micro-batch at the recipe's seq_len)."""
    t = recipe.training
    kernels = t.kernels if t.kernels != "auto" else "onecard"
    base = dict(model=recipe.model.name_or_path, method=recipe.method, seq=recipe.data.seq_len,
                micro_batch=t.micro_batch_size, rank=recipe.adapter.rank, grad_ckpt=t.grad_ckpt, kernels=kernels,
                uncheckpointed_layers=t.uncheckpointed_layers if t.grad_ckpt else 0,
                offload_activations=t.offload_activations and t.grad_ckpt, gpu=recipe.plan.gpu,
                quant_base=recipe.quant.base, cuda_graph=t.cuda_graph)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(**base)

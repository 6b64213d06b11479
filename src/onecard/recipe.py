"""The recipe: one YAML file, one pydantic schema (``extra="forbid"`` everywhere).

Every command that takes a recipe goes through :func:`load_recipe`, which applies ``--set a.b=value``
overrides *before* validation, so overrides are checked exactly like the file. Validation errors are
turned into a :class:`~onecard.errors.UserError` naming the file, line, field path and allowed values.

No torch import here: ``onecard plan`` must answer in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from onecard.errors import UserError

Method = Literal["lora", "qlora", "dora", "full"]
Task = Literal["sft", "pretrain", "dpo", "kto"]
Optimizer = Literal["adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adamw_cpu_offload"]
Kernels = Literal["auto", "none", "liger", "onecard"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Strict):
    name_or_path: str = Field(description="Local HF directory, hub id, .gguf file, or a shape preset (llama-3-8b, ...).")
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto", description="auto = bfloat16 on GPU, float32 on CPU. float16 is refused for the Llama 3 family."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="Allow loading .bin/.pt pickled weights (can run arbitrary code).")
    revision: str | None = None


class AdapterSection(_Strict):
    rank: int = Field(16, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default 2 x rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout. Above 0, onecard's fused attention "
                           "and MLP do not apply (peft's modules run them).")
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        "auto", description="auto = the family's published targets; all-linear = every linear layer of the blocks "
                            "(peft's idiom, the LM head left out); or a list of module names, e.g. [q_proj, v_proj].")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_target_form(cls, value):
        if value in ("auto", "all-linear") or (isinstance(value, list) and value
                                                and all(isinstance(v, str) and v for v in value)):
            return value
        raise ValueError(f"use 'auto', 'all-linear' or a non-empty list of module names like [q_proj, v_proj], "
                         f"not {value!r}")
    init_adapter: str | None = Field(None, description="Run directory or adapter dir to continue from (e.g. SFT -> DPO).")

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


class QuantSection(_Strict):
    """How the frozen base is stored: QLoRA's bitsandbytes 4-bit settings, or an FP8 base for lora/dora."""

    base: Literal["none", "fp8"] = Field(
        "none", description="fp8: the frozen decoder-layer linears are quantised to e4m3 at load (per output "
        "channel) and their GEMMs run in FP8; needs compute capability 8.9+ (RTX 40xx, L4, L40S, H100, H200). "
        "With method lora or dora. none: the model dtype (qlora: NF4/FP4 below).")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"


ChatTemplate = Literal["auto", "chatml", "llama-3", "mistral-v3", "mistral-tekken", "qwen2", "qwen2.5", "gemma-2",
                       "phi-3", "alpaca"]  # the keys of onecard.data.templates.BUILTIN_TEMPLATES
MappedColumn = Literal["messages", "role", "content", "instruction", "input", "output", "system", "text", "prompt",
                       "chosen", "rejected", "completion", "label"]  # onecard.data.mapping.COLUMNS


class DataSection(_Strict):
    path: str | None = Field(None, description="A JSONL/JSON/Parquet/CSV file; a directory written by datasets' "
                             "save_to_disk, or of Parquet/Arrow files; or hub:owner/name (through datasets' cache). "
                             "May be omitted only for planning.")
    format: Literal["auto", "chat", "sharegpt", "alpaca", "text", "dpo", "kto"] = "auto"
    columns: dict[MappedColumn, str] = Field(default_factory=dict, description="onecard's field name -> the "
                                             "source's, e.g. {output: response, messages: dialog, role: speaker}.")
    roles: dict[str, Literal["user", "assistant", "system", "tool"]] = Field(
        default_factory=dict, description="A source role or ShareGPT speaker name -> onecard's, e.g. {bot: assistant}.")
    split: str = Field("train", description="The split of a hub id or of a save_to_disk DatasetDict.")
    revision: str | None = Field(None, description="Branch, tag or commit of a hub: dataset.")
    chat_template: ChatTemplate = Field(
        "auto", description="auto = the tokenizer's own template, else chatml; or a built-in by name."
    )
    seq_len: int = Field(2048, ge=8, le=1_048_576)
    packing: bool = False
    eval_path: str | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    shuffle: bool = True
    # For planning when no data file is given (time and cost estimates).
    num_examples: int | None = Field(None, ge=1)
    mean_tokens_per_example: float | None = Field(None, gt=0)


class TrainingSection(_Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (transformers' default, 1).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate; must be positive.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    warmup_steps: int | None = Field(None, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: Optimizer = "adamw_torch_fused"
    grad_ckpt: bool = True
    uncheckpointed_layers: int = Field(
        0, ge=0, description="The last N decoder layers trained without activation checkpoints: their activations "
        "stay on the GPU and backward does not recompute them -- faster where memory allows (onecard plan shows the "
        "memory). 0 = every layer checkpointed. Needs grad_ckpt; not with streamed base weights.")
    offload_activations: bool = False
    cuda_graph: bool = Field(
        False, description="Record one micro-batch's forward and backward as a CUDA graph and replay it each "
        "micro-batch (train/graphed_step.py): the host's speed drops out of a host-bound step (an FP8 base at a "
        "small micro-batch). Micro-batches are padded to data.seq_len. SFT/pretrain, onecard kernels, no packing, "
        "no offloaded checkpoints or streamed weights.")
    offload_weights: Literal["auto"] | bool = Field(
        "auto", description="Stream the frozen base weights of the decoder layers from pinned host memory "
        "(patch/stream_weights.py). auto = only when the plan does not fit the GPU otherwise; a no-op on CPU.")
    kernels: Kernels = Field("auto", description="auto = onecard's fused kernels on CUDA, none on CPU.")
    fused_ce: Literal["auto"] | bool = Field("auto", description="Chunked cross-entropy fused with the LM head.")
    seed: int = 42
    deterministic: bool = Field(False, description="Deterministic CUDA kernels (transformers' enable_full_determinism): "
                                "two runs, or a run and its resume, give the same numbers on the GPU; slower. The "
                                "CPU is deterministic either way.")
    save_every_steps: int = Field(0, ge=0, description="Checkpoint every N steps too (0 = by time only).")
    save_every_minutes: float = Field(30.0, ge=0, description="Checkpoint after this many minutes of training since "
                                      "the last one (0 = off). SIGINT/SIGTERM always save.")
    grad_norm_blowup: float | None = Field(100.0, gt=1, description="Stop when the gradient norm exceeds this "
                                           "multiple of its recent median (null = off). NaN/inf always stop.")
    log_every_steps: int = Field(1, ge=1)
    num_gpus: int = Field(1, ge=1, description="GPUs to train on (and to plan for).")


class PreferenceSection(_Strict):
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    reference: Literal["auto", "adapter-disabled", "copy"] = "auto"
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    max_prompt_len: int | None = Field(None, ge=1)


class EvalSection(_Strict):
    path: str | None = None
    every_steps: int = Field(0, ge=0)
    at_end: bool = False
    max_new_tokens: int = Field(64, ge=1)
    max_examples: int | None = Field(None, ge=1)


class PlanSection(_Strict):
    """What the recipe is planned against (not the machine running onecard)."""

    gpu: str = Field("rtx4090", description="Catalog id of the card to plan for (onecard gpus).")
    deadline_hours: float | None = Field(None, gt=0)
    host_ram_gib: float | None = Field(None, gt=0, description="Host RAM of the machine planned for (pinned "
                                       "weights and checkpoints); default 64 GiB, a typical RTX 4090 box.")


class LintSection(_Strict):
    ignore: list[str] = Field(default_factory=list, description="Lint rule ids that do not stop onecard train "
                              "(printed still), e.g. [does-not-fit] for a card the planner misjudges.")


class WandbSection(_Strict):
    """Weights & Biases (``pip install 'onecard[wandb]'``); unset fields take wandb's own defaults and variables."""

    project: str | None = Field(None, description="W&B project; default WANDB_PROJECT, else wandb's own.")
    entity: str | None = Field(None, description="Team or user; default WANDB_ENTITY, else your default entity.")
    name: str | None = Field(None, description="Run display name; default the recipe's name.")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="offline: write to the local wandb dir only (wandb sync uploads it later); "
        "default WANDB_MODE, else online.")
    tags: list[str] = Field(default_factory=list)
    group: str | None = None
    notes: str | None = None
    dir: str | None = Field(None, description="Where wandb writes its local files; default WANDB_DIR, else ./wandb.")


class MlflowSection(_Strict):
    """MLflow (``pip install 'onecard[mlflow]'``, mlflow-skinny: a tracking server or a file: store)."""

    tracking_uri: str | None = Field(None, description="http(s)://server, databricks, or file:/path (MLflow wants "
                                     "MLFLOW_ALLOW_FILE_STORE=true for that); default MLFLOW_TRACKING_URI.")
    experiment: str | None = Field(None, description="Experiment name, created when missing; default "
                                   "MLFLOW_EXPERIMENT_NAME, else Default.")
    run_name: str | None = Field(None, description="Default the recipe's name.")
    tags: dict[str, str] = Field(default_factory=dict)


class LoggingSection(_Strict):
    """Where the metrics of metrics.jsonl also go (same names, same steps); metrics.jsonl is always written."""

    tensorboard: bool = Field(True, description="TensorBoard event files under <run_dir>/tb.")
    wandb: WandbSection | None = Field(None, description="Set (even to {}) to log to Weights & Biases.")
    mlflow: MlflowSection | None = Field(None, description="Set (even to {}) to log to MLflow.")


class Recipe(_Strict):
    name: str = "run"
    model: ModelSection
    method: Method = "lora"
    task: Task = "sft"
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    quant: QuantSection = Field(default_factory=QuantSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    plan: PlanSection = Field(default_factory=PlanSection)
    lint: LintSection = Field(default_factory=LintSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    output_dir: str = "runs/{name}"

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "Recipe":
        if self.task in ("dpo", "kto") and self.data.format not in ("auto", self.task):
            raise ValueError(f"task {self.task!r} needs data.format {self.task!r} or 'auto', not {self.data.format!r}")
        if self.method == "full" and self.adapter.init_adapter:
            raise ValueError("adapter.init_adapter continues an adapter; it cannot be combined with method 'full'")
        if self.training.uncheckpointed_layers and not self.training.grad_ckpt:
            raise ValueError("training.uncheckpointed_layers leaves layers out of the activation checkpoints, but "
                             "training.grad_ckpt is false (no layer is checkpointed): set grad_ckpt: true, or "
                             "uncheckpointed_layers: 0")
        if self.quant.base == "fp8" and self.method not in ("lora", "dora"):
            raise ValueError(f"quant.base fp8 is for method lora or dora (a frozen base), not {self.method!r}: "
                             "set method: lora, or quant.base: none")
        return self

    @property
    def is_adapter(self) -> bool:
        return self.method in ("lora", "qlora", "dora")

    @property
    def has_eval_data(self) -> bool:
        """A held-out split exists: its own file (eval.path, data.eval_path) or a fraction of the training data."""
        return bool(self.eval.path or self.data.eval_path or self.data.eval_fraction > 0)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))


# --------------------------------------------------------------------------- loading


def set_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` to a nested dict; the value is parsed as YAML (``1e-4``, ``true``, ``[q_proj]``)."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r} has no '='", where="--set", fix="write --set section.field=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {assignment!r} names no field", where="--set", fix="write --set section.field=value")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{'.'.join(parts)}: {part!r} is a value, not a section", where="--set")
        node = child
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _looks_like_float(raw):
        value = float(raw)  # YAML 1.1 reads "1e-4" as a string
    node[parts[-1]] = value


def _looks_like_float(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return raw.strip().lower() not in ("inf", "-inf", "nan")


def validate_recipe(tree: dict[str, Any], *, source: Path | None = None, text: str | None = None,
                    overrides: list[str] | None = None) -> Recipe:
    from onecard.recipe_errors import validation_error

    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise validation_error(exc, Recipe, source, text, overrides or []) from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> Recipe:
    """Read a recipe file (or start from ``base``), apply ``--set`` overrides, validate."""
    tree: dict[str, Any] = dict(base or {})
    text = None
    source = Path(path) if path else None
    if source is not None:
        if not source.is_file():
            raise UserError("recipe file not found", where=str(source), fix="check the path")
        try:
            text = source.read_text(encoding="utf-8")
            loaded = yaml.safe_load(text)
        except UnicodeDecodeError:
            raise UserError("recipe is not UTF-8 text", where=str(source), fix="save it as UTF-8") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else str(source)
            raise UserError(f"not valid YAML: {getattr(exc, 'problem', exc)}", where=where) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError("a recipe must be a YAML mapping (field: value)", where=str(source))
        tree.update(loaded)
    for assignment in overrides or []:
        set_override(tree, assignment)
    return validate_recipe(tree, source=source, text=text, overrides=overrides)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def resolve_reference(recipe: Recipe) -> str:
    """The DPO/KTO reference policy ``preference.reference`` resolves to: ``auto`` is the adapter switched off (or
    the starting adapter, loaded a second time, when training from one), and a frozen copy for full fine-tuning."""
    choice = recipe.preference.reference
    if choice == "auto":
        if not recipe.is_adapter:
            return "copy"
        return "named-adapter" if recipe.adapter.init_adapter else "adapter-disabled"
    if choice == "adapter-disabled" and not recipe.is_adapter:
        raise UserError("preference.reference 'adapter-disabled' needs an adapter method; with method 'full' there "
                        "is no adapter to switch off", where="preference.reference",
                        fix="use reference: copy (or auto) for full fine-tuning, or method: lora")
    return choice

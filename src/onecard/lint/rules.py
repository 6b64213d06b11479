"""The lint rules. Each is ``rule(ctx) -> list[Finding]`` and says why in one line and how to fix it."""

from __future__ import annotations

from pathlib import Path

from onecard.catalog.families import FAMILIES, family_for, is_llama3
from onecard.lint.context import LintContext
from onecard.lint.cuda_graph import cuda_graph
from onecard.lint.findings import FLASH_ATTN_MIN, Finding
from onecard.lint.fp8 import fp8_base_gpu, fp8_base_quality
from onecard.versions import version_tuple


def does_not_fit(ctx: LintContext) -> list[Finding]:
    plan = ctx.plan()
    if plan is None or plan.verdict == "fits":
        return []
    from onecard.plan.memory import GIB
    from onecard.plan.suggest import suggest_fixes

    sp = ctx.stream_plan  # training.offload_weights streams what does not fit
    if sp is not None:
        return [Finding("streams-weights", "info", f"fits with streaming: {sp.device_bytes / GIB:.1f} of "
                        f"{plan.capacity_bytes / GIB:.1f} GiB on {plan.inputs.gpu.id}, the base weights of "
                        f"{sp.streamed_layers} layers from {sp.host_total_bytes / GIB:.1f} GiB of pinned host memory",
                        f"the whole plan needs {plan.total_bytes / GIB:.1f} GiB; training.offload_weights streams "
                        "the rest (slower where the copies do not hide: onecard plan shows by how much)",
                        fix="none needed; training.offload_weights: false refuses to stream")]
    fixes = suggest_fixes(plan)
    fix = "; or ".join(f"{s.change} ({s.total_bytes / GIB:.1f} GiB)" for s in fixes[:2]) or "a larger card"
    total = f"{plan.total_bytes / GIB:.1f} of {plan.capacity_bytes / GIB:.1f} GiB on {plan.inputs.gpu.id}"
    if plan.verdict == "tight":
        return [Finding("tight-fit", "warning", f"predicted peak memory is within 5% of the card ({total})",
                        "estimates carry error; a run this close may OOM at step 1 or mid-run on a long batch",
                        fix="see onecard plan; a smaller micro-batch with more accumulation gives headroom")]
    return [Finding("does-not-fit", "error", f"predicted not to fit: {total}",
                    "the run would stop with CUDA out-of-memory", fix=fix)]


def qlora_optimizer(ctx: LintContext) -> list[Finding]:
    r = ctx.recipe
    if r.method != "qlora" or r.training.optimizer not in ("adamw_torch", "adamw_torch_fused"):
        return []
    plan, paged = ctx.plan(), ctx.plan(optimizer="paged_adamw_8bit")
    if plan is None or plan.fits or not paged.fits:
        return []
    return [Finding("qlora-optimizer", "warning", f"QLoRA with {r.training.optimizer}: optimizer state does not fit",
                    "fp32 Adam state is 8 bytes per trainable parameter; QLoRA's recipe pages 8-bit state to host",
                    "set training.optimizer: paged_adamw_8bit")]


def grad_ckpt_off(ctx: LintContext) -> list[Finding]:
    r = ctx.recipe
    if r.training.grad_ckpt or r.data.seq_len <= 1024:
        return []
    plan, on = ctx.plan(), ctx.plan(grad_ckpt=True)
    if plan is None or plan.fits:
        return []
    return [Finding("grad-ckpt-off", "warning" if not on.fits else "error",
                    f"gradient checkpointing is off at seq {r.data.seq_len} and the plan does not fit without it",
                    "without checkpointing every block keeps all its activations: memory grows with layers x tokens",
                    "set training.grad_ckpt: true")]


def offload_without_ckpt(ctx: LintContext) -> list[Finding]:
    """Offloading moves the *checkpoints* (each layer's input) to host memory: without checkpointing there are none,
    and the trainer does not offload a layer's other activations (patch/offload.py)."""
    t = ctx.recipe.training
    if not t.offload_activations or t.grad_ckpt:
        return []
    return [Finding("offload-without-ckpt", "error", "training.offload_activations is on but training.grad_ckpt is off",
                    "only checkpointed layers' inputs are offloaded: without checkpointing nothing would move to host",
                    "set training.grad_ckpt: true, or training.offload_activations: false")]


def uncheckpointed_layers(ctx: LintContext) -> list[Finding]:
    """training.uncheckpointed_layers counts the model's last layers, and streamed layers must be checkpointed
    (train/model.py uncheckpoint_last_layers, train/stream_setup.py)."""
    t = ctx.recipe.training
    if not t.uncheckpointed_layers:
        return []
    out = []
    config_layers = (ctx.config or {}).get("num_hidden_layers")  # a local model's config (also on the CPU)
    layers = ctx.inputs.shape.num_hidden_layers if ctx.inputs is not None else config_layers
    if layers is not None and t.uncheckpointed_layers > layers:
        out.append(Finding("uncheckpointed-layers", "error", f"training.uncheckpointed_layers is "
                           f"{t.uncheckpointed_layers}, the model has {layers} decoder layers",
                           "it counts the last layers of the model", f"use at most {layers}"))
    if t.offload_weights is True:
        out.append(Finding("uncheckpointed-layers", "error", "training.uncheckpointed_layers with "
                           "training.offload_weights: true", "a layer whose base weights stream must be checkpointed",
                           "set training.uncheckpointed_layers: 0, or training.offload_weights: auto"))
    return out


def fp16(ctx: LintContext) -> list[Finding]:
    r = ctx.recipe
    if r.model.dtype != "float16":
        return []
    cfg = ctx.config or {}
    if is_llama3(cfg) or (family_for(cfg.get("model_type", "")) and not family_for(cfg["model_type"]).fp16_safe):
        return [Finding("fp16-unsafe-model", "error", "fp16 on a model trained in bf16 (Llama 3 / Gemma 2)",
                        "its activations exceed fp16's 65504 range: losses go inf/NaN",
                        "set model.dtype: bfloat16 (or auto)")]
    from onecard.catalog.gpus import get_gpu
    from onecard.errors import UserError

    try:
        bf16 = get_gpu(r.plan.gpu).bf16
    except UserError:
        bf16 = True
    if not bf16:
        return []
    return [Finding("fp16-on-bf16-card", "warning", f"fp16 on a bf16-capable card ({r.plan.gpu})",
                    "bf16 has fp32's range at the same speed: no loss scaling, no overflow",
                    "set model.dtype: bfloat16 (or auto)")]


def lora_targets(ctx: LintContext) -> list[Finding]:
    r = ctx.recipe
    targets = r.adapter.target_modules
    if not r.is_adapter or targets in ("auto", "all-linear") or not ctx.config:
        return []
    model_type = ctx.config.get("model_type", "")
    family = family_for(model_type)
    if family is None:
        return []
    missing = [t for t in targets if t not in family.lora_targets]
    if not missing:
        return []
    source = next((f.model_type for f in FAMILIES.values() if set(missing) <= set(f.lora_targets)), None)
    copied = f" (module names of {source})" if source else ""
    return [Finding("lora-targets", "error",
                    f"target_modules names modules {model_type} lacks: {', '.join(missing)}{copied}",
                    "peft fails or adapts fewer layers than intended when names don't match the architecture",
                    f"use target_modules: auto, or names from {', '.join(family.lora_targets)}")]


def lora_dropout_unfused(ctx: LintContext) -> list[Finding]:
    """onecard's fused attention and MLP take the LoRA input undropped (kernels/lora_linear.py shares one x @ A
    between projections), so with adapter.dropout > 0 those layers run peft's own modules (patch/modules.py
    ``projection_parts``): slower, and with the dropped-out inputs kept for backward, which the plan does not count."""
    r = ctx.recipe
    if not r.is_adapter or r.adapter.dropout == 0:
        return []
    kernels = ctx.inputs.kernels if ctx.inputs is not None else r.training.kernels
    if kernels != "onecard":
        return []
    return [Finding("lora-dropout-unfused", "warning",
                    f"adapter.dropout is {r.adapter.dropout}: onecard's fused attention and MLP do not apply LoRA "
                    "dropout, so those layers run peft's own modules",
                    "the plan's speed and activation memory are for the fused layers, which will not run",
                    "set adapter.dropout: 0 to keep the fused layers (onecard's examples train without dropout)")]


def flash_attn(ctx: LintContext) -> list[Finding]:
    if ctx.recipe.model.attn_implementation != "flash_attention_2":
        return []
    version = ctx.version_reader("flash-attn") or ctx.version_reader("flash_attn")
    if version is None:
        return [Finding("flash-attn-missing", "error", "attn_implementation flash_attention_2 but flash-attn is not "
                        "installed", "transformers refuses to load the model", "install flash-attn >= 2.6.3, or "
                        "use attn_implementation: sdpa")]
    if version_tuple(version) >= FLASH_ATTN_MIN:
        return []
    return [Finding("flash-attn-old", "error", f"flash-attn {version} is older than 2.6.3",
                    "older releases lack softcapping (Gemma 2) and have varlen backward bugs transformers works around",
                    "pip install -U 'flash-attn>=2.6.3', or use attn_implementation: sdpa")]


def lr_and_rank(ctx: LintContext) -> list[Finding]:
    r, out = ctx.recipe, []
    lr = r.training.learning_rate
    if r.is_adapter and not 1e-6 <= lr <= 1e-3:
        out.append(Finding("lr-range", "warning", f"learning rate {lr:g} is outside 1e-6..1e-3 for {r.method}",
                           "adapters diverge above ~1e-3 and barely move below 1e-6",
                           "LoRA/QLoRA typically use 1e-4..3e-4"))
    if r.method == "full" and lr > 1e-4:
        out.append(Finding("lr-range", "warning", f"learning rate {lr:g} is above 1e-4 for full fine-tuning",
                           "full fine-tunes at adapter learning rates destroy pretrained knowledge",
                           "full SFT typically uses 1e-5..5e-5"))
    rank = r.adapter.rank
    if r.is_adapter and not 4 <= rank <= 256:
        out.append(Finding("rank-range", "warning", f"adapter rank {rank} is outside 4..256",
                           "below 4 the adapter has too little capacity; above 256 it costs memory for no gain",
                           "use a rank between 8 and 64 (16 is a sound default)"))
    return out


def qlora_grad_norm(ctx: LintContext) -> list[Finding]:
    r = ctx.recipe
    if r.method != "qlora" or r.training.max_grad_norm is not None:
        return []
    return [Finding("qlora-max-grad-norm", "warning", "QLoRA without gradient clipping (max_grad_norm unset)",
                    "4-bit quantisation noise makes occasional gradient spikes; the QLoRA paper clips at 0.3",
                    "set training.max_grad_norm: 0.3 (or 1.0)")]


def seq_above_context(ctx: LintContext) -> list[Finding]:
    limit = (ctx.config or {}).get("max_position_embeddings")
    seq = ctx.recipe.data.seq_len
    if not limit or seq <= int(limit):
        return []
    return [Finding("seq-above-context", "error", f"seq_len {seq} exceeds the model's context {limit}",
                    "positions beyond the trained range are out of distribution for RoPE: quality collapses",
                    f"set data.seq_len <= {limit}")]


def template_masking(ctx: LintContext) -> list[Finding]:
    r = ctx.recipe
    if ctx.tokenizer is None or r.data.format not in ("auto", "chat") or r.task not in ("sft",):
        return []
    from onecard.data.masking import check_template_masking
    from onecard.data.templates import resolve_template
    from onecard.errors import UserError

    try:
        template = resolve_template(ctx.tokenizer, r.data.chat_template)
    except UserError as exc:
        return [Finding("chat-template", "error", exc.what, "training cannot render the conversations",
                        exc.fix or "use data.chat_template: auto")]
    return [Finding("template-masking", "error", problem,
                    "loss masking needs the assistant turns and their end-of-turn token located in the template",
                    "use the model's own template (data.chat_template: auto) or one that marks assistant turns")
            for problem in check_template_masking(ctx.tokenizer, template)]


def template_mismatch(ctx: LintContext) -> list[Finding]:
    r = ctx.recipe
    own = getattr(ctx.tokenizer, "chat_template", None) if ctx.tokenizer is not None else None
    if not own or r.data.chat_template == "auto":
        return []
    return [Finding("template-mismatch", "warning",
                    f"training with the built-in {r.data.chat_template!r} template while the tokenizer has its own",
                    "at inference apply_chat_template uses the tokenizer's template: the model sees a format it "
                    "was not tuned on", "use data.chat_template: auto, or save the training template with the model")]


def power_limit(ctx: LintContext) -> list[Finding]:
    out = []
    for name, limit_w, default_w in ctx.power_reader():
        if default_w and limit_w < 0.95 * default_w:
            out.append(Finding("power-limit", "warning", f"{name}: power limit {limit_w:.0f} W is below its default "
                               f"{default_w:.0f} W", "a capped card clocks lower: training throughput drops",
                               "nvidia-smi -pl <default> (needs root), or expect slower steps than planned"))
    return out


def model_unknown(ctx: LintContext) -> list[Finding]:
    """A name that is no preset, no local directory, no .gguf file and no ``owner/name`` hub id: nothing can load it."""
    name = ctx.recipe.model.name_or_path
    path = Path(name).expanduser()
    if path.is_dir() and ctx.config is None:
        return [Finding("model-unknown", "error", f"model directory {name!r} has no config.json",
                        "transformers cannot load it", "point model.name_or_path at a Hugging Face model directory "
                        "(config.json + *.safetensors)", where="model.name_or_path")]
    if ctx.config is not None or path.is_dir() or (path.suffix == ".gguf" and path.is_file()):
        return []
    from onecard.catalog.models import PRESETS

    if name.count("/") == 1 and not name.startswith(("/", ".", "~")) and not name.endswith(".gguf"):
        return [Finding("model-unchecked", "info", f"{name!r} is not local: read as a Hugging Face hub id",
                        "lint cannot read its config offline (context length, module names, memory)",
                        "download it and point model.name_or_path at the directory to have it checked",
                        where="model.name_or_path")]
    what = "GGUF file not found" if name.endswith(".gguf") else "no preset, model directory or .gguf file"
    return [Finding("model-unknown", "error", f"model {name!r}: {what}",
                    "nothing can be loaded, planned or checked for this model",
                    f"point model.name_or_path at a local model directory or .gguf file, or use a preset: "
                    f"{', '.join(PRESETS)} (onecard models)", where="model.name_or_path")]


def gpu_unknown(ctx: LintContext) -> list[Finding]:
    from onecard.catalog.gpus import get_gpu
    from onecard.errors import UserError

    try:
        get_gpu(ctx.recipe.plan.gpu)
    except UserError as exc:
        return [Finding("gpu-unknown", "error", exc.what, "the memory and speed plans need the card's figures",
                        exc.fix or "see onecard gpus", where="plan.gpu")]
    return []


def memory_not_checked(ctx: LintContext) -> list[Finding]:
    if not ctx.on_cpu:
        return []
    return [Finding("memory-not-checked", "info", "training on the CPU: the GPU memory rules are not applied",
                    "the planner models a CUDA card's memory; a CPU run is bounded by host RAM instead",
                    f"onecard lint checks the plan against plan.gpu ({ctx.recipe.plan.gpu})")]


def _already_prepared(ctx: LintContext, name: str, path: str):
    """The training file as the data cache knows it, when training prepared this very content under these data
    fields and tokenizer: its records were validated then, so a launch does not read them twice. Only for the
    check a launch runs (no token lengths asked for) and the training split."""
    if ctx.data_tokens or ctx.tokenizer is None or name != "data.path":
        return None
    from onecard.data.prepare import prepared_meta
    from onecard.lint.data import DataStatsReport

    meta = prepared_meta(ctx.recipe, ctx.tokenizer)
    if meta is None:
        return None
    return DataStatsReport(path=path, format=meta["format"], records=meta["summary"]["records"],
                           note="validated when it was prepared (data cache)")


def data_files(ctx: LintContext) -> list[Finding]:
    """Every data file: exists, has a type onecard reads, every record parses into the format of the first;
    with data_tokens, examples longer than data.seq_len by line."""
    from onecard.data.records import SUPPORTED
    from onecard.data.sources import HUB_PREFIX
    from onecard.errors import UserError
    from onecard.lint.data import data_files as named_files, scan_file

    out = []
    for name, path in named_files(ctx.recipe):
        file = Path(path)
        dataset = path.startswith(HUB_PREFIX) or file.is_dir()  # read through datasets: scan_file says what is wrong
        if not file.is_file() and not dataset:
            out.append(Finding("data-missing", "error", f"{path!r} does not exist", "training reads it first and stops",
                               "check the path (relative paths start from the current directory)", where=name))
            continue
        if not dataset and file.suffix.lower() not in SUPPORTED:
            out.append(Finding("data-file-type", "error", f"onecard does not read {file.suffix or 'extension-less'} files"
                               f" ({path})", "training cannot read its records",
                               f"convert it to one of {', '.join(SUPPORTED)} (JSONL: one JSON object per line, e.g. "
                               '{"messages": [...]} or {"text": "..."})', where=name))
            continue
        try:
            report = _already_prepared(ctx, name, path) or scan_file(ctx.recipe, path,
                                                                    ctx.tokenizer if ctx.data_tokens else None)
        except UserError as exc:
            out.append(Finding("data-format", "error", exc.what, "training stops at this record",
                               exc.fix or "see docs for the data formats", where=exc.where or name))
            continue
        ctx.data_reports[name] = report
        if report.truncated:
            more = f" (and {report.truncated - len(report.truncated_lines)} more)" \
                if report.truncated > len(report.truncated_lines) else ""
            out.append(Finding("data-truncated", "warning",
                               f"{report.truncated} of {report.examples} examples are longer than data.seq_len "
                               f"{ctx.recipe.data.seq_len} tokens (longest {report.max_tokens}): {path} "
                               f"{report.unit}s {', '.join(map(str, report.truncated_lines))}{more}",
                               "their ends are cut off: the answer's last tokens and end-of-turn are never trained",
                               f"raise data.seq_len (p95 is {report.p95_tokens} tokens), or shorten those examples",
                               where=name))
    return out


RULES = [model_unknown, gpu_unknown, data_files, memory_not_checked, does_not_fit, qlora_optimizer, grad_ckpt_off,
         offload_without_ckpt, uncheckpointed_layers, fp8_base_gpu, fp8_base_quality, fp16, lora_targets,
         lora_dropout_unfused, flash_attn, lr_and_rank, qlora_grad_norm, seq_above_context, template_masking,
         template_mismatch, power_limit, cuda_graph]

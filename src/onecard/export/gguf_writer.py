"""``--format gguf``: a llama.cpp GGUF file written with the ``gguf`` package (llama.cpp's own Python library).

What llama.cpp needs, following its ``convert_hf_to_gguf.py`` (``LlamaModel``, ``TextModel.set_gguf_parameters``,
``get_vocab_base``; ggml-org/llama.cpp):
- tensor names from ``gguf.get_tensor_name_map`` (token_embd, blk.N.attn_q, ..., output_norm, output);
- Q and K rows permuted from HF's rotate-half RoPE layout to llama.cpp's interleaved one
  (``LlamaModel.permute``: K by the key-value head count);
- no ``output.weight`` when embeddings are tied (SmolLM2): llama.cpp then reuses token_embd;
- 1-D tensors (norms) stay float32 whatever the file type, as llama.cpp's converter does;
- hyper-parameters (context, sizes, heads, RoPE base and dimension, RMS-norm eps) and the BPE vocabulary
  (tokens, token types, merges, special ids, chat template) with the pre-tokenizer name llama.cpp selects by
  hashing the tokenisation of its check string (``get_vocab_base_pre``).

The families written (Llama, Mistral without sliding window, Qwen2, Gemma, Gemma 2) and what each needs
beyond this are rows of ``gguf_families.FAMILIES``; anything else is a UserError rather than a file llama.cpp
would misread. This module writes the unquantised types; ``gguf_quant.py`` quantises one of its files with
llama.cpp's own quantiser.
"""

from __future__ import annotations

import math
from hashlib import sha256
from pathlib import Path

from onecard.errors import UserError
from onecard.export.gguf_families import check_family, head_dim, rope_params, write_family_metadata

FILE_TYPES = ("f32", "f16", "bf16", "q8_0")  # written here; q4_k_m is quantised from an f16 file (gguf_quant.py)

# llama.cpp's check string and the hashes of a few tokenizers' ids for it, copied from
# convert_hf_to_gguf.py get_vocab_base_pre (ggml-org/llama.cpp, "don't edit the hashes manually").
_CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
           '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
           '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
           '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
}

# Split regexes llama.cpp implements under a pre-tokenizer name (src/llama-vocab.cpp quotes the tokenizer.json
# original it was written from).
_KNOWN_SPLIT = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def permute_qk(weight, n_head: int, n_head_kv: int | None = None):
    """llama.cpp ``LlamaModel.permute``: per head, rows (half 1, half 2) -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def check_supported(config):
    """The family row for ``config`` (``gguf_families.check_family``), after checking the gguf package is there."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise UserError("GGUF export needs the gguf package (llama.cpp's Python library)", where="--format gguf",
                        fix="pip install gguf")
    return check_family(config)


def tokenizer_pre(tokenizer) -> str:
    """llama.cpp's pre-tokenizer name: by hash for the known tokenizers; else by the pre-tokenizer's structure,
    a plain GPT-2 ByteLevel being 'gpt-2' and a split on Qwen2's regex before a regex-free ByteLevel 'qwen2'."""
    import json

    chkhsh = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    if chkhsh in _KNOWN_PRE:
        return _KNOWN_PRE[chkhsh]
    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    state = json.loads(pre.__getstate__()) if pre is not None else {}
    if state.get("type") == "ByteLevel" and state.get("use_regex", True):
        return "gpt-2"
    parts = state.get("pretokenizers") or []
    if (state.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split"
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)):
        name = _KNOWN_SPLIT.get((parts[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise UserError(f"GGUF export: llama.cpp does not know this tokenizer's pre-tokenizer (hash {chkhsh[:12]}...)",
                    where="--format gguf", fix="export --format merged and convert with llama.cpp's convert_hf_to_gguf.py "
                    "after adding the tokenizer there (convert_hf_to_gguf_update.py)")


def vocab_tokens(tokenizer, vocab_size: int):
    """Token strings and types by id, as llama.cpp's ``get_vocab_base`` builds them."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def llama3_rope_factors(config, rope: dict):
    """``rope_freqs`` for Llama 3.1-style RoPE scaling (llama.cpp LlamaModel.generate_extra_tensors)."""
    import numpy as np

    dim = head_dim(config)
    base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(model, tokenizer, path: Path, file_type: str = "f16", name: str = "onecard-export") -> dict:
    """Write ``model`` (a merged, unquantised transformers model of a ``FAMILIES`` row) to ``path``; a summary."""
    import gguf

    config = model.config
    family = check_supported(config)
    if file_type not in FILE_TYPES:
        raise UserError(f"unknown GGUF type {file_type!r}", where="--quant", fix=f"use one of {', '.join(FILE_TYPES)}")
    pre = tokenizer_pre(tokenizer)
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)]
    writer = gguf.GGUFWriter(str(path), arch)
    _write_metadata(writer, config, name, file_type)
    _write_vocab(writer, tokenizer, config.vocab_size, pre)
    n_tensors = _write_tensors(writer, model, config, family, file_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "file_type": file_type, "tensors": n_tensors, "tokenizer_pre": pre,
            "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False))}


def _write_metadata(writer, config, name: str, file_type: str) -> None:
    import gguf

    rope = rope_params(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    write_family_metadata(writer, config)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type])


def _write_vocab(writer, tokenizer, vocab_size: int, pre: str) -> None:
    import tempfile

    import gguf

    tokens, types = vocab_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:  # SpecialVocab reads merges and special ids from files
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template  # transformers 5 stores it in chat_template.jinja
    special.add_to_gguf(writer, quiet=True)


def _write_tensors(writer, model, config, family, file_type: str) -> int:
    import gguf

    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.arch), config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    count = 0
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}", where="--format gguf",
                            fix=f"this model has parts llama.cpp's {family.arch.lower()} architecture lacks; "
                            "export --format merged")
        data = tensor.detach().float().cpu().numpy()
        if family.permute_qk and hf_name.endswith("q_proj.weight"):
            data = permute_qk(data, n_head, n_head)
        elif family.permute_qk and hf_name.endswith("k_proj.weight"):
            data = permute_qk(data, n_head, n_kv)
        elif family.norm_offset and hf_name.endswith("norm.weight"):
            data = data + family.norm_offset
        _add(writer, new_name, data, file_type)
        count += 1
    rope = rope_params(config)
    if rope.get("rope_type") == "llama3":
        _add(writer, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config, rope), "f32")
        count += 1
    return count


def _add(writer, name: str, data, file_type: str) -> None:
    import gguf
    import numpy as np

    if data.ndim <= 1 or file_type == "f32":
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    elif file_type == "f16":
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
    elif file_type == "q8_0":
        try:  # convert_hf_to_gguf: rows not a multiple of the Q8_0 block are written f16
            raw = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
        except gguf.QuantError:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
            return
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        raw = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType.BF16)
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)

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

Only the Llama architecture (and Mistral without sliding window, which llama.cpp runs as ``llama``) is
written; anything else is a UserError rather than a file llama.cpp would misread.
"""

from __future__ import annotations

import math
from hashlib import sha256
from pathlib import Path

from onecard.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
FILE_TYPES = ("f32", "f16", "bf16")
STORED_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}

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


def permute_qk(weight, n_head: int, n_head_kv: int | None = None):
    """llama.cpp ``LlamaModel.permute``: per head, rows (half 1, half 2) -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def check_supported(config) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise UserError("GGUF export needs the gguf package (llama.cpp's Python library)", where="--format gguf",
                        fix="pip install gguf")
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"GGUF export supports Llama-architecture models ({', '.join(SUPPORTED_MODEL_TYPES)}), "
                        f"not {model_type!r}", where="--format gguf",
                        fix="export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    if getattr(config, "sliding_window", None):
        raise UserError("GGUF export: sliding-window attention is not written", where="--format gguf",
                        fix="export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    rope = _rope_params(config)
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise UserError(f"GGUF export: RoPE scaling {rope.get('rope_type')!r} is not written", where="--format gguf",
                        fix="export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")


def _rope_params(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def tokenizer_pre(tokenizer) -> str:
    """llama.cpp's pre-tokenizer name, by hash; a plain GPT-2 ByteLevel pre-tokenizer is 'gpt-2'."""
    chkhsh = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    if chkhsh in _KNOWN_PRE:
        return _KNOWN_PRE[chkhsh]
    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if pre is not None and type(pre).__name__ == "ByteLevel" and '"use_regex":true' in pre.__getstate__().decode().replace(" ", ""):
        return "gpt-2"
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

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
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
    """Write ``model`` (a merged, unquantised transformers Llama) to ``path``; returns a summary."""
    import gguf

    config = model.config
    check_supported(config)
    if file_type not in FILE_TYPES:
        raise UserError(f"unknown GGUF type {file_type!r}", where="--gguf-type", fix=f"use one of {', '.join(FILE_TYPES)}")
    pre = tokenizer_pre(tokenizer)
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_metadata(writer, config, name, file_type)
    _write_vocab(writer, tokenizer, config.vocab_size, pre)
    n_tensors = _write_tensors(writer, model, config, file_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": "llama", "file_type": file_type, "tensors": n_tensors, "tokenizer_pre": pre,
            "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False))}


def _write_metadata(writer, config, name: str, file_type: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = _rope_params(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[file_type])


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


def _write_tensors(writer, model, config, file_type: str) -> int:
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
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
                            fix="this model has parts llama.cpp's llama architecture lacks; export --format merged")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_qk(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_qk(data, n_head, n_kv)
        _add(writer, new_name, data, file_type)
        count += 1
    rope = _rope_params(config)
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
    else:
        raw = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType.BF16)
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)

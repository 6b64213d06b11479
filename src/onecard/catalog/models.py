"""Model shape presets (no weights): enough to plan and to build a random model for benchmarks.

Every preset copies its fields from the model's published ``config.json`` on the Hugging Face hub (repo named in
``source``). A local model directory's ``config.json`` (or a GGUF file's metadata) gives the same :class:`ModelShape`
through :func:`resolve_shape`, so anything that takes a preset also takes a path.

The parameter-count helpers follow the transformers modules of each family (modeling_llama.py etc.): every decoder
block has q/k/v/o projections, a gated MLP (gate/up/down) and RMSNorm weights; Qwen2 adds q/k/v biases; Gemma 2 has
four norms per block. They reproduce the published totals (Llama 3 8B: 8,030,261,248) -- see tests/test_catalog.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    id: str                       # preset id, e.g. "llama-3-8b"
    model_type: str               # HF model_type: llama, mistral, qwen2, gemma, gemma2
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None   # None = hidden_size // num_attention_heads
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v carry a bias
    rope_theta: float = 10000.0
    source: str = ""
    hub_id: str = ""              # the hub repository the shape was copied from

    @property
    def head_dim_(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------------ parameter counts
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim_

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim_

    @property
    def norms_per_layer(self) -> int:
        """RMSNorm weight vectors per block: 2 (input, post-attention); Gemma 2 adds pre/post-feedforward norms."""
        return 4 if self.model_type in ("gemma2", "gemma3", "gemma3_text") else 2

    def linear_layers_per_block(self) -> list[tuple[str, int, int]]:
        """``(module name, in_features, out_features)`` of every nn.Linear in one decoder block (LoRA targets)."""
        h, i = self.hidden_size, self.intermediate_size
        return [
            ("q_proj", h, self.q_dim), ("k_proj", h, self.kv_dim), ("v_proj", h, self.kv_dim),
            ("o_proj", self.q_dim, h),
            ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h),
        ]

    def attention_params_per_layer(self) -> int:
        weights = sum(n_in * n_out for name, n_in, n_out in self.linear_layers_per_block()[:4])
        bias = (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0
        return weights + bias

    def attention_bias_params_per_layer(self) -> int:
        return (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0

    def mlp_params_per_layer(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def norm_params_per_layer(self) -> int:
        return self.norms_per_layer * self.hidden_size

    def params_per_layer(self) -> int:
        return self.attention_params_per_layer() + self.mlp_params_per_layer() + self.norm_params_per_layer()

    def linear_params_per_layer(self) -> int:
        """Weights of the block's nn.Linear layers only (what bitsandbytes quantises in QLoRA)."""
        return sum(n_in * n_out for _, n_in, n_out in self.linear_layers_per_block())

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """0 when tied: the output projection reuses the embedding matrix (no separate tensor)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        final_norm = self.hidden_size
        return (self.embedding_params() + self.lm_head_params() + final_norm
                + self.num_hidden_layers * self.params_per_layer())

    def non_embedding_params(self) -> int:
        return self.num_hidden_layers * self.params_per_layer()

    def lora_params(self, rank: int, targets: tuple[str, ...] | list[str] | None = None, dora: bool = False) -> int:
        """LoRA A (r x in) and B (out x r) per targeted linear; DoRA adds a magnitude vector (out) per target."""
        total = 0
        for name, n_in, n_out in self.linear_layers_per_block():
            if targets is None or name in targets:
                total += rank * (n_in + n_out) + (n_out if dora else 0)
        return total * self.num_hidden_layers

    def with_(self, **changes) -> "ModelShape":
        return replace(self, **changes)

    @classmethod
    def from_config(cls, config: dict, *, id: str = "", source: str = "") -> "ModelShape":
        """A shape from a transformers ``config.json`` dict (multimodal configs: the ``text_config`` part)."""
        if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
            config = {**config["text_config"], "model_type": config["text_config"].get("model_type", "")}
        try:
            heads = int(config["num_attention_heads"])
            shape = cls(
                id=id or str(config.get("_name_or_path") or config.get("model_type", "local")),
                model_type=str(config.get("model_type", "llama")),
                hidden_size=int(config["hidden_size"]),
                intermediate_size=int(config["intermediate_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                vocab_size=int(config["vocab_size"]),
                head_dim=int(config["head_dim"]) if config.get("head_dim") else None,
                max_position_embeddings=int(config.get("max_position_embeddings") or 8192),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
                rope_theta=float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
                                 or 10000.0),
                source=source,
            )
        except KeyError as exc:
            from onecard.errors import UserError

            raise UserError(f"config.json lacks {exc.args[0]!r}", where=source or None,
                            fix="a decoder-only transformers config (llama, mistral, qwen2, gemma...) is needed") from None
        return shape


def _p(id, model_type, h, i, layers, heads, kv, vocab, hub, **kw) -> ModelShape:
    return ModelShape(id, model_type, h, i, layers, heads, kv, vocab, hub_id=hub,
                      source=f"https://huggingface.co/{hub}/blob/main/config.json", **kw)


PRESETS: dict[str, ModelShape] = {
    s.id: s
    for s in [
        # Llama 3 / 3.1 / 3.2 / 3.3: config.json of each meta-llama repo.
        _p("llama-3-8b", "llama", 4096, 14336, 32, 32, 8, 128256, "meta-llama/Meta-Llama-3-8B", rope_theta=500000.0),
        _p("llama-3.1-8b", "llama", 4096, 14336, 32, 32, 8, 128256, "meta-llama/Llama-3.1-8B",
           max_position_embeddings=131072, rope_theta=500000.0),
        _p("llama-3-70b", "llama", 8192, 28672, 80, 64, 8, 128256, "meta-llama/Meta-Llama-3-70B",
           rope_theta=500000.0),
        _p("llama-3.1-70b", "llama", 8192, 28672, 80, 64, 8, 128256, "meta-llama/Llama-3.1-70B",
           max_position_embeddings=131072, rope_theta=500000.0),
        _p("llama-3.1-405b", "llama", 16384, 53248, 126, 128, 8, 128256, "meta-llama/Llama-3.1-405B",
           max_position_embeddings=131072, rope_theta=500000.0),
        _p("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 128256, "meta-llama/Llama-3.2-1B", head_dim=64,
           max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=500000.0),
        _p("llama-3.2-3b", "llama", 3072, 8192, 28, 24, 8, 128256, "meta-llama/Llama-3.2-3B", head_dim=128,
           max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=500000.0),
        # Mistral 7B v0.3 (v0.1 differs only in vocab 32000 and rope_theta 1e4).
        _p("mistral-7b", "mistral", 4096, 14336, 32, 32, 8, 32768, "mistralai/Mistral-7B-v0.3",
           max_position_embeddings=32768, rope_theta=1000000.0),
        # Qwen 2.5: q/k/v biases; the small ones tie embeddings.
        _p("qwen2.5-0.5b", "qwen2", 896, 4864, 24, 14, 2, 151936, "Qwen/Qwen2.5-0.5B", max_position_embeddings=32768,
           tie_word_embeddings=True, attention_bias=True, rope_theta=1000000.0),
        _p("qwen2.5-1.5b", "qwen2", 1536, 8960, 28, 12, 2, 151936, "Qwen/Qwen2.5-1.5B", max_position_embeddings=131072,
           tie_word_embeddings=True, attention_bias=True, rope_theta=1000000.0),
        _p("qwen2.5-7b", "qwen2", 3584, 18944, 28, 28, 4, 152064, "Qwen/Qwen2.5-7B", max_position_embeddings=131072,
           attention_bias=True, rope_theta=1000000.0),
        _p("qwen2.5-14b", "qwen2", 5120, 13824, 48, 40, 8, 152064, "Qwen/Qwen2.5-14B", max_position_embeddings=131072,
           attention_bias=True, rope_theta=1000000.0),
        _p("qwen2.5-32b", "qwen2", 5120, 27648, 64, 40, 8, 152064, "Qwen/Qwen2.5-32B", max_position_embeddings=131072,
           attention_bias=True, rope_theta=1000000.0),
        # Gemma 2: head_dim 256, tied embeddings, 256k vocabulary.
        _p("gemma-2-2b", "gemma2", 2304, 9216, 26, 8, 4, 256000, "google/gemma-2-2b", head_dim=256,
           tie_word_embeddings=True),
        _p("gemma-2-9b", "gemma2", 3584, 14336, 42, 16, 8, 256000, "google/gemma-2-9b", head_dim=256,
           tie_word_embeddings=True),
        _p("gemma-2-27b", "gemma2", 4608, 36864, 46, 32, 16, 256000, "google/gemma-2-27b", head_dim=128,
           tie_word_embeddings=True),
    ]
}


def find_preset(name: str) -> ModelShape | None:
    """A preset by id (``llama-3-8b``) or by the hub id it was copied from (``meta-llama/Meta-Llama-3-8B``)."""
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    for shape in PRESETS.values():  # instruct variants share the base model's shape
        if key in (shape.hub_id.lower(), shape.hub_id.lower() + "-instruct"):
            return shape
    return None


def read_config(path: str | Path) -> dict | None:
    """The ``config.json`` of a local model directory, or None when ``path`` is not one."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    from onecard.errors import UserError

    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read config.json: {exc}", where=str(cfg)) from None


def resolve_shape(name_or_path: str) -> ModelShape:
    """Preset id or hub id of a preset, a local directory with config.json, or a .gguf file -> ModelShape."""
    from onecard.errors import UserError

    preset = find_preset(name_or_path)
    if preset is not None:
        return preset
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config = read_config(path)
        if config is None:
            raise UserError("model directory has no config.json", where=str(path),
                            fix="point at a transformers model directory, or use a preset (onecard models)")
        return ModelShape.from_config(config, id=path.name, source=str(path / "config.json"))
    if path.suffix == ".gguf" and path.is_file():
        return shape_from_gguf(path)
    raise UserError(f"unknown model {name_or_path!r}", where="model.name_or_path",
                    fix=f"use a local model directory or a preset: {', '.join(PRESETS)} (onecard models)")


GGUF_SHAPE_FORMAT = 1  # part of the cache key: bump when what _read_gguf_shape returns changes


def shape_from_gguf(path: Path) -> ModelShape:
    """The shape of a GGUF file, cached in memory and on disk (onecard.cache, keyed by path, size and mtime).

    gguf's GGUFReader parses every metadata array into numpy views: ~4 s for SmolLM2-135M's 49,152-token
    vocabulary on 2 CPU cores, and the planner asks for the shape once per card of the cost table.
    """
    from onecard.cache import file_key, read_json, write_json

    name = f"{path.stem}-{file_key(path, GGUF_SHAPE_FORMAT)}"
    if name in _GGUF_SHAPES:
        return _GGUF_SHAPES[name]
    cached = read_json("gguf-shapes", name)
    try:
        shape = ModelShape(**cached) if cached else None
    except TypeError:  # an entry of another field set: read the file again
        shape = None
    if shape is None:
        shape = _read_gguf_shape(path)
        write_json("gguf-shapes", name, {f: getattr(shape, f) for f in SHAPE_FIELDS})
    _GGUF_SHAPES[name] = shape
    return shape


_GGUF_SHAPES: dict[str, ModelShape] = {}


def _read_gguf_shape(path: Path) -> ModelShape:
    """Read the architecture keys of a GGUF file (gguf package, imported lazily; absent on some machines)."""
    from onecard.errors import UserError

    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError("planning from a .gguf needs the 'gguf' package", where=str(path),
                        fix="pip install gguf, or plan with the original transformers directory or a preset") from None
    reader = GGUFReader(str(path))

    def value(key: str, default=None):
        field = reader.fields.get(key)
        if field is None:
            return default
        return field.contents() if hasattr(field, "contents") else field.parts[field.data[0]][0]

    arch = value("general.architecture")
    if arch is None or value(f"{arch}.embedding_length") is None:
        raise UserError("GGUF file has no transformer shape metadata", where=str(path),
                        fix="plan with the original transformers directory or a preset")
    heads = int(value(f"{arch}.attention.head_count"))
    tokens = value("tokenizer.ggml.tokens")
    vocab = int(value(f"{arch}.vocab_size", len(tokens) if tokens is not None else 32000))
    key_len = value(f"{arch}.attention.key_length")
    return ModelShape(
        id=path.stem, model_type={"gemma2": "gemma2", "qwen2": "qwen2"}.get(arch, arch),
        hidden_size=int(value(f"{arch}.embedding_length")), intermediate_size=int(value(f"{arch}.feed_forward_length")),
        num_hidden_layers=int(value(f"{arch}.block_count")), num_attention_heads=heads,
        num_key_value_heads=int(value(f"{arch}.attention.head_count_kv", heads)), vocab_size=vocab,
        head_dim=int(key_len) if key_len else None,
        max_position_embeddings=int(value(f"{arch}.context_length", 8192)),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
        attention_bias=arch == "qwen2", rope_theta=float(value(f"{arch}.rope.freq_base", 10000.0)), source=str(path),
    )


SHAPE_FIELDS = tuple(f.name for f in fields(ModelShape))

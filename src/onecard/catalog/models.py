"""Model shape presets (no weights): enough to plan and to build a random model for benchmarks.

(The plan helper fills PRESETS; the dataclass is the interface the planner, bench and train rely on.)
"""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def head_dim_(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


PRESETS: dict[str, ModelShape] = {}

"""Tiny random models and tokenizers, for tests and ``onecard bench --cpu``.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in-process on a few sentences,
with a real ChatML chat template; the models are 2-layer configs of each supported family with
random weights, written with ``save_pretrained`` so tests load them back through the real loader.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning a language model on one GPU needs a plan for memory and time.",
    "user assistant system: hello, how are you? I am fine, thank you.",
    "Instruction: summarise the text. Input: a long document. Output: a short summary.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 yes no true false",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_tiny_tokenizer(vocab_size: int = 320, chat_template: str | None = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer (every string encodes) with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token=None,
        pad_token="<pad>",
        unk_token=None,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A 2-layer config of one family: hidden 64, 4 heads (2 KV heads: exercises GQA)."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "gemma":
        return transformers.GemmaConfig(head_dim=16, **common)
    if arch == "gemma2":
        return transformers.Gemma2Config(head_dim=16, **common)
    raise ValueError(f"no tiny config for {arch!r}")


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny random model *and* its tokenizer to ``path`` as a normal HF directory."""
    import torch
    import transformers

    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **overrides)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_counting_job(folder: str | Path, n_examples: int) -> tuple[Path, Path]:
    """A tiny llama (hidden 256, 4 layers) and ``n_examples`` chat rows that count to 0..12, saved under ``folder``:
    the small job the multi-GPU checks train (tests/test_multigpu_gpu.py). Returns
    (model dir, chat.jsonl)."""
    import json

    folder = Path(folder)
    model = save_tiny_model(folder / "model", "llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4)
    rows = [{"messages": [{"role": "user", "content": f"count to {i % 13} please"},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(i % 13 + 1)) + " done"}]}
            for i in range(n_examples)]
    chat = folder / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return model, chat

"""Greedy, batched, deterministic generation from chat conversations.

Used by ``onecard eval`` (generation metrics), ``onecard demo`` (before/after samples) and the report.
Decoding is fixed (greedy, no sampling) so two runs on the same weights give the same text; the seed is
set anyway so that anything stochastic downstream (dropout left on by mistake, a sampling config in the
model's ``generation_config``) cannot make results drift silently.

Prompts are left-padded: with right padding, the new tokens of short prompts would be generated after
pad tokens, which changes the answer. Prompts are sorted by length before batching (less padding, faster)
and the answers are returned in the caller's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def render_prompts(tokenizer, conversations: Sequence[list[dict]], chat_template: str | None = None) -> list[str]:
    """Each conversation through the chat template, ending with the assistant header.

    ``chat_template``: the jinja string training used (``onecard.data.templates.resolve_template``); None = the
    tokenizer's own.
    """
    from onecard.errors import UserError

    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template, so prompts cannot be rendered for generation",
            where=str(getattr(tokenizer, "name_or_path", "tokenizer")),
            fix="use a model whose tokenizer_config.json has a chat_template, or set data.chat_template",
        )
    return [
        tokenizer.apply_chat_template(list(conv), chat_template=chat_template, tokenize=False, add_generation_prompt=True)
        for conv in conversations
    ]


# End-of-turn markers of the common templates (ChatML, Llama 3, Gemma, Llama 2/Mistral): a chat template's turn end
# is often not the tokenizer's EOS (Llama 3 base: EOS <|end_of_text|>, turn end <|eot_id|>).
_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "</s>")


def _stop_token_ids(model, tokenizer) -> list[int]:
    """Stop on the tokenizer's EOS, the model's configured EOS ids and any known end-of-turn token it has."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.extend(int(vocab[t]) for t in _TURN_ENDS if t in vocab and int(vocab[t]) not in ids)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        configured = [configured]
    for value in configured or []:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def generate_answers(
    model,
    tokenizer,
    conversations: Sequence[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    chat_template: str | None = None,
) -> list[str]:
    """Greedy answers (decoded, special tokens dropped, stripped) for each conversation, in input order.

    ``conversations``: lists of ``{"role", "content"}`` messages; the answer continues after an assistant
    header. ``progress``: called with the number of conversations finished after each batch.
    ``chat_template``: override the tokenizer's template (pass the one training used).
    """
    import torch

    if not conversations:
        return []
    prompts = render_prompts(tokenizer, conversations, chat_template)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = _stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(prompts)

    old_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    torch.manual_seed(seed)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            # add_special_tokens=False: the chat template already wrote any BOS it wants.
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad_id,
                    eos_token_id=stop_ids or None,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            for row, i in enumerate(idx):
                answers[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
            if progress is not None:
                progress(len(idx))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return answers

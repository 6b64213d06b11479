"""Acceptance 5: gradient accumulation is normalised by the window's trained tokens; same seed, same weights.

Micro-batch 1 x accumulation 4 and micro-batch 4 x accumulation 1 over the same four examples of different
lengths must give the same accumulated gradient. Averaging per-micro-batch mean losses (the common bug)
weights a short example's tokens more than a long one's, and the test shows it fails the same check.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

GRAD_TOL = 1e-5


def write_chat(path):
    rows = []
    for i, words in enumerate([1, 9, 3, 14]):  # very different lengths: the bug shows up only then
        answer = " ".join(["fox"] * words)
        rows.append({"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe_for(tmp_path, model_dir, **training):
    from onecard.recipe import validate_recipe

    t = {"max_steps": 3, "micro_batch_size": 1, "grad_accum": 4, "learning_rate": 1e-2, "seed": 11,
         "optimizer": "adamw_torch", "grad_ckpt": False}
    t.update(training)
    return validate_recipe({
        "name": "accum", "model": {"name_or_path": str(model_dir)}, "method": "lora", "adapter": {"rank": 4},
        "data": {"path": str(write_chat(tmp_path / "chat.jsonl")), "seq_len": 64, "shuffle": False},
        "training": t, "output_dir": str(tmp_path / "runs" / "{name}"),
    })


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def mean_of_means(model, micro_batches):
    """The common bug: each micro-batch's *mean* loss, averaged over the window."""
    from onecard.train.sft_step import token_ce_sum

    for batch in micro_batches:
        loss_sum, n = token_ce_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch["labels"])
        (loss_sum / n / len(micro_batches)).backward()


def test_micro_batch_split_gives_same_gradient(tmp_path, tiny_llama_dir):
    from onecard.data import build_dataset, collate, pad_token_id
    from onecard.train.sft_step import accumulate_gradients
    from onecard.train.model import load_model_and_tokenizer

    recipe = recipe_for(tmp_path, tiny_llama_dir)
    model, tokenizer = load_model_and_tokenizer(recipe, "cpu")
    # lora_B starts at zero, which makes lora_A's gradient zero: move B off zero so every gradient is exercised.
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    model.train()
    examples = build_dataset(recipe, tokenizer).examples
    lengths = sorted(len(e["input_ids"]) for e in examples)
    assert lengths[-1] >= 2 * lengths[0], "the examples must differ in length"
    pad = pad_token_id(tokenizer)
    one_big = [collate(examples, pad)]
    four_small = [collate([e], pad) for e in examples]

    model.zero_grad()
    accumulate_gradients(model, one_big, "cpu")
    reference = grads(model)
    model.zero_grad()
    accumulate_gradients(model, four_small, "cpu")
    assert max_diff(grads(model), reference) <= GRAD_TOL

    model.zero_grad()
    mean_of_means(model, four_small)
    assert max_diff(grads(model), reference) > 100 * GRAD_TOL, "the buggy normalisation should not match"


def test_same_seed_same_weights_and_split_invariant_loss(tmp_path, tiny_llama_dir):
    import torch
    from safetensors.torch import load_file

    from onecard.train.loop import train

    runs = {}
    for name, mb, accum in [("a", 1, 4), ("b", 1, 4), ("c", 4, 1)]:
        (tmp_path / name).mkdir()
        recipe = recipe_for(tmp_path / name, tiny_llama_dir, micro_batch_size=mb, grad_accum=accum)
        train(recipe)
        runs[name] = (load_file(str(recipe.run_dir / "adapter" / "adapter_model.safetensors")),
                      [json.loads(x)["loss"] for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()])
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0]), "same seed must give bit-identical weights"
    # The logged window loss is the token mean over the window, whatever the split (first step: same weights).
    assert abs(a[1][0] - c[1][0]) < 1e-5

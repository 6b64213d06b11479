"""Loss math against the formulas trl 1.16.0 uses (hand-computed here), and the accumulation invariant:
micro-batch 1 x accumulation 4 gives the same gradient as 4 x 1, for DPO and for KTO (whose KL estimate is
taken over the whole window)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from test_preference_data import dpo_rows, kto_rows, preference_tree

os.environ.setdefault("OMP_NUM_THREADS", "1")


def test_dpo_sigmoid_and_ipo_match_the_formulas():
    from onecard.train.preference_loss import dpo_loss, preference_accuracy

    pc, pr = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -6.5])
    rc, rr = torch.tensor([-5.5, -7.0]), torch.tensor([-5.5, -6.5])
    beta = 0.2
    terms = dpo_loss(pc, pr, rc, rr, beta, "sigmoid")
    logits = [(-5.0 + 5.5) - (-6.0 + 5.5), 0.0]
    want = [-math.log(1 / (1 + math.exp(-beta * z))) for z in logits]
    assert torch.allclose(terms.losses, torch.tensor(want), atol=1e-6)
    assert torch.allclose(terms.chosen_rewards, torch.tensor([0.1, 0.0]), atol=1e-6)
    assert preference_accuracy(terms.chosen_rewards, terms.rejected_rewards) == 0.5  # the tie counts as wrong

    nc, nr = torch.tensor([2.0, 4.0]), torch.tensor([5.0, 1.0])
    ipo = dpo_loss(pc, pr, rc, rr, beta, "ipo", nc, nr)
    want_ipo = [((0.5 / 2 - (-0.5) / 5) - 1 / (2 * beta)) ** 2, (0.0 - 1 / (2 * beta)) ** 2]
    assert torch.allclose(ipo.losses, torch.tensor(want_ipo), atol=1e-6)


def test_kto_loss_kl_and_accuracy():
    from onecard.train.preference_loss import kto_accuracy, kto_kl, kto_loss

    pi, ref = torch.tensor([-3.0, -4.0, -2.0]), torch.tensor([-3.5, -3.0, -2.0])
    desirable = torch.tensor([True, False, True])
    kl = kto_kl(torch.tensor([-4.0, -5.0]), torch.tensor([-4.2, -5.4]))
    assert math.isclose(float(kl), 0.3, abs_tol=1e-6)
    assert float(kto_kl(torch.tensor([-5.0]), torch.tensor([-4.0]))) == 0.0  # clamped at 0
    beta, wd, wu = 0.5, 1.0, 1.5
    losses, rewards = kto_loss(pi, ref, desirable, kl, beta, wd, wu)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [wd * (1 - sig(beta * (0.5 - 0.3))), wu * (1 - sig(beta * (0.3 - (-1.0)))), wd * (1 - sig(beta * -0.3))]
    assert torch.allclose(losses, torch.tensor(want), atol=1e-6)
    assert torch.allclose(rewards, torch.tensor([0.25, -0.5, 0.0]))
    assert math.isclose(kto_accuracy(rewards, desirable), 2 / 3, rel_tol=1e-6)  # reward 0 on a desirable example is wrong


def _grads(tmp_path, model_dir, task, split):
    from transformers import AutoTokenizer

    from onecard.data import pad_token_id
    from onecard.data.preference import build_preference_dataset
    from onecard.recipe import validate_recipe
    from onecard.train.model import load_model_and_tokenizer
    from onecard.train.preference_reference import setup_reference
    from onecard.train.preference_step import dpo_step, kto_step

    rows = dpo_rows(4, 5) if task == "dpo" else kto_rows(4, 5)
    tree = preference_tree(tmp_path, model_dir, task, rows=rows, training={"micro_batch_size": split[0],
                                                                           "grad_accum": split[1]})
    recipe = validate_recipe(tree)
    model, tok = load_model_and_tokenizer(recipe, "cpu")
    reference = setup_reference(model, recipe)
    examples = build_preference_dataset(recipe, AutoTokenizer.from_pretrained(model_dir)).examples
    _raise_likelihood(model, examples, pad_token_id(tok))  # policy != reference, and the KL estimate > 0
    micro = [examples[i:i + split[0]] for i in range(0, 4, split[0])]
    step = dpo_step if task == "dpo" else kto_step
    metrics = step(model, reference, micro, recipe, "cpu", pad_token_id(tok))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, metrics


def _raise_likelihood(model, examples, pad_id, steps=3, lr=0.02):
    """A few plain gradient-ascent steps on the log-likelihood of every (also mismatched) completion."""
    from onecard.data.preference import collate_rows, kl_rows, sequences
    from onecard.train.preference_loss import completion_logps

    key = "chosen_ids" if "chosen_ids" in examples[0] else "completion_ids"
    rotated = [{**ex, "completion_ids": ex[key]} for ex in examples]
    batch = collate_rows(sequences(examples, key) + kl_rows(rotated), pad_id)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        (-completion_logps(model, batch, "cpu")[0].sum()).backward()
        with torch.no_grad():
            for p in params:
                p.sub_(lr * p.grad)
                p.grad = None


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_accumulation_split_does_not_change_the_gradient(tmp_path, tiny_llama_dir, task):
    one_by_four, m1 = _grads(tmp_path, tiny_llama_dir, task, (1, 4))
    four_by_one, m4 = _grads(tmp_path, tiny_llama_dir, task, (4, 1))
    assert math.isclose(m1["loss"], m4["loss"], rel_tol=1e-5)
    if task == "kto":
        assert m1["kl"] > 0 and math.isclose(m1["kl"], m4["kl"], rel_tol=1e-5)
    diff = max((one_by_four[k] - four_by_one[k]).abs().max().item() for k in one_by_four)
    scale = max(v.abs().max().item() for v in four_by_one.values())
    assert scale > 0 and diff <= 1e-5 * max(1.0, scale), diff

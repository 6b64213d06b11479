"""Acceptance 2: the reference log-probs come from the same model object (one copy of the base in memory) and
equal the starting model's: the base with adapters disabled, or base + the frozen SFT adapter when continuing
from one -- checked against a separately loaded model. Also: the trained and the reference adapter are distinct,
and only the trained one gets gradients and optimizer state.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from onecard_run_fixtures import make_run
from test_preference_data import dpo_rows, preference_tree

os.environ.setdefault("OMP_NUM_THREADS", "1")


def storages_of_shape(shape) -> int:
    """Distinct storages of live tensors with ``shape`` anywhere in the process (gc sees every tensor object)."""
    import warnings

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some deprecated torch module objects warns
        warnings.simplefilter("ignore")
        return len({o.untyped_storage().data_ptr() for o in gc.get_objects()
                    if isinstance(o, torch.Tensor) and tuple(o.shape) == tuple(shape)})


def setup(tmp_path, model_dir, **sections):
    from onecard.data import pad_token_id
    from onecard.data.preference import build_preference_dataset, collate_dpo
    from onecard.recipe import validate_recipe
    from onecard.train.model import load_model_and_tokenizer

    recipe = validate_recipe(preference_tree(tmp_path, model_dir, "dpo", rows=dpo_rows(8, 3), **sections))
    model, tok = load_model_and_tokenizer(recipe, "cpu")
    dataset = build_preference_dataset(recipe, tok)
    batch = collate_dpo(dataset.examples[:4], pad_token_id(tok))
    return recipe, model, tok, dataset, batch


def logps_of(model, batch):
    from onecard.train.preference_loss import completion_logps

    with torch.no_grad():
        was = model.training
        model.eval()
        out = completion_logps(model, batch, "cpu")[0]
        model.train(was)
    return out


def reference_logps(reference, batch):
    from onecard.train.preference_loss import completion_logps

    with torch.no_grad(), reference.active() as module:
        return completion_logps(module, batch, "cpu")[0]


def train_steps(model, reference, recipe, dataset, tok, steps=3):
    """A few real DPO optimizer steps, so the policy has moved away from the reference."""
    from onecard.data import pad_token_id
    from onecard.train.optim import build_optimizer
    from onecard.train.preference_step import dpo_step

    optimizer = build_optimizer(model, recipe, "cpu")
    model.train()
    for _ in range(steps):
        dpo_step(model, reference, [dataset.examples[:4]], recipe, "cpu", pad_token_id(tok))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def test_adapter_disabled_reference_is_the_base_in_the_same_object(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from onecard.train.preference_reference import setup_reference

    recipe, model, tok, dataset, batch = setup(tmp_path, tiny_llama_dir)
    embed_shape = model.get_input_embeddings().weight.shape
    before = storages_of_shape(embed_shape)
    reference = setup_reference(model, recipe)
    assert reference.mode == "adapter-disabled" and reference.frozen_copy is None
    assert storages_of_shape(embed_shape) == before  # no copy of any base weight was made
    with reference.active() as module:
        assert module is model
    train_steps(model, reference, recipe, dataset, tok)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    want = logps_of(base, batch)
    assert torch.allclose(reference_logps(reference, batch), want, atol=1e-5)
    assert not torch.allclose(logps_of(model, batch), want, atol=1e-3)  # control: the policy has moved


def test_copy_reference_does_hold_a_second_base(tmp_path, tiny_llama_dir):
    """Control for the memory check above: reference 'copy' adds the base's storages again."""
    from onecard.train.preference_reference import setup_reference

    recipe, model, _, _, batch = setup(tmp_path, tiny_llama_dir, preference={"reference": "copy"})
    embed_shape = model.get_input_embeddings().weight.shape
    before = storages_of_shape(embed_shape)
    reference = setup_reference(model, recipe)
    assert storages_of_shape(embed_shape) == 2 * before
    assert all(not p.requires_grad for p in reference.frozen_copy.parameters())
    assert torch.allclose(reference_logps(reference, batch), logps_of(model, batch), atol=1e-6)


def test_continuing_from_sft_adapter_references_the_sft_model(tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from onecard.train.preference_reference import REFERENCE_ADAPTER, setup_reference

    sft_run = make_run(tmp_path / "sft", tiny_llama_dir, method="lora", seed=7)
    recipe, model, tok, dataset, batch = setup(tmp_path, tiny_llama_dir, adapter={"init_adapter": str(sft_run)})
    embed_shape = model.get_input_embeddings().weight.shape
    before = storages_of_shape(embed_shape)
    reference = setup_reference(model, recipe)
    assert reference.mode == "named-adapter"
    assert storages_of_shape(embed_shape) == before  # only adapter weights were loaded, never a second base
    assert set(model.peft_config) == {"default", REFERENCE_ADAPTER}

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    reference_names = {n for n, _ in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n}
    assert trainable and reference_names and not trainable & reference_names
    assert all(".default." in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in reference_names}
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}

    optimizer = train_steps(model, reference, recipe, dataset, tok)

    # Switching to the reference and back leaves the trainable set as it was.
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    params = dict(model.named_parameters())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(params[n]) for n in trainable}
    assert all(id(params[n]) not in optimizer.state for n in reference_names)
    assert all(params[n].grad is None for n in reference_names)
    assert all(torch.equal(params[n], frozen_before[n]) for n in reference_names)
    assert any(not torch.equal(params[n], trained_before[n]) for n in trainable)

    # The reference equals base + SFT adapter loaded separately; the policy has moved away from it.
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                                    str(sft_run / "adapter"))
    want = logps_of(sft, batch)
    base = logps_of(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), batch)
    assert not torch.allclose(want, base, atol=1e-3)  # the SFT adapter matters: the check below can fail
    assert torch.allclose(reference_logps(reference, batch), want, atol=1e-5)
    assert not torch.allclose(logps_of(model, batch), want, atol=1e-3)

    reference.release()
    assert set(model.peft_config) == {"default"}


def test_continued_run_saves_only_the_trained_adapter(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    from onecard.recipe import validate_recipe
    from onecard.train.loop import train

    sft_run = make_run(tmp_path / "sft", tiny_llama_dir, method="lora", seed=7)
    tree = preference_tree(tmp_path, tiny_llama_dir, "dpo", adapter={"init_adapter": str(sft_run)})
    summary = train(validate_recipe(tree))
    adapter = tmp_path / "runs" / "pref" / "adapter"
    assert summary["steps"] == 2
    assert not (adapter / "reference").exists()
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    sft = load_file(str(sft_run / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == sft.keys()
    assert any(not torch.equal(saved[k], sft[k]) for k in sft)


@pytest.mark.parametrize("method", ["dora", "qlora", "full"])
def test_methods_train_against_an_unmoved_reference(tmp_path, tiny_llama_dir, method):
    """DoRA and QLoRA (adapter disabled) and full fine-tuning (frozen copy): training moves the policy, the
    reference keeps giving the starting model's log-probs."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from onecard.train.preference_reference import setup_reference

    recipe, model, tok, dataset, batch = setup(tmp_path, tiny_llama_dir, method=method,
                                               quant={"compute_dtype": "float32"})
    start = logps_of(model, batch)
    reference = setup_reference(model, recipe)
    assert reference.mode == ("copy" if method == "full" else "adapter-disabled")
    train_steps(model, reference, recipe, dataset, tok)
    assert torch.allclose(reference_logps(reference, batch), start, atol=1e-4)
    assert not torch.allclose(logps_of(model, batch), start, atol=1e-3)

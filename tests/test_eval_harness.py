"""evaluate() / onecard eval: loss on the training masking, baseline == the base model, improvement is seen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from onecard_run_fixtures import make_run

QA = [("what is two plus two", "four"), ("name a colour", "blue"), ("say yes", "yes"), ("count to three", "1 2 3")]


def _write_data(path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for q, a in QA:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return path


def _train_adapter(run: Path, data: Path, steps: int = 40) -> None:
    """Memorise the four answers with plain torch (the real loop is another component): a tune that helps."""
    import torch

    from onecard.data import build_dataset, collate, model_inputs
    from onecard.eval.runs import load_run

    loaded = load_run(run, "cpu")
    model = loaded.model
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    recipe = loaded.recipe.model_copy(update={"data": loaded.recipe.data.model_copy(update={"path": str(data)})})
    batch = collate(build_dataset(recipe, loaded.tokenizer, "train").examples, loaded.tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(**model_inputs(batch), labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(run / "adapter")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from onecard.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("eval")
    data = _write_data(root / "qa.jsonl")
    # initializer_range 0.3: with the default 0.02 the frozen lm_head caps logits near 1, so no adapter could
    # memorise anything; B = 0 (scale 0) so the adapter starts as the base model.
    base = save_tiny_model(root / "base", "llama", initializer_range=0.3)
    run = make_run(root, str(base), "lora", scale=0.0)
    _train_adapter(run, data)
    return run, data, str(base)


def test_baseline_is_the_base_model_and_tune_improves(trained):
    from onecard.eval import evaluate
    from onecard.eval.runs import load_model_dirs, load_run

    run, data, base_dir = trained
    loaded = load_run(run, "cpu")
    result = evaluate(loaded.model, loaded.tokenizer, loaded.recipe, str(data), baseline=True, max_new_tokens=8)
    base_only = load_model_dirs(base_dir, None, "cpu", dtype="float32")
    plain = evaluate(base_only.model, base_only.tokenizer, base_only.recipe, str(data), max_new_tokens=8)
    assert result["baseline"]["loss"] == pytest.approx(plain["tuned"]["loss"], rel=1e-5)
    assert [s["baseline"] for s in result["samples"]] == [s["tuned"] for s in plain["samples"]]
    assert result["tuned"]["loss"] < 0.5 * result["baseline"]["loss"]
    assert result["tuned"]["exact_match"] >= 0.75 > result["baseline"]["exact_match"]
    assert result["delta"]["token_f1"] > 0 and result["delta"]["loss"] < 0
    assert result["examples"] == {"loss": 4, "generation": 4}
    assert result["tuned"]["tokens"] > 0 and result["decoding"]["strategy"] == "greedy"


def test_loss_matches_hf_loss_on_the_training_masking(trained):
    import torch

    from onecard.data import build_dataset, collate, model_inputs
    from onecard.eval.loss import heldout_loss
    from onecard.eval.runs import load_run

    run, data, base_dir = trained
    loaded = load_run(run, "cpu")
    recipe = loaded.recipe.model_copy(update={"data": loaded.recipe.data.model_copy(update={"path": str(data)})})
    examples = build_dataset(recipe, loaded.tokenizer, "train").examples
    ours = heldout_loss(loaded.model, examples, loaded.tokenizer.pad_token_id, batch_size=3)
    batch = collate(examples, loaded.tokenizer.pad_token_id)
    with torch.no_grad():  # HF's loss: token-weighted mean over the whole batch
        hf = loaded.model(**model_inputs(batch), labels=batch["labels"]).loss
    assert ours["loss"] == pytest.approx(float(hf), rel=1e-5)
    assert ours["tokens"] == int((batch["labels"][:, 1:] != -100).sum())


def _cli(args: list[str]) -> int:
    from onecard.cli import main

    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_cli_eval_baseline_writes_eval_json(trained, capsys):
    run, data, base_dir = trained
    assert _cli(["eval", str(run), "--data", str(data), "--baseline", "--json", "--max-new-tokens", "6",
                 "--max-examples", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((run / "eval.json").read_text())
    assert stored["delta"] == printed["delta"] and printed["examples"]["generation"] == 3
    assert _cli(["eval", str(run), "--model", "x", "--data", str(data)]) == 2


def test_cli_eval_table(trained, capsys):
    run, data, base_dir = trained
    assert _cli(["eval", str(run), "--data", str(data), "--baseline", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "base" in out and "ROUGE-L" in out


def test_demo_run_improves_over_base(demo_run):
    """Acceptance 3: on the shared demo run, ``evaluate --baseline`` shows the tune beating its base
    on the demo's held-out prompts (loss and token F1)."""
    from onecard.demo.dataset import HELDOUT_FILE
    from onecard.eval import evaluate
    from onecard.eval.runs import load_run

    loaded = load_run(demo_run[0])
    result = evaluate(loaded.model, loaded.tokenizer, loaded.recipe, str(HELDOUT_FILE), baseline=True,
                      max_examples=8, max_new_tokens=16)  # the house greeting alone is ~8 tokens
    assert result["delta"]["loss"] < 0
    if "token_f1" in result["delta"]:
        assert result["delta"]["token_f1"] > 0


def test_cli_model_and_adapter_dirs_match_run_dir(trained, tmp_path, capsys):
    run, data, base_dir = trained
    assert _cli(["eval", str(run), "--data", str(data), "--json", "--max-new-tokens", "2", "--out", str(tmp_path / "a.json")]) == 0
    assert _cli(["eval", "--model", base_dir, "--adapter", str(run / "adapter"), "--data", str(data), "--json",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["tuned"]["loss"] == pytest.approx(b["tuned"]["loss"], rel=1e-6)


def _loss_setup(vocab: int, device: str, dtype):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from onecard.tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=vocab)).to(device, dtype)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    gen = torch.Generator().manual_seed(2)
    examples = [{"input_ids": (ids := torch.randint(0, vocab, (n,), generator=gen).tolist()),
                 "labels": [-100] * 5 + ids[5:]} for n in (200, 333, 64, 500)]
    calls = []
    model.get_base_model().lm_head.register_forward_hook(lambda *a: calls.append(1))
    return model, examples, calls


def test_heldout_loss_on_the_cpu_takes_the_full_logits():
    """On the CPU the head runs and F.cross_entropy scores the full logits (faster there than the chunked
    reference); the token count skips the ignored labels."""
    import torch

    from onecard.data import collate, model_inputs
    from onecard.eval.loss import heldout_loss

    model, examples, calls = _loss_setup(300, "cpu", torch.float32)
    got = heldout_loss(model, examples, pad_id=0, batch_size=3)
    assert calls == [1, 1] and got["tokens"] == sum(len(e["input_ids"]) - 5 for e in examples)
    with torch.no_grad():  # transformers' own token-mean loss over the whole batch
        batch = collate(examples, 0)
        want = model(**model_inputs(batch), labels=batch["labels"]).loss
    assert got["loss"] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.gpu
def test_heldout_loss_on_cuda_never_builds_the_full_logits():
    """On CUDA a decoder + linear head is scored through the chunked head + CE (its Triton row kernel under
    inference mode): the head module never runs (that call is the (tokens x vocab) logits), and the loss of a bf16
    model is within bf16 rounding of the full logits' (a wrong row or a missed ignore index moves it far more).
    A head the fused op does not model (logit scaling) takes the full logits."""
    import torch

    from onecard.eval.loss import heldout_loss

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, examples, calls = _loss_setup(5000, "cuda", torch.bfloat16)
    fused = heldout_loss(model, examples, pad_id=0, batch_size=3)
    assert calls == [] and fused["tokens"] == sum(len(e["input_ids"]) - 5 for e in examples)
    model.get_base_model().config.logit_scale = 0.5  # the full logits (llama's forward ignores the field)
    full = heldout_loss(model, examples, pad_id=0, batch_size=3)
    assert calls == [1, 1] and full["tokens"] == fused["tokens"]
    assert fused["loss"] == pytest.approx(full["loss"], rel=2e-3)

"""apply_kernels on tiny models of each family: same loss and gradients, revert, convergence.

Tolerance (fp32 on CPU): loss relative 1e-5, every trainable gradient relative L2 error 1e-4
(the kernels change only summation order and the fused CE's chunking).
"""

import _kernel_env  # noqa: F401
import pytest
import torch
from _kernel_env import rel_err

from onecard.kernels._triton import reference_only
from onecard.patch import apply_kernels

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gemma2"]


@pytest.fixture(autouse=True)
def _fast_cpu_kernels(request):
    """Model-level tests check the wiring, not kernel numerics (tests/test_kernels_*.py do that):
    on CPU they use the torch references, since the Triton interpreter makes them ~20x slower.
    Tests named ``*_through_triton_interpreter`` keep the interpreted kernels (Triton path wired end to end)."""
    if "through_triton_interpreter" in request.node.name or torch.cuda.is_available():
        yield
    else:
        with reference_only():
            yield


def _model(arch, seed=0, lora=False):
    import transformers

    from onecard.tiny import tiny_config

    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=300, intermediate_size=96)
    if arch == "gemma2":
        cfg.final_logit_softcapping = 5.0  # small, so the capping bends these random logits
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
        for name, p in model.named_parameters():  # peft inits B = 0: make the adapters do something
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    model.train()
    return model


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (2, 19), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100  # prompt tokens not trained
    return ids, labels


def _loss_and_grads(model, ids, labels, **kw):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("lora", [False, True])
def test_loss_and_every_grad_match(arch, lora):
    _check_family(arch, lora)


def test_llama_lora_through_triton_interpreter():
    _check_family("llama", True)


def _check_family(arch, lora):
    model = _model(arch, lora=lora)
    ids, labels = _batch()
    plain, g_plain = _loss_and_grads(model, ids, labels)
    handle = apply_kernels(model, "onecard")
    assert {"rms_norm", "mlp", "fused_linear_ce"} <= set(handle.patched), handle.summary()
    fused, g_fused = _loss_and_grads(model, ids, labels)
    assert fused.logits is None  # training + labels: logits never built
    assert abs(float(fused.loss) - float(plain.loss)) <= 1e-5 * float(plain.loss)
    assert g_plain.keys() == g_fused.keys() and len(g_plain) > 0
    for name in g_plain:
        assert rel_err(g_fused[name], g_plain[name]) <= 1e-4, name
    handle.revert()
    again, _ = _loss_and_grads(model, ids, labels)
    assert again.logits is not None and float(again.loss) == pytest.approx(float(plain.loss), rel=1e-6)


def test_num_items_in_batch_gives_sum_over_count():
    model = _model("llama")
    ids, labels = _batch()
    apply_kernels(model)
    n_trained = int((labels[:, 1:] != -100).sum())
    mean = model(input_ids=ids, labels=labels).loss
    summed = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(1)).loss
    assert float(summed) == pytest.approx(float(mean) * n_trained, rel=1e-5)


def test_patches_the_instance_only():
    a, b = _model("llama", seed=0), _model("llama", seed=0)
    handle = apply_kernels(a)
    ids, labels = _batch()
    assert "forward" in a.__dict__ and "forward" not in b.__dict__
    assert b(input_ids=ids, labels=labels).logits is not None
    handle.revert()
    assert not any("forward" in m.__dict__ for m in a.modules())
    handle.revert()  # idempotent


def test_eval_and_generation_keep_logits():
    model = _model("qwen2")
    apply_kernels(model)
    model.eval()
    ids, labels = _batch()
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        gen = model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.logits.shape == (2, 19, 300) and gen.shape == (1, 8)


@pytest.mark.parametrize("arch", FAMILIES)
def test_generation_with_kv_cache_matches_unpatched(arch):
    """Greedy generation with a KV cache through the patched modules gives the unpatched model's tokens: the cache
    reaches the patched attention under the name the installed transformers uses (``past_key_values`` in 5.17,
    ``cache`` from 5.24); a forward that missed it attends each new token to itself alone."""
    model = _model(arch, lora=True).eval()
    ids = _batch()[0][:1, :6]
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)
        apply_kernels(model)
        got = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(got, want)


def test_unsupported_architecture_falls_back_with_notice():
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    handle = apply_kernels(model)
    assert not handle.active and "gpt2" in handle.notice and "\n" not in handle.notice


def test_none_and_bad_choice():
    model = _model("llama")
    assert not apply_kernels(model, "none").active
    with pytest.raises(ValueError):
        apply_kernels(model, "fast")


def test_dropout_lora_falls_back_to_peft_mlp():
    """LoRA dropout > 0 is not modelled by the fused MLP: the patched forward must defer to peft's."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from onecard.patch.modules import projection_parts
    from onecard.tiny import tiny_config

    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=300))
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.1, target_modules=["gate_proj"]))
    gate = model.get_base_model().model.layers[0].mlp.gate_proj
    assert projection_parts(gate, torch.float32) is None
    handle = apply_kernels(model, "onecard")  # and the user is told, in one line
    assert "LoRA dropout 0.1" in handle.notice and "adapter.dropout: 0" in handle.notice
    handle.revert()
    plain = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=300))
    plain = get_peft_model(plain, LoraConfig(r=4, lora_dropout=0.0, target_modules=["gate_proj"]))
    assert apply_kernels(plain, "onecard").notice is None


def test_unfusable_adapters_are_named_in_the_notice_and_run_by_peft():
    """A bias on lora_B or two active adapters: the fused ops cannot run them, the layers defer to peft (same loss as
    without kernels) and the notice says why, once per reason."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from onecard.patch.modules import projection_parts
    from onecard.tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=300))
    model = get_peft_model(model, LoraConfig(r=4, lora_bias=True, target_modules=["gate_proj", "q_proj"]))
    model.add_adapter("second", LoraConfig(r=4, target_modules=["up_proj"]))
    layers = model.get_base_model().model.layers
    layers[0].mlp.up_proj.set_adapter(["default", "second"])
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids, labels=ids).loss
    assert projection_parts(layers[1].mlp.gate_proj, torch.float32) is None  # bias on B
    assert projection_parts(layers[0].mlp.up_proj, torch.float32) is None  # two active adapters
    assert projection_parts(layers[1].mlp.up_proj, torch.float32) is not None  # "second" not active there
    handle = apply_kernels(model, "onecard")
    assert handle.notice.startswith("2 active adapters, a bias on lora_B: onecard's fused attention and MLP")
    assert "adapter.dropout" not in handle.notice
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, want)
    handle.revert()


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_convergence_30_steps(arch):
    """30 AdamW steps of LoRA on a fixed batch, with and without kernels: the mean loss of the
    last 10 steps agrees within 1% (and training actually lowers the loss)."""
    ids, labels = _batch(seed=3)

    def run(kernels):
        model = _model(arch, seed=0, lora=True)
        apply_kernels(model, kernels)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(float(loss))
        return losses

    plain, fused = run("none"), run("onecard")
    tail_plain, tail_fused = sum(plain[-10:]) / 10, sum(fused[-10:]) / 10
    assert tail_plain < plain[0] * 0.95
    assert abs(tail_fused - tail_plain) <= 0.01 * tail_plain


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_checkpointed_lora_matches_and_recompute_skips_down_projection(arch, monkeypatch):
    """Under non-reentrant checkpointing the patched model gives the unpatched, uncheckpointed model's loss and
    gradients, while the recompute skips the MLP's down projection where the family allows it (not Gemma 2:
    its post-MLP norm reads the output) and q/k/v and o run through the fused LoRA projections (not Gemma 2)."""
    from onecard.patch import modules
    from onecard.patch.recompute import recompute_contexts

    calls = {"skip": 0, "full": 0, "projections": 0}
    real_mlp, real_proj = modules.lora_mlp, modules.lora_projections

    def counting_mlp(*args, **kw):
        calls["skip" if kw.get("skip_output") else "full"] += 1
        return real_mlp(*args, **kw)

    def counting_projections(*args, **kw):
        calls["projections"] += 1
        return real_proj(*args, **kw)

    monkeypatch.setattr(modules, "lora_mlp", counting_mlp)
    monkeypatch.setattr(modules, "lora_projections", counting_projections)
    model = _model(arch, lora=True)
    ids, labels = _batch()
    plain, g_plain = _loss_and_grads(model, ids, labels)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                       "context_fn": recompute_contexts})
    model.enable_input_require_grads()
    handle = apply_kernels(model, "onecard")
    fused, g_fused = _loss_and_grads(model, ids, labels)
    assert abs(float(fused.loss) - float(plain.loss)) <= 1e-5 * float(plain.loss)
    for name in g_plain:
        assert rel_err(g_fused[name], g_plain[name]) <= 1e-4, name
    layers = model.config.num_hidden_layers
    assert calls["full"] == layers + (layers if arch == "gemma2" else 0)  # forward (+ Gemma 2's recompute)
    assert calls["skip"] == (0 if arch == "gemma2" else layers)
    assert calls["projections"] == (0 if arch == "gemma2" else 2 * 2 * layers)  # qkv + o, forward + recompute
    handle.revert()


def test_kernels_applied_after_checkpointing_still_mark_the_recompute():
    """A model checkpointed before apply_kernels (plain transformers kwargs) gets its checkpoint wrapped, and
    revert() puts the original function back."""
    model = _model("llama", lora=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layer = model.get_base_model().model.layers[0]
    before = layer._gradient_checkpointing_func
    handle = apply_kernels(model, "onecard")
    assert handle.patched["recompute_marks"] == model.config.num_hidden_layers
    assert layer._gradient_checkpointing_func is not before
    handle.revert()
    assert layer._gradient_checkpointing_func is before


def test_a_lora_variant_the_fused_ops_do_not_model_is_named_and_run_by_peft():
    """peft's LoRA variants other than DoRA (here aLoRA, which activates after an invocation token) change the
    adapter's forward: the projections defer to peft (same loss) and the notice names the variant."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from onecard.patch.modules import projection_parts
    from onecard.tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=300))
    config = LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], alora_invocation_tokens=[7],
                        task_type="CAUSAL_LM", init_lora_weights=False)  # B != 0: the adapter changes the loss
    model = get_peft_model(model, config)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    ids[0, 3] = 7
    want = model(input_ids=ids, labels=ids).loss
    assert projection_parts(model.get_base_model().model.layers[0].mlp.gate_proj, torch.float32) is None
    handle = apply_kernels(model, "onecard")
    assert handle.notice.startswith("the LoRA variant ALoraLinearVariant: onecard's fused attention and MLP")
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, want)
    handle.revert()

"""Acceptance 1: the planner's static bytes equal the tensors transformers/peft/bitsandbytes/torch really create.

Tiny models with dims large enough that NF4 blocks (64), double-quant blocks (256), 8-bit optimizer blocks (256)
and bitsandbytes' min_8bit_size (4096: LoRA A of rank 8 x 256 = 2048 elements stays fp32) are all exercised.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from onecard.catalog.models import ModelShape  # noqa: E402
from onecard.plan import static  # noqa: E402
from onecard.plan.inputs import ALL_TARGETS  # noqa: E402

RANK = 8


def _config(arch="llama", **kw):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    return cls(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, **kw)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("exact-llama")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(_config(tie_word_embeddings=False), dtype=torch.bfloat16
                                                  ).save_pretrained(path)
    return path


def _bf16_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)


def _shape(model) -> ModelShape:
    return ModelShape.from_config(model.config.to_dict(), id="tiny")


def _param_bytes(model, trainable=None) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if trainable is None or p.requires_grad == trainable)


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _step(model, optimizer) -> tuple[int, int]:
    """One forward/backward/step; returns (gradient bytes, optimizer state bytes)."""
    ids = torch.randint(0, 320, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    state = _unique_bytes(v for s in optimizer.state.values() for v in s.values())
    return grads, state


def _optimizer(name, params):
    params = [p for p in params if p.requires_grad]
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    import bitsandbytes as bnb

    import warnings

    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name](params, lr=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("optimizer", ["adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"])
def test_adapter_methods_exact(saved_llama, method, optimizer):
    model = _bf16_model(saved_llama)
    shape = _shape(model)
    assert static.base_weight_bytes(shape, method, 2) == _param_bytes(model)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, target_modules=list(ALL_TARGETS),
                                                       use_dora=method == "dora"))
    tensors = static.trainable_tensors(shape, method, RANK, ALL_TARGETS)
    tbytes = static.trainable_dtype_bytes(method, 2)
    assert sum(tensors) * tbytes == _param_bytes(model, trainable=True)
    assert any(n < static.BNB_MIN_8BIT_SIZE for n in tensors) and any(n >= static.BNB_MIN_8BIT_SIZE for n in tensors)
    grads, state = _step(model, _optimizer(optimizer, model.parameters()))
    assert grads == sum(tensors) * tbytes
    assert state == static.optimizer_state_bytes(tensors, optimizer, tbytes)


@pytest.mark.parametrize("optimizer", ["adamw_torch_fused", "adamw_8bit"])
def test_full_exact(saved_llama, optimizer):
    model = _bf16_model(saved_llama)
    shape = _shape(model)
    tensors = static.trainable_tensors(shape, "full", RANK, ALL_TARGETS)
    assert sum(tensors) * 2 == _param_bytes(model, trainable=True) == static.base_weight_bytes(shape, "full", 2)
    grads, state = _step(model, _optimizer(optimizer, model.parameters()))
    assert grads == sum(tensors) * 2
    assert state == static.optimizer_state_bytes(tensors, optimizer, 2)


def test_qwen2_bias_and_tied_embeddings_exact():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("qwen2", tie_word_embeddings=True),
                                                          dtype=torch.bfloat16)
    shape = _shape(model)
    assert shape.attention_bias and shape.tie_word_embeddings
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    assert static.base_weight_bytes(shape, "lora", 2) == _param_bytes(model)


def _qlora_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            parts = [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
            total += sum(t.numel() * t.element_size() for t in parts)
    return total


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_nf4_exact(saved_llama, double_quant):
    pytest.importorskip("bitsandbytes")
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(saved_llama, quantization_config=q,
                                                              dtype=torch.bfloat16, device_map="cpu")
    shape = _shape(model)
    # embeddings, lm_head and norms stay bf16 straight after loading ...
    assert _qlora_bytes(model) == static.base_weight_bytes(shape, "qlora", 2, double_quant=double_quant,
                                                           kbit_upcast=False)
    # ... and prepare_model_for_kbit_training (the onecard QLoRA loader) casts them to fp32
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert _qlora_bytes(model) == static.base_weight_bytes(shape, "qlora", 2, double_quant=double_quant,
                                                           kbit_upcast=True)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, target_modules=list(ALL_TARGETS)))
    assert sum(static.trainable_tensors(shape, "qlora", RANK, ALL_TARGETS)) * 4 == _param_bytes(model, trainable=True)


def test_nf4_formula_matches_quantize_4bit_at_odd_sizes():
    """Sizes that are not multiples of 64 or 256 blocks: the ceil() in the formula is what bitsandbytes does."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    for rows, cols in ((96, 200), (17, 64 * 257 // 17 + 3)):
        w = torch.randn(rows, cols, dtype=torch.bfloat16)
        packed, qs = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        parts = [packed, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
        assert sum(t.numel() * t.element_size() for t in parts) == static.nf4_tensor_bytes(rows * cols, True)

"""An FSDP-trained adapter is saved with every tensor (issue 9): peft's save_pretrained given accelerate's gathered
state dict wrote an empty adapter under nested FSDP units (onecard.train.fsdp_save). FSDP1 runs on CPU here in a
one-process gloo group; the file must equal peft's own save of the same model before wrapping, key for key."""

import copy
import socket

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("dora", [False, True])
def test_fsdp_adapter_saves_every_tensor_as_peft_does(gloo_group, tmp_path, dora):
    import peft
    import transformers
    from peft.utils.other import fsdp_auto_wrap_policy
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType

    from onecard.tiny import tiny_config
    from onecard.train.distributed_loop import _WithStateDict
    from onecard.train.fsdp_save import fsdp_units_unwrapped

    def fresh_base():
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=320))

    model = peft.get_peft_model(fresh_base(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      use_dora=dora, init_lora_weights=False))
    plain = copy.deepcopy(model)
    plain.save_pretrained(tmp_path / "plain")
    wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True,
                   device_id=torch.device("cpu"))
    inner = wrapped.module
    assert any(isinstance(m, FSDP) for m in inner.modules())  # nested units: what broke peft's key match
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        state = wrapped.state_dict()
    names_before = [n for n, _ in inner.named_modules()]
    _WithStateDict(inner, state).save_pretrained(str(tmp_path / "fsdp"), safe_serialization=True)
    assert [n for n, _ in inner.named_modules()] == names_before  # the units are back in place

    want = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    got = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    assert len(want) == 3 * (3 if dora else 2) * 2  # 2 layers x 3 targets x (A, B[, magnitude])
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with fsdp_units_unwrapped(inner):  # and peft's loader reads it back into the same model
        assert not any(isinstance(m, FSDP) for m in inner.modules())
    reloaded = peft.PeftModel.from_pretrained(fresh_base(), tmp_path / "fsdp")
    assert reloaded.peft_config["default"].use_dora == dora
    loaded = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(want)

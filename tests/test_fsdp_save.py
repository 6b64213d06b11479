"""An FSDP-trained adapter is saved with every tensor: under FSDP1 peft's save_pretrained given the gathered state
dict wrote an empty adapter (nested wrapper units, onecard.train.fsdp_save). FSDP2 (``fully_shard`` on a CPU mesh)
runs here in a one-process gloo group, one unit per decoder layer as onecard wraps; the trainable tensors gathered by
``gathered_trainable`` and saved must equal peft's own save of the same model before sharding, key for key."""

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
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    from onecard.tiny import tiny_config
    from onecard.train.distributed_loop import _WithStateDict
    from onecard.train.fsdp_save import gathered_trainable

    def fresh_base():
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=320))

    model = peft.get_peft_model(fresh_base(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      use_dora=dora, init_lora_weights=False))
    plain = copy.deepcopy(model)
    plain.save_pretrained(tmp_path / "plain")
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert isinstance(model, FSDPModule) and all(isinstance(p, DTensor) for p in model.parameters())
    state = gathered_trainable(model)
    assert state and all(not isinstance(t, DTensor) for t in state.values())
    assert all(model.get_parameter(k).requires_grad for k in state)  # the frozen base is not gathered
    _WithStateDict(model, state).save_pretrained(str(tmp_path / "fsdp"), safe_serialization=True)

    want = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    got = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    assert len(want) == 3 * (3 if dora else 2) * 2  # 2 layers x 3 targets x (A, B[, magnitude])
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    reloaded = peft.PeftModel.from_pretrained(fresh_base(), tmp_path / "fsdp")
    assert reloaded.peft_config["default"].use_dora == dora
    loaded = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(want)

"""Host work per decoder layer of a checkpointed LoRA step, counted on the CPU: Python function calls (cProfile) and
tensors saved for backward. Counts, not times: they do not depend on the machine, and on a GPU whose step is bound by
the host (docs/kernels.md, the 14B FP8 row) each of them costs time. A tiny Qwen2 (8 layers, hidden 64) in bf16 with
fp32 LoRA r4 on every projection, onecard's kernels (their torch references for RMSNorm and RoPE, as on any CPU
without Triton's interpreter), non-reentrant checkpoints with onecard's offload hooks (on the CPU nothing moves).

    PYTHONPATH=src python bench/host_calls_cpu.py
"""

from __future__ import annotations

import cProfile
import os
import pstats

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

LAYERS = 8


def build():
    import transformers
    from peft import LoraConfig, get_peft_model

    from onecard.patch import apply_kernels, offload
    from onecard.patch.recompute import recompute_contexts
    from onecard.tiny import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("qwen2", vocab_size=300, intermediate_size=64, num_hidden_layers=LAYERS)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                       "context_fn": recompute_contexts})
    model.enable_input_require_grads()
    model.train()
    apply_kernels(model, "onecard")
    offload.enable_offloaded_checkpointing(model)
    return model


def main() -> None:
    from onecard.kernels._triton import reference_only

    model = build()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 300, (1, 16))
    with reference_only():
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        profiler = cProfile.Profile()
        profiler.enable()
        model(input_ids=ids, labels=ids).loss.backward()
        profiler.disable()
        opt.zero_grad(set_to_none=True)
        saved = [0]

        def pack(t):
            saved[0] += 1
            return t

        model.gradient_checkpointing_disable()  # every saved tensor of a layer, as its checkpoint sees them
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
    calls = pstats.Stats(profiler).total_calls
    print(f"python calls per layer per step: {calls / LAYERS:.0f}; tensors saved per layer: {saved[0] / LAYERS:.2f} "
          f"(torch {torch.__version__})")


if __name__ == "__main__":
    main()

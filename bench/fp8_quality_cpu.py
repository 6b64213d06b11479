"""Where the FP8 base's step-0 gradient error comes from, emulated on the CPU (fp32) on SmolLM2-135M-Instruct.

Run: ``python bench/fp8_quality_cpu.py`` (about 2 minutes on 2 cores). The set-up of protocol item 3 in notes/fp8.md
(demo data, LoRA r16 with lora_B ~ N(0, 0.02), the first micro-batch of 2 at seq 256, seed 7), against fp32:
bf16 (the rounding reference), the block weights fake-quantised to e4m3 per output channel and per 64 / 32 input
columns (the forward function changes, nothing else), and onecard's Fp8Linear (W, activations and dy quantised; the
torch._scaled_mm emulation of kernels/fp8.py). Prints the loss and the worst and median cosine of every adapter
gradient. Not a GPU run: the numbers say what e4m3 costs in exact arithmetic, not what the H200's kernels do.
"""
import sys, copy, torch, statistics

torch.set_num_threads(2)
from onecard.recipe import validate_recipe
from onecard.train.gguf_import import find_smollm2_gguf
from onecard.demo.dataset import TRAIN_FILE
from onecard.train.model import load_model_and_tokenizer
from onecard.train.spine import seed_everything
from onecard.data import build_dataset, collate, model_inputs, pad_token_id
from onecard.kernels.fp8 import E4M3, E4M3_MAX

def make(dtype="float32"):
    r = validate_recipe({"name":"d","model":{"name_or_path":str(find_smollm2_gguf()),"dtype":dtype},"method":"lora",
        "adapter":{"rank":16},"data":{"path":str(TRAIN_FILE),"seq_len":256},
        "training":{"micro_batch_size":2,"seed":7,"kernels":"none"},"output_dir":"runs/fp8-cpu/{name}"})
    seed_everything(7)
    m, tok = load_model_and_tokenizer(r, "cpu")
    torch.manual_seed(0)
    for n,p in m.named_parameters():
        if "lora_B" in n: p.data.normal_(0,0.02)
    ex = build_dataset(r, tok, split="train").examples[:2]
    batch = collate(ex, pad_token_id(tok))
    return m, batch

def grads(m, batch):
    m.zero_grad(set_to_none=True)
    out = m(**model_inputs(batch), labels=batch["labels"])
    out.loss.backward()
    return out.loss.item(), {n: p.grad.detach().float().flatten().clone() for n,p in m.named_parameters() if p.requires_grad}

def q(w, block=None):
    if block is None:
        s = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)/E4M3_MAX
        return (w/s).to(E4M3).float()*s
    o,i = w.shape
    wb = w.reshape(o, i//block, block)
    s = wb.abs().amax(dim=2, keepdim=True).clamp_min(1e-12)/E4M3_MAX
    return ((wb/s).to(E4M3).float()*s).reshape(o,i)

def fake_weights(m, block=None):
    for n, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and "base_layer" in n and ".layers." in n:
            mod.weight.data = q(mod.weight.data.float(), block).to(mod.weight.dtype)

def cos(a, b):
    c = {n: float(torch.nn.functional.cosine_similarity(a[n], b[n], dim=0)) for n in a}
    w = min(c, key=c.get); v = sorted(c.values())
    return f"worst {c[w]:.4f} ({w.split('model.model.')[-1]}), median {v[len(v)//2]:.4f}"

m, batch = make()
l0, g0 = grads(m, batch)
print("fp32 loss", l0)
mb, _ = make("bfloat16")
lb, gb = grads(mb, batch); print("bf16 vs fp32: loss", lb, cos(g0, gb))
del mb
for block in (None, 64, 32):
    mq, _ = make(); fake_weights(mq, block)
    lq, gq = grads(mq, batch); print(f"W e4m3 fake-quant block={block}: loss", lq, cos(g0, gq))
    del mq
from onecard.patch.fp8 import fp8_linears_
mf, _ = make(); h = fp8_linears_(mf); print("fp8 linears", h.patched)
lf, gf = grads(mf, batch); print("onecard Fp8Linear (W,x,dy quantised): loss", lf, cos(g0, gf))
mq, _ = make(); fake_weights(mq, None)
lq, gq = grads(mq, batch); print("Fp8Linear vs W-fake-quant only:", cos(gq, gf))

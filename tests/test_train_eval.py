"""onecard train runs the eval section: every N steps into metrics.jsonl, and at the end into eval.json."""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def test_eval_every_steps_and_at_end(tmp_path, tiny_llama_dir):
    from onecard.recipe import validate_recipe
    from onecard.train.loop import train

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "yes fox"}]}
            for i in range(12)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = validate_recipe({
        "name": "evalrun", "model": {"name_or_path": tiny_llama_dir}, "method": "lora",
        "data": {"path": str(data), "seq_len": 32, "eval_fraction": 0.25},
        "training": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "learning_rate": 5e-3,
                     "optimizer": "adamw_torch", "grad_ckpt": False},
        "eval": {"every_steps": 2, "at_end": True, "max_new_tokens": 4},
        "output_dir": str(tmp_path / "runs" / "{name}"),
    })
    summary = train(recipe)
    metrics = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    eval_steps = [m["step"] for m in metrics if "eval_loss" in m]
    assert eval_steps == [2, 4]
    saved = json.loads((recipe.run_dir / "eval.json").read_text())
    assert saved["tuned"]["loss"] > 0 and "baseline" in saved and "delta" in saved
    on_disk = json.loads((recipe.run_dir / "summary.json").read_text())
    assert on_disk["eval"]["tuned"]["loss"] == saved["tuned"]["loss"] == summary["eval"]["tuned"]["loss"]
    assert on_disk["plan"]["total_bytes"] > 0 and on_disk["plan"]["components"]

"""train/host_gc.py: the objects alive when the loop starts are frozen out of the collector while it runs, the
collector still frees cycles made during the steps, and everything is unfrozen when the loop ends (also on error)."""

from __future__ import annotations

import gc
import weakref

import pytest

from test_train_accum import recipe_for


class _Node:
    pass


def _cycle():
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_freeze_keeps_collecting_new_cycles_and_unfreezes():
    from onecard.train.host_gc import freeze_startup_objects, unfreeze

    assert gc.get_freeze_count() == 0
    alive_before = _Node()
    freeze_startup_objects()
    try:
        assert gc.get_freeze_count() > 0 and gc.isenabled()
        assert not any(o is alive_before for o in gc.get_objects())  # frozen: not in any scanned generation
        made_during_steps = _cycle()
        gc.collect()
        assert made_during_steps() is None
    finally:
        unfreeze()
    assert gc.get_freeze_count() == 0
    assert any(o is alive_before for o in gc.get_objects())


def test_training_loop_steps_run_frozen_then_unfreeze(tmp_path, tiny_llama_dir, monkeypatch):
    from onecard.train import spine
    from onecard.train.loop import train

    seen, real_step = [], spine.optimizer_step

    def step_and_record(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(spine, "optimizer_step", step_and_record)
    train(recipe_for(tmp_path, tiny_llama_dir, max_steps=2, grad_accum=1))
    assert len(seen) == 2 and min(seen) > 1000  # the model's modules and parameters among them
    assert gc.get_freeze_count() == 0

    def failing_step(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(spine, "optimizer_step", failing_step)
    (tmp_path / "again").mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        train(recipe_for(tmp_path / "again", tiny_llama_dir, max_steps=2, grad_accum=1))
    assert gc.get_freeze_count() == 0

"""Python's garbage collector during training: the objects alive at the start frozen out of its scans.

A loaded model is ~620k objects the collector tracks (modules, parameters, peft layers, their dicts). Each time
its oldest generation comes due it walks every one of them while the GPU runs dry: 300-380 ms per collection for
Qwen 2.5 14B on the H200 machine's host, about one step in ten to fifteen, against 0.6 s steps
(bench/host_overhead_gpu.py, bench/results/host_overhead_14b_2026-12-04.json; frozen, the same collection: 0 ms).
``gc.freeze()`` moves everything alive into a permanent generation that collections skip; the collector keeps
running, automatically, on what the steps themselves allocate.

Why freeze rather than the field's other answer: OLMo-core's GarbageCollectorCallback and llm-foundry's
ScheduledGarbageCollector disable automatic collection and run ``gc.collect(1)`` every N steps, which leaves
reference cycles made between those steps to pile up and needs an N; vLLM freezes its heap after start-up, as here.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect once, then freeze what is alive (the model, optimizer, data) out of later collections. Frozen
    objects freed by reference counting go as usual; a cycle among them waits for :func:`unfreeze`, called when
    the loop ends."""
    gc.collect()
    gc.freeze()


def unfreeze() -> None:
    gc.unfreeze()

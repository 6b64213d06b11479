"""summarize_snapshot on a hand-built torch.cuda.memory_snapshot() list (no GPU): per-stream sums, idle segments,
the inactive-size histogram, device filtering; and the probe's snapshot bookkeeping (peak kept, not the last)."""

from __future__ import annotations

import json

import pytest

from onecard.bench.memory_snapshot import BUCKETS_BYTES, gib_view, summarize_snapshot

MIB = 2**20


def seg(stream, blocks, device=0, kind="large"):
    """A segment as the caching allocator reports it: blocks tile the segment in address order."""
    total = sum(size for size, _ in blocks)
    allocated = sum(size for size, state in blocks if state == "active_allocated")
    return {"device": device, "stream": stream, "segment_type": kind, "total_size": total,
            "allocated_size": allocated, "active_size": allocated,
            "blocks": [{"size": size, "state": state, "requested_size": size - (1 if state == "active_allocated" else 0)}
                       for size, state in blocks]}


SNAPSHOT = [
    # default stream: a 2 MiB small segment half used, a 100 MiB segment with a 60 MiB hole and a pending free
    seg(0, [(1 * MIB, "active_allocated"), (512 * 1024, "inactive"), (512 * 1024, "active_allocated")], kind="small"),
    seg(0, [(30 * MIB, "active_allocated"), (60 * MIB, "inactive"), (10 * MIB, "active_pending_free")]),
    # a side stream (FSDP's unshard stream): one whole idle 600 MiB segment and one 200 MiB block in a 400 MiB one
    seg(77, [(600 * MIB, "inactive")]),
    seg(77, [(200 * MIB, "active_allocated"), (200 * MIB, "inactive")]),
    # another device's segment (a snapshot covers every device this process touched)
    seg(0, [(40 * MIB, "inactive")], device=1),
]


def test_per_stream_sums_from_blocks():
    out = summarize_snapshot(SNAPSHOT, device=0)
    s0, s77 = out["streams"]["0"], out["streams"]["77"]
    assert list(out["streams"]) == ["0", "77"]
    assert s0["segments"] == 2 and s77["segments"] == 2
    assert s0["reserved_bytes"] == 2 * MIB + 100 * MIB
    assert s0["allocated_bytes"] == 1 * MIB + 512 * 1024 + 30 * MIB
    assert s0["requested_bytes"] == s0["allocated_bytes"] - 3  # three allocated blocks, each rounded up by 1 byte
    assert s0["pending_free_bytes"] == 10 * MIB
    assert s0["inactive_bytes"] == 512 * 1024 + 60 * MIB
    assert s0["largest_inactive_bytes"] == 60 * MIB
    assert s0["segment_types"] == {"small": 1, "large": 1}
    assert s0["idle_segments"] == 0
    assert s77["reserved_bytes"] == 1000 * MIB and s77["allocated_bytes"] == 200 * MIB
    assert s77["inactive_bytes"] == 800 * MIB and s77["largest_inactive_bytes"] == 600 * MIB
    assert s77["idle_segments"] == 1 and s77["idle_segment_bytes"] == 600 * MIB
    for acc in (s0, s77):  # the blocks tile each segment
        assert acc["allocated_bytes"] + acc["pending_free_bytes"] + acc["inactive_bytes"] == acc["reserved_bytes"]


def test_histogram_buckets_and_totals():
    out = summarize_snapshot(SNAPSHOT, device=0)
    hist0, hist77 = out["streams"]["0"]["inactive_hist"], out["streams"]["77"]["inactive_hist"]
    assert list(hist0) == [name for name, _ in BUCKETS_BYTES]
    assert hist0["<1MiB"] == {"count": 1, "bytes": 512 * 1024}
    assert hist0["20-128MiB"] == {"count": 1, "bytes": 60 * MIB}
    assert hist77["128-512MiB"] == {"count": 1, "bytes": 200 * MIB}
    assert hist77[">=512MiB"] == {"count": 1, "bytes": 600 * MIB}
    assert hist77["1-20MiB"]["count"] == 0
    total = out["total"]
    assert total["segments"] == 4 and total["reserved_bytes"] == 1102 * MIB
    assert total["inactive_bytes"] == 512 * 1024 + 860 * MIB
    assert total["largest_inactive_bytes"] == 600 * MIB and total["largest_segment_bytes"] == 600 * MIB
    assert total["segment_types"] == {"small": 1, "large": 3}
    assert total["inactive_hist"]["20-128MiB"] == {"count": 1, "bytes": 60 * MIB}
    assert sum(c["bytes"] for c in total["inactive_hist"].values()) == total["inactive_bytes"]


def test_bucket_edges():
    out = summarize_snapshot([seg(0, [(MIB - 1, "inactive"), (MIB, "inactive"), (20 * MIB, "inactive"),
                                      (512 * MIB, "inactive")])])
    hist = out["total"]["inactive_hist"]
    assert [hist[name]["count"] for name, _ in BUCKETS_BYTES] == [1, 1, 1, 0, 1]


def test_device_filter_and_all_devices():
    everything = summarize_snapshot(SNAPSHOT)
    assert everything["total"]["segments"] == 5
    assert everything["streams"]["0"]["inactive_bytes"] == 512 * 1024 + 100 * MIB  # device 1's 40 MiB joins
    assert summarize_snapshot(SNAPSHOT, device=1)["total"]["reserved_bytes"] == 40 * MIB
    assert summarize_snapshot([])["total"]["reserved_bytes"] == 0


def test_json_and_gib_view():
    out = summarize_snapshot(SNAPSHOT, device=0)
    assert json.loads(json.dumps(out)) == out  # goes into a JSON row as is
    view = gib_view(out)
    assert view["stream_77_idle_segment_gib"] == round(600 / 1024, 3)
    assert view["stream_0_reserved_gib"] == round(102 / 1024, 3)


def test_probe_keeps_the_peak_reserved_snapshot():
    from onecard.bench.distributed_probe import PeakSnapshot

    reserved = iter([100, 300, 300, 200])
    snaps = iter([[seg(0, [(n * MIB, "inactive")])] for n in (1, 2, 3, 4)])
    keeper = PeakSnapshot(reserved_bytes=lambda: next(reserved), snapshot=lambda: next(snaps), device=0)
    for where in ("step1.backward", "step1.optimizer", "step2.backward", "step2.optimizer"):
        keeper.sample(where)
    assert keeper.where == "step1.optimizer"  # the first time reserved reached its maximum
    assert keeper.reserved_bytes == 300
    assert keeper.summary["total"]["reserved_bytes"] == 2 * MIB
    assert keeper.samples == 4


def test_probe_fsdp_row_records_the_fsdp2_plugin_and_refuses_fsdp1_flags():
    """The probe's row records what FSDP2 is given (distributed.fsdp_plugin); the FSDP1 variant flags (rate limit,
    prefetch order) have no FSDP2 knob, so they stop the probe instead of being silently ignored; None under DDP."""
    from types import SimpleNamespace as NS

    from onecard.train import distributed as D
    from onecard.bench.distributed_probe import _fsdp_variant, _variant_name

    def args(**flags):
        return NS(**{"no_limit_all_gathers": False, "forward_prefetch": False, "backward_prefetch": None, **flags})

    fsdp = NS(strategy="fsdp", accelerator=NS(state=NS(fsdp_plugin=D.fsdp_plugin())))
    settings = _fsdp_variant(fsdp, args())
    assert _variant_name(args()) == "default" and settings["fsdp_version"] == 2
    assert set(settings) == {"fsdp_version", "reshard_after_forward", "cpu_ram_efficient_loading"}
    for flag in ({"no_limit_all_gathers": True}, {"forward_prefetch": True}, {"backward_prefetch": "pre"}):
        with pytest.raises(SystemExit, match="FSDP1 settings"):
            _fsdp_variant(fsdp, args(**flag))
    ddp = NS(strategy="ddp", accelerator=NS(state=NS(fsdp_plugin=None)))
    assert _fsdp_variant(ddp, args(no_limit_all_gathers=True)) is None


def test_probe_steps_record_snapshots(monkeypatch):
    """The probe's step loop with --memory-snapshot, on CPU with torch.cuda's counters faked: the row gets the end
    summary, the peak sample (where reserved first peaked) and the sampling time. Guards the GPU-only code path
    against typos before device time is spent on it."""
    from types import SimpleNamespace as NS

    import torch

    from onecard.bench.build import build_base
    from onecard.bench.config import BenchConfig
    from onecard.recipe import validate_recipe
    from onecard.bench.distributed_probe import _steps
    from onecard.train.model import apply_adapter

    reserved = iter([10, 50, 50, 40, 30, 30])
    fake = {"synchronize": lambda *a: None, "memory_reserved": lambda *a: next(reserved),
            "max_memory_reserved": lambda *a: 50 * 2**30, "max_memory_allocated": lambda *a: 45 * 2**30,
            "memory_snapshot": lambda *a: [seg(0, [(MIB, "active_allocated"), (MIB, "inactive")])]}
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    cfg = BenchConfig(model="tiny", method="lora", seq=32, micro_batch=1, rank=4, grad_ckpt=False, kernels="none")
    recipe = validate_recipe(cfg.recipe_tree())
    torch.manual_seed(0)
    model = apply_adapter(build_base(cfg, "cpu"), recipe)
    dist = NS(device="cpu", rank=0, world=1, clip_grad_norm_=lambda m, n: torch.nn.utils.clip_grad_norm_(
        [p for p in m.parameters() if p.requires_grad], n))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    out = _steps(dist, model, optimizer, cfg, 3, memory_snapshot=True)
    assert len(out["losses"]) == 3 and out["peak_reserved_gib"] == 50
    assert out["memory_snapshot_at_peak"]["where"] == "step1.optimizer"
    assert out["memory_snapshot_at_peak"]["samples"] == 6
    assert out["memory_snapshot"]["total"]["inactive_bytes"] == MIB
    assert out["memory_snapshot_s_in_steps"] >= 0
    assert "memory_snapshot" not in _steps(dist, model, optimizer, cfg, 1)


def test_a_graphs_private_pool_is_summed_apart_from_the_default_pool():
    """A graphed step's memory is two pools side by side: the graph's private one (``segment_pool_id`` != (0, 0))
    and the eager one, both on the default stream."""
    graph = [dict(seg(0, [(300 * MIB, "active_allocated"), (100 * MIB, "inactive")]), segment_pool_id=[1, 4]),
             dict(seg(0, [(50 * MIB, "inactive")]), segment_pool_id=(1, 4))]
    eager = [dict(SNAPSHOT[1], segment_pool_id=(0, 0)), SNAPSHOT[0]]  # an old snapshot's segments carry no pool id
    out = summarize_snapshot(graph + eager, device=0)
    assert sorted(out["pools"]) == ["default", "graph:1,4"]
    assert out["pools"]["graph:1,4"]["reserved_bytes"] == 450 * MIB
    assert out["pools"]["graph:1,4"]["idle_segments"] == 1 and out["pools"]["default"]["reserved_bytes"] == 102 * MIB
    assert out["streams"]["0"]["reserved_bytes"] == out["total"]["reserved_bytes"] == 552 * MIB
    assert gib_view(out)["pool_graph:1,4_allocated_gib"] == round(300 / 1024, 3)

"""Where reserved-but-unallocated CUDA memory sits: a compact summary of ``torch.cuda.memory_snapshot()``.

Why: the 70B QLoRA FSDP1 probe on 2 x H200 peaked at 29.54 GiB *allocated* (0.993 of the planner) but 32.96 GiB
*reserved* (notes/multigpu.md). Before modelling or cutting the 3.4 GiB gap we need to know whether it is whole
cached segments on a side stream (FSDP1 all-gathers into buffers allocated on its unshard stream; PyTorch's caching
allocator never hands a block cached for one stream to another), many small split fragments (external
fragmentation), or rounding. A full snapshot of a 70B run is megabytes of per-block records with stack frames; this
reduces it to a few numbers per stream that fit in one JSON row of bench/results.

PyTorch ships ``torch.cuda._memory_viz.segsum`` for the same question, but it prints a per-segment text picture for a
human, is a private module, and does not split by stream; the per-stream totals below are what the question needs.

Pure: takes the snapshot list (so tests build one by hand, no GPU) and never imports torch.
"""

from __future__ import annotations

from typing import Any

MIB = 2**20

# Inactive (cached, free) block sizes. The caching allocator (c10/cuda/CUDACachingAllocator.cpp) serves requests
# <= 1 MiB from 2 MiB small-pool segments (kSmallSize, kSmallBuffer), 1-10 MiB from 20 MiB segments (kMinLargeAlloc,
# kLargeBuffer) and larger ones from segments rounded up to 2 MiB (kRoundLarge); >= 128 MiB is gathered-layer sized
# (one 70B decoder layer's NF4-in-bf16 flat parameter is ~0.4 GiB).
BUCKETS_BYTES: tuple[tuple[str, int], ...] = (
    ("<1MiB", 1 * MIB), ("1-20MiB", 20 * MIB), ("20-128MiB", 128 * MIB), ("128-512MiB", 512 * MIB),
    (">=512MiB", 2**63),
)


def _bucket(size_bytes: int) -> str:
    for name, upper in BUCKETS_BYTES:
        if size_bytes < upper:
            return name
    return BUCKETS_BYTES[-1][0]


def _empty() -> dict[str, Any]:
    return {"segments": 0, "idle_segments": 0, "reserved_bytes": 0, "allocated_bytes": 0, "requested_bytes": 0,
            "pending_free_bytes": 0, "inactive_bytes": 0, "idle_segment_bytes": 0, "largest_inactive_bytes": 0,
            "largest_segment_bytes": 0, "segment_types": {},
            "inactive_hist": {name: {"count": 0, "bytes": 0} for name, _ in BUCKETS_BYTES}}


def _add_segment(acc: dict[str, Any], seg: dict[str, Any]) -> None:
    """Fold one segment into ``acc``. Bytes come from the blocks (their states), not the segment's own
    ``allocated_size``, so allocated + pending-free + inactive == reserved holds by construction when the blocks
    tile the segment (they do in the caching allocator's snapshot)."""
    total = int(seg["total_size"])
    acc["segments"] += 1
    acc["reserved_bytes"] += total
    acc["largest_segment_bytes"] = max(acc["largest_segment_bytes"], total)
    kind = str(seg.get("segment_type", "unknown"))
    acc["segment_types"][kind] = acc["segment_types"].get(kind, 0) + 1
    used = 0
    for block in seg.get("blocks", []):
        size, state = int(block["size"]), block["state"]
        if state == "active_allocated":
            acc["allocated_bytes"] += size
            acc["requested_bytes"] += int(block.get("requested_size", size))  # size - requested: rounding waste
            used += size
        elif state == "active_pending_free":
            acc["pending_free_bytes"] += size
            used += size
        elif state == "inactive":
            acc["inactive_bytes"] += size
            acc["largest_inactive_bytes"] = max(acc["largest_inactive_bytes"], size)
            hist = acc["inactive_hist"][_bucket(size)]
            hist["count"] += 1
            hist["bytes"] += size
    if used == 0:  # a whole cached segment nothing lives in: empty_cache would return it to the driver
        acc["idle_segments"] += 1
        acc["idle_segment_bytes"] += total


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if key.startswith("largest_"):
            into[key] = max(into[key], value)
        elif key == "segment_types":
            for kind, n in value.items():
                into[key][kind] = into[key].get(kind, 0) + n
        elif key == "inactive_hist":
            for name, cell in value.items():
                into[key][name]["count"] += cell["count"]
                into[key][name]["bytes"] += cell["bytes"]
        else:
            into[key] += value


def pool_name(seg: dict[str, Any]) -> str:
    """"default" for the caching allocator's own pool, "graph:<a>,<b>" for a CUDA graph's private pool (or a
    ``torch.cuda.MemPool``): its ``segment_pool_id``. The eager pool's cached blocks never serve a graph's
    allocations nor the other way round, so a graphed step reserves the sum of the two pools' peaks."""
    pool = tuple(seg.get("segment_pool_id") or (0, 0))
    return "default" if all(int(x) == 0 for x in pool) else "graph:" + ",".join(str(int(x)) for x in pool)


def summarize_snapshot(snapshot: list[dict[str, Any]], device: int | None = None) -> dict[str, Any]:
    """Per CUDA stream (keyed by the stream handle as a string; "0" is the default stream), per memory pool
    (:func:`pool_name`) and in total: segment count, reserved / allocated / pending-free / inactive bytes, whole idle
    segments, the largest inactive block and a histogram of inactive block sizes (``BUCKETS_BYTES``). ``device``
    keeps one device's segments (a snapshot covers every device the process touched)."""
    streams: dict[str, dict[str, Any]] = {}
    pools: dict[str, dict[str, Any]] = {}
    for seg in snapshot:
        if device is not None and int(seg.get("device", device)) != device:
            continue
        _add_segment(streams.setdefault(str(seg.get("stream", 0)), _empty()), seg)
        _add_segment(pools.setdefault(pool_name(seg), _empty()), seg)
    total = _empty()
    for part in streams.values():
        _merge(total, part)
    return {"streams": dict(sorted(streams.items())), "pools": dict(sorted(pools.items())), "total": total}


def gib_view(summary: dict[str, Any]) -> dict[str, float]:
    """The headline numbers in GiB (rounded), for a human reading a JSON row: reserved, allocated, inactive per
    stream and per pool."""
    out = {}
    for kind, parts in (("stream", summary["streams"]), ("pool", summary["pools"])):
        for name, acc in parts.items():
            for key in ("reserved_bytes", "allocated_bytes", "inactive_bytes", "idle_segment_bytes"):
                out[f"{kind}_{name}_{key[:-len('_bytes')]}_gib"] = round(acc[key] / 2**30, 3)
    return out

"""Run one bench configuration (and its baseline) or a suite, and write one JSON line per configuration.

Reads top to bottom: environment -> prediction -> measured run (onecard's path) -> optional baseline (plain
transformers + peft, same process, everything freed in between, peak stats reset) -> one record. An OOM is a
result (``status: "oom"``), not a crash; any other failure of one configuration is recorded (``status: "error"``)
and the suite goes on.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from onecard.bench import predict as _predict
from onecard.bench.config import BenchConfig
from onecard.bench.step import GIB, free_cuda
from onecard.train.memory_cap import apply_memory_cap, clear_memory_cap, non_allocator_bytes

RESULT_FIELDS = ("model", "method", "seq", "micro_batch", "rank", "grad_ckpt", "kernels", "status", "tokens_per_s",
                 "s_per_step", "peak_allocated_gib", "peak_reserved_gib", "predicted_peak_gib", "mfu", "versions",
                 "date", "command")
BASELINE_FIELDS = ("baseline_tokens_per_s", "baseline_peak_reserved_gib", "speedup")


def versions() -> dict[str, Any]:
    import platform

    from onecard.versions import installed_version

    out: dict[str, Any] = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "onecard"):
        out[pkg] = installed_version(pkg)
    import torch

    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    out["driver"] = _driver_version() if torch.cuda.is_available() else None
    out["cuda"] = torch.version.cuda
    return out


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 -- nvidia-ml-py missing: fall back to nvidia-smi
        import subprocess

        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20).stdout.strip() or None
        except Exception:  # noqa: BLE001
            return None


def measure(cfg: BenchConfig, device: str, *, baseline: bool) -> dict[str, Any]:
    """Build, run warm-up + timed steps, free. ``baseline``: plain transformers + peft (no onecard kernels)."""
    import torch

    from onecard.bench.build import build_model
    from onecard.bench.step import random_batch, timed_steps

    free_cuda()
    t0 = time.perf_counter()
    model, vocab = build_model(cfg, device, plain=baseline)
    # QLoRA: whether the non-quantised parameters run fp32 (peft's upcast kept) -- the planner needs to know.
    kbit_upcast = cfg.method == "qlora" and model.get_input_embeddings().weight.dtype == torch.float32
    adapter_dtype = next((str(p.dtype).replace("torch.", "") for p in model.parameters() if p.requires_grad), None)
    kernels_info = {"kernels_applied": "none"}
    if not baseline and cfg.kernels != "none":
        kernels_info = apply_kernels(model, cfg.kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    weights_gib = torch.cuda.memory_allocated() / GIB if device.startswith("cuda") else None
    from onecard.patch.fp8 import block_linear_bytes

    frozen_linear_gib = block_linear_bytes(model) / GIB  # bf16 vs FP8 base: the block linears alone
    build_s = time.perf_counter() - t0
    batch = random_batch(vocab, cfg.micro_batch, cfg.seq, device)
    # onecard's path: the training spine's loss unless a kernel patch supplies the (fused) loss behind labels=.
    loss_path = "hf" if baseline or kernels_info["kernels_applied"] != "none" else "spine"
    from onecard.patch import offload

    offload.reset_stats()
    result = timed_steps(model, batch, steps=cfg.steps, warmup=cfg.warmup, device=device, loss_path=loss_path,
                         cuda_graph=cfg.cuda_graph and not baseline)  # the baseline is plain transformers + peft
    held = offload.stats()  # what really went to host memory (0 unless the checkpoints were offloaded)
    result.update(offloaded_gib_per_step=held["bytes"] / GIB / max(1, cfg.steps + cfg.warmup),
                  offloaded_tensors_pinned=held["pinned"], offloaded_tensors=held["tensors"])
    stream = getattr(model, "onecard_weight_stream", None)  # set by build_model when the weights stream
    if stream is not None:
        result.update(streamed_layers=len(stream.streamed), stream_slots=len(stream.slots),
                      stream_host_gib=stream.host_bytes / GIB, stream_copies=stream.stats.copies,
                      stream_on_demand=stream.stats.on_demand, stream_hits=stream.stats.hits)
    result.update(kernels_info, build_s=build_s, model_state_gib=weights_gib, frozen_linear_gib=frozen_linear_gib,
                  loss_path=loss_path,
                  kbit_upcast=kbit_upcast, trainable_dtype=adapter_dtype)
    del model, batch
    free_cuda()
    return result


def apply_kernels(model, kernels: str) -> dict[str, Any]:
    """onecard.patch.apply_kernels; the record says what was really applied: "none" (with the patch layer's
    notice) when nothing was patched, as ``onecard train`` records it."""
    from onecard.patch import apply_kernels as _apply

    handle = _apply(model, kernels=kernels)
    info: dict[str, Any] = {"kernels_applied": kernels if handle.active else "none",
                            "kernels_detail": dict(handle.patched)}
    if handle.notice:
        info["kernels_note"] = handle.notice
    return info


def _guarded(cfg: BenchConfig, device: str, baseline: bool) -> dict[str, Any]:
    """``measure`` with OOM (and any other failure) turned into a status, memory freed afterwards."""
    import torch

    status, error = "ok", None
    try:
        out = measure(cfg, device, baseline=baseline)
    except torch.OutOfMemoryError as exc:
        status, error, out = "oom", str(exc).split("\n")[0][:300], {}
    except Exception as exc:  # noqa: BLE001 -- one configuration's failure is a result of the suite
        status, error, out = "error", f"{type(exc).__name__}: {exc}"[:500], {}
    if status != "ok":
        out = {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None,
               "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if torch.cuda.is_available() else None}
        free_cuda()
    out["status"] = status
    if error:
        out["error"] = error
    return out


def run_config(cfg: BenchConfig, device: str, command: str | None = None) -> dict[str, Any]:
    from onecard.catalog.gpus import get_gpu

    record: dict[str, Any] = {**cfg.as_dict(), "label": cfg.label(), "device": device}
    record.update(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  command=command or " ".join(sys.argv), config_command=cfg.command(), versions=versions())
    record.update(_predict.predict(cfg))
    if device.startswith("cuda"):
        record["non_allocator_gib"] = non_allocator_bytes() / GIB
        if cfg.memory_cap_gib:
            record.update(apply_memory_cap(cfg.memory_cap_gib))
    try:
        measured = _guarded(cfg, device, baseline=False)
        record.update(measured)
        if cfg.baseline:
            base = _guarded(cfg, device, baseline=True)
            record.update({f"baseline_{k}": v for k, v in base.items()})
    finally:
        clear_memory_cap()
    if device.startswith("cuda"):
        import psutil

        record["non_allocator_gib_after"] = non_allocator_bytes() / GIB
        record["host_rss_gib_after"] = psutil.Process().memory_info().rss / GIB  # pinned host memory included
    peak_tflops = get_gpu(cfg.gpu).bf16_dense_tflops if device.startswith("cuda") else None
    record.update(_predict.utilisation(record.get("tokens_per_s"), record, peak_tflops))
    record["peak_tflops"] = peak_tflops
    record["predicted_peak_error_pct"] = _predict.error_pct(record.get("predicted_peak_gib"),
                                                            record.get("peak_reserved_gib"))
    record["predicted_tokens_per_s_error_pct"] = _predict.error_pct(record.get("predicted_tokens_per_s"),
                                                                    record.get("tokens_per_s"))
    if cfg.baseline:
        bt, br = record.get("baseline_tokens_per_s"), record.get("baseline_peak_reserved_gib")
        record["speedup"] = record["tokens_per_s"] / bt if bt and record.get("tokens_per_s") else None
        record["memory_ratio"] = record["peak_reserved_gib"] / br if br and record.get("peak_reserved_gib") else None
    return record


def detect_device(cpu: bool) -> str:
    import torch

    if cpu:
        return "cpu"
    if not torch.cuda.is_available():
        from onecard.errors import UserError

        raise UserError("no CUDA GPU here: onecard bench measures on a GPU", where="onecard bench",
                        fix="run it on the GPU machine, or pass --cpu to run the tiny CPU model (tests)")
    return "cuda"


def gpu_catalog_id() -> str:
    import torch

    from onecard.catalog.gpus import match_device_name

    gpu = match_device_name(torch.cuda.get_device_name(0))
    return gpu.id if gpu else "h200"


def load_suite(path: str | Path, part: str | None = None) -> list[BenchConfig]:
    """``defaults:`` + ``configs:`` (each a BenchConfig dict, optional ``part:``) from a YAML file."""
    import yaml

    from onecard.errors import UserError

    tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    defaults = tree.get("defaults") or {}
    configs = []
    for i, entry in enumerate(tree.get("configs") or []):
        entry = dict(entry)
        entry_part = str(entry.pop("part", ""))
        if part and entry_part != part:
            continue
        try:
            configs.append(BenchConfig.from_dict(entry, defaults))
        except TypeError as exc:
            raise UserError(f"config #{i + 1}: {exc}", where=str(path)) from None
    if not configs:
        raise UserError(f"no configurations{f' in part {part!r}' if part else ''}", where=str(path))
    return configs


def run_many(configs: list[BenchConfig], device: str, *, out: Path | None, command: str,
             time_budget_s: float | None = None, on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Each configuration in turn, appending its JSON line to ``out`` as soon as it is done (a killed run keeps
    the lines it finished). Configurations past ``time_budget_s`` are recorded as ``skipped``."""
    records, start = [], time.perf_counter()
    for cfg in configs:
        if time_budget_s and time.perf_counter() - start > time_budget_s:
            record = {**cfg.as_dict(), "label": cfg.label(), "status": "skipped", "error": "suite time budget spent"}
        else:
            record = run_config(cfg, device, command=command)
        records.append(record)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, default=str) + "\n")
        if on_record:
            on_record(record)
    return records

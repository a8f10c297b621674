"""Metrics: JSONL + TensorBoard in the run directory, MFU from analytic FLOPs, GPU
telemetry from NVML (quietly absent without a GPU). Rank 0 writes; other ranks no-op.
"""

from __future__ import annotations

import json
import math
import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger("epg_fast")

# Dense bf16 tensor-core peak (datasheet, TFLOP/s) by GPU name; override with log.peak_tflops
# (e.g. with a measured matmul peak: ~790 on one H200, see benchmarks/).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1, "L4": 121.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


PEAK_MATMUL_N = 8192  # large enough to reach the tensor cores' steady clock on H100/H200


@dataclass(frozen=True)
class PeakTflops:
    """The MFU denominator (measured) and the datasheet figure logged beside it."""

    measured: float
    datasheet: float | None


def measure_bf16_matmul_tflops(device: torch.device, n: int = PEAK_MATMUL_N) -> float:
    """TFLOP/s of a bf16 n^3 matmul on a CUDA device: the median of 5 timings of 10 back-to-back matmuls."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    for _ in range(3):  # warm-up: cuBLAS heuristics, clocks
        torch.mm(a, b, out=c)
    ms = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            torch.mm(a, b, out=c)
        end.record()
        torch.cuda.synchronize(device)
        ms.append(start.elapsed_time(end) / 10)
    del a, b, c
    torch.cuda.empty_cache()
    return 2 * n**3 / (statistics.median(ms) * 1e-3) / 1e12


def cache_dir() -> Path:
    """Where measured machine facts are kept: $EPG_CACHE_DIR, else ~/.cache/epg_fast."""
    return Path(os.environ.get("EPG_CACHE_DIR") or Path.home() / ".cache" / "epg_fast")


def cached_peak_tflops(device_name: str, measure: Callable[[], float], directory: Path | None = None) -> PeakTflops:
    """The measured peak of GPU `device_name`, measured once (by `measure`) and then read from
    peak_tflops.json in `directory` (default cache_dir()); an unreadable cache is re-measured."""
    path = (directory or cache_dir()) / "peak_tflops.json"
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        table = {}
    except (OSError, ValueError) as err:
        log.warning("peak cache %s unreadable (%s): measuring again", path, err)
        table = {}
    entry = table.get(device_name)
    if isinstance(entry, dict) and isinstance(entry.get("measured_tflops"), (int, float)):
        measured = float(entry["measured_tflops"])
        log.info("MFU peak for %s: %.0f TFLOP/s measured (cached in %s)", device_name, measured, path)
    else:
        measured = float(measure())
        table[device_name] = {"measured_tflops": measured, "matmul": f"bf16 {PEAK_MATMUL_N}^3", "torch": torch.__version__}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks may write at once: replace atomically
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
        log.info("MFU peak for %s: %.0f TFLOP/s measured now (cached in %s)", device_name, measured, path)
    return PeakTflops(measured=measured, datasheet=peak_tflops(device_name))


def measured_peak_tflops(device: torch.device) -> PeakTflops | None:
    """The bf16 matmul peak of this CUDA device (cached per GPU name) with the datasheet value;
    None on CPU, which has no MFU."""
    if device.type != "cuda":
        return None
    return cached_peak_tflops(torch.cuda.get_device_name(device), lambda: measure_bf16_matmul_tflops(device))


class GPUTelemetry:
    """NVML readings for the local GPU: utilisation, memory, power, SM clock."""

    def __init__(self, device: torch.device) -> None:
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.nvml = pynvml
        except Exception as err:  # no driver library, no permission: telemetry is optional
            log.info("NVML telemetry unavailable: %s", err)

    def sample(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        n, h = self.nvml, self.handle
        mem = n.nvmlDeviceGetMemoryInfo(h)
        return {
            "gpu/util": float(n.nvmlDeviceGetUtilizationRates(h).gpu),
            "gpu/mem_used_gb": mem.used / 2**30,
            "gpu/power_w": n.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "gpu/sm_clock_mhz": float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
        }


class MetricsWriter:
    """One JSON line per logged step (metrics.jsonl) and the same scalars in TensorBoard."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.jsonl = self.tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}}
        # JSON has no NaN or infinity: a non-finite number is written as null (TensorBoard keeps it)
        plain = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.jsonl.write(json.dumps(plain, allow_nan=False) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()

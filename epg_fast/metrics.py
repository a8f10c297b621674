"""Metrics: JSONL + TensorBoard in the run directory, MFU from analytic FLOPs, GPU
telemetry from NVML (quietly absent without a GPU). Rank 0 writes; other ranks no-op.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

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
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()

"""Data-loading benchmark: images/s and CPU cores kept busy, torch loader vs DALI loader.

    python benchmarks/data.py [--root DIR] [--image-size 256] [--batch 64] [--steps 20]
        [--warmup 3] [--workers 0 1 2 ...] [--json FILE]

Loaders, each in two modes, `pretrain` (x, y1, y2: three views per image) and `finetune`
(x and the label):
- `torch`: epg_fast.data.torch_loader (PIL in DataLoader worker processes), per worker count
  (0 = in the main process);
- `dali`: epg_fast.data.dali with max(1, workers) threads, on the CPU (CPU operators) and,
  when CUDA is available, on the GPU (mixed decoder, GPU operators, CUDA tensors out; the
  timing ends with a CUDA synchronisation).

Per run: `warmup` batches (worker start-up, pipeline build), then `steps` timed batches.
images/s = steps * batch / wall time. cores = CPU seconds of this process and its live
child processes (the DataLoader workers; DALI's threads are in the process) over the same
wall time, from psutil. Nothing consumes the batches, so this is the loader's ceiling; the
torch loader's batches stay on the host (a trainer adds the copy to the GPU).

The default root is the embedded demo data (400 small JPEGs): a smoke test of the
harness, not ImageNet's file sizes; point --root at a real tree for meaningful numbers.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py
from report import fmt, git_commit, write_report  # noqa: E402

from epg_fast.config import DataConfig  # noqa: E402
from epg_fast.data import build_loader, ensure_demo_data  # noqa: E402

MODES = {"pretrain": ("x", "y1", "y2"), "finetune": ("x",)}  # benchmark mode -> the views it loads


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU time of the process and its live descendants."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:  # a child that exited between listing and reading
            pass
    return total


def measure(loader, batch: int, steps: int, warmup: int, cuda: bool) -> dict[str, float]:
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    proc = psutil.Process()
    cpu0, t0 = cpu_seconds(proc), time.perf_counter()
    for _ in range(steps):
        next(it)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cores = (cpu_seconds(proc) - cpu0) / wall
    return {"images_per_s": steps * batch / wall, "ms_per_batch": 1e3 * wall / steps, "cores": cores}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="ImageFolder tree (default: the demo data)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    cores = os.cpu_count() or 1
    default_workers = [0] + [w for w in (1, 2, 4, 8, 16) if w <= cores]
    parser.add_argument("--workers", type=int, nargs="+", default=default_workers,
                        help=f"torch worker counts; DALI threads = max(1, w) (default: {default_workers})")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    root = args.root or str(ensure_demo_data())

    try:
        import epg_fast.data.dali  # noqa: F401
    except ImportError as e:  # DALI is optional (pip install -e .[dali])
        dali_missing = f"{type(e).__name__}: {e}"
    else:
        dali_missing = None
    cuda = torch.cuda.is_available()
    dali_devices = ["cpu", "cuda"] if cuda else ["cpu"]

    rows = []

    def run(loader_name: str, device: str, mode: str, workers: int, make) -> None:
        # The loader is dropped on return, which stops its DataLoader workers.
        result = measure(make(), args.batch, args.steps, args.warmup, device == "cuda")
        rows.append({"loader": loader_name, "device": device, "mode": mode, "workers": workers, **result})
        r = rows[-1]
        print(f"{loader_name:6s} {device:5s} {mode:9s} {workers:>7d} {r['images_per_s']:10.0f} "
              f"{r['ms_per_batch']:10.1f} {r['cores']:6.2f}", flush=True)

    label = "GPU machine" if cuda else "CPU-only machine: DALI runs its CPU operators"
    print(f"data loading, {root}, R={args.image_size}, batch {args.batch}, {args.steps} timed steps "
          f"({cores} cores; {label})")
    print(f"{'loader':6s} {'dev':5s} {'mode':9s} {'workers':>7s} {'images/s':>10s} {'ms/batch':>10s} {'cores':>6s}")
    for mode, views in MODES.items():
        for w in args.workers:
            cfg = DataConfig(root=root, workers=w, prefetch=2)
            run("torch", "cpu", mode, w, functools.partial(build_loader, cfg, args.image_size, views, args.batch))
        if dali_missing:
            continue
        for device in dali_devices:
            for threads in sorted({max(1, w) for w in args.workers}):
                cfg = DataConfig(root=root, loader="dali", workers=threads, prefetch=2)
                run("dali", device, mode, threads, functools.partial(
                    build_loader, cfg, args.image_size, views, args.batch, device=torch.device(device)))
    if dali_missing:
        print(f"dali: not measured ({dali_missing})")

    payload = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "host": platform.node(), "cpu_cores": cores, "cuda": cuda,
        "gpu": torch.cuda.get_device_name() if cuda else None, "root": root, "image_size": args.image_size,
        "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "dali_missing": dali_missing,
        "rows": rows,
    }
    best = {}
    for r in rows:
        key = (r["loader"], r["device"], r["mode"])
        best[key] = max(best.get(key, 0.0), r["images_per_s"])
    print("best images/s: " + ", ".join(f"{'/'.join(k)} {fmt(v, '.0f')}" for k, v in best.items()))
    write_report(args.json, None, payload, "")


if __name__ == "__main__":
    main()

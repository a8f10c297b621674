"""Data-loading benchmark: the loader paths side by side, images/s per CPU core and in total,
the device augmentation's cost, and how long a trainer would wait for data.

    python benchmarks/data.py [--root DIR] [--image-size 256] [--batch 64] [--steps 10]
        [--warmup 2] [--workers 1 2] [--paths pil device device+draft raw-pil raw-device dali]
        [--raw DIR] [--step-time 0.5] [--step-images 256] [--device cpu|cuda] [--json F] [--md F]

Paths (build_loader options), each in two modes, `pretrain` (x, y1, y2) and `finetune` (x):
- `pil`: the torch loader, PIL decode + augment in the workers (data.augment=pil; the reference);
- `device`: data.augment=device: workers decode and crop, the device augments;
- `device+draft`: the same with data.decode_draft=true (reduced JPEG decoding);
- `raw-pil`, `raw-device`: data.format=raw (the tree's center crops as raw shards, written
  on first use under --raw, default the cache folder, with `precrop --format raw`), with
  either augment path; the views are then the pre-cropped setup's (y crops from the crop);
- `dali`: the DALI loader (CPU operators; GPU ones on --device cuda), when installed.

Loader rows, per worker count (torch: DataLoader processes, 0 = in this process; dali:
threads): `warmup` batches, then `steps` timed ones; images/s = steps * batch / wall; cores
= CPU seconds of this process and its children (psutil) over the same wall time. The
per-core rate is taken from the workers=0 row: images / CPU seconds of this process, which
then does all the loader's work synchronously (no prefetch runs before or after the timed
window), so it holds on a shared machine where the wall-clock totals do not. The loader's
batches stay on the host; for the device paths they are not finished views: that work is
timed separately.

Device rows (`augment`): ImageLoader.to_device (device_views.augment_views) on the device
paths' batches on --device, per image; on CPU with one thread (a stand-in for the GPU's
work: not loader time), on CUDA synchronised.

Consumer rows (`wait`): the loader with the largest worker count fed to a simulated trainer
that takes --step-time seconds per --step-images images (sleeping, so it uses no CPU):
the fraction of the wall time spent waiting in next(). `cores/GPU` = the simulated GPU's
images/s over the loader's per-core rate: the cores a GPU needs on that path.
"""

from __future__ import annotations

import argparse
import datetime
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
from epg_fast.data import build_loader, ensure_demo_data, shards  # noqa: E402
from epg_fast.data.precrop import precrop  # noqa: E402

MODES = {"pretrain": ("x", "y1", "y2"), "finetune": ("x",)}  # benchmark mode -> the views it loads
PATHS = {  # path -> DataConfig options (root and format filled in per path)
    "pil": {},
    "device": {"augment": "device"},
    "device+draft": {"augment": "device", "decode_draft": True},
    "raw-pil": {"format": "raw"},
    "raw-device": {"format": "raw", "augment": "device"},
    "dali": {"loader": "dali"},
}
CACHE = Path(os.environ.get("EPG_CACHE_DIR") or Path.home() / ".cache" / "epg_fast")


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
    rate = steps * batch / wall
    return {"images_per_s": rate, "ms_per_batch": 1e3 * wall / steps, "cores": cores,
            "images_per_s_per_core": rate / max(cores, 1e-9)}


def consume(loader, batch: int, steps: int, warmup: int, step_s: float) -> dict[str, float]:
    """A simulated trainer taking step_s per batch: the share of wall time waiting for data."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    wait, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        next(it)
        wait += time.perf_counter() - t
        time.sleep(step_s)
    return {"wait_frac": wait / (time.perf_counter() - t0)}


def device_augment_cost(loader, device: torch.device, batch: int, batches: int) -> float:
    """Seconds per image of loader.to_device on `device` (one warm-up batch on CUDA)."""
    it = iter(loader)
    work = [next(it) for _ in range(batches + (device.type == "cuda"))]
    if device.type == "cuda":
        loader.to_device(work.pop(0), device)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in work:
        loader.to_device(b, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (batches * batch)


def raw_shards_of(root: str, size: int, out: str | None) -> str:
    """The tree's center crops at `size` as raw shards (written once, then reused)."""
    dst = out or str(CACHE / "bench-raw" / f"{Path(root).resolve().parent.name}-{Path(root).name}-{size}-all")
    if not os.path.exists(os.path.join(dst, shards.INDEX)):
        precrop(root, dst, size, max(1, (os.cpu_count() or 1)), "raw", per_shard=256)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="ImageFolder tree (default: the demo data)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="torch worker counts (0 gives the per-core rate); DALI threads = max(1, w)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--raw", default=None, help="raw-shard folder of the tree (written on first use)")
    parser.add_argument("--step-time", type=float, default=0.5, help="simulated GPU step, seconds")
    parser.add_argument("--step-images", type=int, default=256, help="images of a simulated GPU step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the device augmentation (and DALI) runs")
    parser.add_argument("--augment-batches", type=int, default=None,
                        help="batches timed for the device augmentation (default: 1 on CPU, 10 on CUDA)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--md", default=None, help="write the Markdown table here")
    args = parser.parse_args(argv)
    root = args.root or str(ensure_demo_data())
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    augment_batches = args.augment_batches or (10 if cuda else 1)
    if not cuda:
        torch.set_num_threads(1)  # the device rows: CPU seconds on one core
    paths = list(args.paths)
    if "dali" in paths:
        try:
            import epg_fast.data.dali  # noqa: F401
        except ImportError as e:  # DALI is optional (pip install -e .[dali])
            print(f"dali: not measured ({type(e).__name__}: {e})")
            paths.remove("dali")
    raw = raw_shards_of(root, args.image_size, args.raw) if any(p.startswith("raw") for p in paths) else None
    step_s = args.step_time * args.batch / args.step_images
    gpu_rate = args.step_images / args.step_time

    def cfg(path: str, workers: int) -> DataConfig:
        opts = PATHS[path]
        return DataConfig(root=raw if opts.get("format") == "raw" else root, workers=workers, prefetch=2, **opts)

    def make(path: str, mode: str, workers: int):
        return build_loader(cfg(path, workers), args.image_size, MODES[mode], args.batch, device=device)

    print(f"data loading, {root}, R={args.image_size}, batch {args.batch}, {args.steps} timed steps, "
          f"{os.cpu_count()} cores; simulated GPU: {args.step_time} s per {args.step_images} images")
    rows = []
    for mode in MODES:
        for path in paths:
            for w in args.workers:
                r = {"kind": "loader", "mode": mode, "path": path, "workers": w,
                     **measure(make(path, mode, w), args.batch, args.steps, args.warmup, cuda and path == "dali")}
                rows.append(r)
                print(f"{mode:9s} {path:13s} w={w} {r['images_per_s']:7.0f} img/s {r['cores']:5.2f} cores "
                      f"{r['images_per_s_per_core']:7.0f} img/s/core", flush=True)
            w = max(args.workers)
            r = {"kind": "wait", "mode": mode, "path": path, "workers": w,
                 **consume(make(path, mode, w), args.batch, args.steps, args.warmup, step_s)}
            rows.append(r)
            print(f"{mode:9s} {path:13s} w={w} waits {100 * r['wait_frac']:.0f}% of a {step_s:.3f} s step", flush=True)
            if PATHS[path].get("augment") == "device":
                s = device_augment_cost(make(path, mode, 0), device, args.batch, augment_batches)
                rows.append({"kind": "augment", "mode": mode, "path": path, "device": str(device),
                             "ms_per_image": 1e3 * s, "images_per_s": 1 / s})
                print(f"{mode:9s} {path:13s} device augment on {device}: {1e3 * s:.2f} ms/img", flush=True)

    table = markdown(rows, gpu_rate)
    print(table)
    files = [p for p in Path(root).rglob("*") if p.is_file() and not p.name.startswith(".")]
    payload = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/data.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": git_commit(), "host": platform.node(), "cpu_cores": os.cpu_count(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None, "root": root, "raw": raw,
        "files": len(files), "mean_file_kb": sum(p.stat().st_size for p in files) / max(1, len(files)) / 1e3,
        "image_size": args.image_size, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
        "step_time": args.step_time, "step_images": args.step_images, "rows": rows,
    }
    write_report(args.json, args.md, payload, f"{payload['command']}\n\n{table}\n")


def markdown(rows: list[dict], gpu_rate: float) -> str:
    """One line per (mode, path): the loader per core and in total, the speed-up per core over
    `pil`, the simulated trainer's wait, the cores per GPU, and the device augmentation."""
    lines = ["| views | path | img/s per core | vs pil | img/s total (workers) | waits | cores/GPU | device augment |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        loader = [r for r in rows if r["kind"] == "loader" and r["mode"] == mode]
        base = next((r["images_per_s_per_core"] for r in loader if r["path"] == "pil" and r["workers"] == 0), None)
        for path in dict.fromkeys(r["path"] for r in loader):
            mine = [r for r in loader if r["path"] == path]
            per_core = next((r["images_per_s_per_core"] for r in mine if r["workers"] == 0), mine[0]["images_per_s_per_core"])
            totals = ", ".join(f"{r['images_per_s']:.0f} ({r['workers']})" for r in mine)
            wait = next((r["wait_frac"] for r in rows if r["kind"] == "wait" and r["mode"] == mode and r["path"] == path), None)
            aug = next((r for r in rows if r["kind"] == "augment" and r["mode"] == mode and r["path"] == path), None)
            aug_cell = "" if aug is None else f"{aug['ms_per_image']:.2f} ms/img ({aug['device']})"
            lines.append(
                f"| {mode} | {path} | {per_core:.0f} | {fmt(base and per_core / base, '.1f', 'x')} | {totals} | "
                f"{fmt(wait and 100 * wait, '.0f', '%')} | {gpu_rate / per_core:.1f} | "
                f"{aug_cell} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

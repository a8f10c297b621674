"""Per-image CPU cost of the view pipelines, side by side: the PIL path vs decode-small +
device augment vs raw shards + device augment (issue 14).

    nice python benchmarks/views_bench.py [--root ~/.cache/epg_fast/imagenet-like/train]
        [--images 256] [--image-size 256] [--batch 64] [--raw DIR] [--json FILE] [--md FILE]

Everything runs in this one process, single-threaded (torch.set_num_threads(1)), timed with
time.process_time, so the numbers are CPU seconds per image on one core, unaffected by other
jobs on a shared machine; images/s per core = 1 / (CPU s per image). Rows:

- `pil`: what a torch-loader worker does today: views.load_image + views.make_views (x, y1, y2
  in pre-training, x in fine-tuning) + the copy into the CHW batch array;
- `geometry`: a worker with data.augment=device: decode, center crop and y crop geometry
  (device_views.geometric_views), decisions packed (device_views.pack_y), copy;
- `geometry+draft`: the same with decode.reduced_geometric_views (JPEG DCT-domain reduction
  where every view's region stays >= R);
- `raw+crops`: a worker reading raw shards (data.shards; the R x R center crop, no decode),
  y crop geometry on it in PIL (pre-cropped semantics, as data.precropped=true), decisions
  packed, copy;
- `raw`: the same worker when the device also cuts the y crops (device_views.crop_resize):
  the worker copies the R x R crop and draws and packs the decisions, nothing else;
- `pil-raw`: the PIL path on the raw shards' crops (make_views with precropped=True), to
  separate the decode saving from the augment saving;
- `device-augment`, `device-crops+augment`: device_views.augment_views on CPU (what the GPU
  does in training), per image of a --batch batch, on one core, given the y crops or cutting
  them from x: the cost moved off the loader, shown for scale (it is a GPU's work).

The raw shards are written on first use under --raw (default: the cache folder, never the
repository) with `precrop --format raw`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py
from report import git_commit, write_report  # noqa: E402

from epg_fast.data import decode, device_views, precrop, shards, views  # noqa: E402
from epg_fast.data.index import scan_image_folder  # noqa: E402

CACHE = Path(os.environ.get("EPG_CACHE_DIR") or Path.home() / ".cache" / "epg_fast")


def chw(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))


def pil_views(path: str, size: int, rng, with_y: bool, precropped: bool = False):
    return [chw(v) for v in views.make_views(views.load_image(path), size, rng, with_y, precropped)]


def geometry(img: Image.Image, size: int, rng, with_y: bool, precropped: bool = False):
    crops, x_flip, draws = device_views.geometric_views(img, size, rng, with_y, precropped)
    return [chw(v) for v in crops], x_flip, draws


def geometry_draft(path: str, size: int, rng, with_y: bool):
    crops, x_flip, draws, _ = decode.reduced_geometric_views(path, size, rng, with_y, False)
    return [chw(v) for v in crops], x_flip, draws


def cpu_per_image(items: list, work, batch: int, with_y: bool) -> float:
    """CPU seconds per image of work(item, rng) over all items, packing decisions per batch
    as a worker would."""
    t0 = time.process_time()
    draws = []
    for k, item in enumerate(items):
        out = work(item, np.random.default_rng([0, k]))
        if isinstance(out, tuple) and with_y:
            draws.append(out[2])
        if len(draws) == batch:
            device_views.pack_y([d[0] for d in draws]), device_views.pack_y([d[1] for d in draws])
            draws = []
    return (time.process_time() - t0) / len(items)


def raw_decisions(raw: shards.RawShards, i: int, size: int, rng, with_y: bool):
    """The `raw` worker: the R x R crop copied, the decisions drawn (packed per batch)."""
    x_flip, draws = device_views.draw_views(size, size, size, rng, with_y, True)
    return [np.ascontiguousarray(raw.image(i).transpose(2, 0, 1))], x_flip, draws


def device_cost(raw: shards.RawShards, size: int, batch: int, with_y: bool, crops_on_device: bool) -> float:
    """CPU seconds per image of device_views.augment_views on one batch."""
    parts, flips, draws = [], [], []
    for k in range(batch):
        crops, x_flip, ys = geometry(Image.fromarray(raw.image(k % len(raw))), size, np.random.default_rng(k), with_y, True)
        parts.append(crops)
        flips.append(x_flip)
        draws.append(ys)
    b = {name: torch.from_numpy(np.stack([p[j] for p in parts])) for j, name in enumerate(("x", "y1", "y2")[: len(parts[0])])}
    b["x_flip"] = torch.tensor(flips)
    if crops_on_device:
        b = {k: v for k, v in b.items() if k not in ("y1", "y2")}
    if with_y:
        b["y1_params"] = device_views.pack_y([d[0] for d in draws])
        b["y2_params"] = device_views.pack_y([d[1] for d in draws])
    device_views.augment_views(b, torch.device("cpu"))  # warm-up
    t0 = time.process_time()
    device_views.augment_views(b, torch.device("cpu"))
    return (time.process_time() - t0) / batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(CACHE / "imagenet-like" / "train"),
                        help="ImageFolder tree (default: benchmarks/make_imagenet_like.py's output)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--raw", default=None, help="raw-shard folder (written on first use)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = args.image_size
    index = scan_image_folder(args.root)
    step = max(1, len(index) // args.images)
    paths = [index.path(i) for i in range(0, len(index), step)][: args.images]
    raw_dir = args.raw or str(CACHE / "bench-raw" / f"{Path(args.root).resolve().name}-{len(paths)}-{size}")
    if not os.path.exists(os.path.join(raw_dir, shards.INDEX)):
        subset = Path(raw_dir + "-src")
        for p in paths:  # the same images as the other rows, as a small tree of links
            link = subset / os.path.relpath(p, index.root)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(p)
        precrop.precrop(str(subset), raw_dir, size, 1, "raw", per_shard=128)
    raw = shards.RawShards(raw_dir)
    ids = list(range(len(raw)))
    mean_kb = np.mean([os.path.getsize(p) for p in paths]) / 1e3
    print(f"{len(paths)} images from {index.root} ({mean_kb:.0f} KB per file), R={size}, one core, CPU time")
    rows = []
    for mode, with_y in (("pretrain", True), ("finetune", False)):
        runs = {
            "pil": (paths, lambda p, r: pil_views(p, size, r, with_y)),
            "geometry": (paths, lambda p, r: geometry(views.load_image(p), size, r, with_y)),
            "geometry+draft": (paths, lambda p, r: geometry_draft(p, size, r, with_y)),
            "raw+crops": (ids, lambda i, r: geometry(Image.fromarray(raw.image(i)), size, r, with_y, True)),
            "raw": (ids, lambda i, r: raw_decisions(raw, i, size, r, with_y)),
            "pil-raw": (ids, lambda i, r: [chw(v) for v in views.make_views(
                Image.fromarray(raw.image(i)), size, r, with_y, True)]),
        }
        for name, (items, work) in runs.items():
            cpu = cpu_per_image(items, work, args.batch, with_y)
            rows.append({"mode": mode, "path": name, "cpu_ms_per_image": 1e3 * cpu, "images_per_s_per_core": 1 / cpu})
        for name, on_device in (("device-augment", False), ("device-crops+augment", True)):
            if on_device and not with_y:
                continue
            cpu = device_cost(raw, size, args.batch, with_y, on_device)
            rows.append({"mode": mode, "path": name, "cpu_ms_per_image": 1e3 * cpu, "images_per_s_per_core": 1 / cpu})
    base = {r["mode"]: r["cpu_ms_per_image"] for r in rows if r["path"] == "pil"}
    lines = ["| views | path | CPU ms / image | images/s per core | vs pil |", "|---|---|---:|---:|---:|"]
    for r in rows:
        r["speedup_vs_pil"] = base[r["mode"]] / r["cpu_ms_per_image"]
        lines.append(f"| {r['mode']} | {r['path']} | {r['cpu_ms_per_image']:.2f} | "
                     f"{r['images_per_s_per_core']:.0f} | {r['speedup_vs_pil']:.1f}x |")
    table = "\n".join(lines)
    print(table)
    payload = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
        "host": platform.node(), "root": index.root, "images": len(paths), "mean_file_kb": mean_kb,
        "image_size": size, "batch": args.batch, "raw_bytes_per_image": size * size * 3, "rows": rows,
    }
    write_report(args.json, args.md, payload, f"views_bench.py, {len(paths)} images, R={size}\n\n{table}\n")


if __name__ == "__main__":
    main()

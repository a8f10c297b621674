"""Write the ADM center-crop tree (the reference's one-off ImageNet pre-processing).

    python -m epg_fast.data.precrop SRC DST --size 256 [--format png|jpeg|raw] [--workers N]

Every image of SRC is decoded, converted to RGB, center-cropped to SIZE x SIZE (see
`views.center_crop`) and saved under the same class folder in DST: as PNG (lossless, the
default), as JPEG (--quality, default 95; smaller, decoded at every read), or, with
--format raw, as uint8 pixels in memory-mappable shards that are read without decoding
(see `shards.py`; --per-shard images per shard file). Every class folder
is created, empty ones too, so labels (the sorted folder order) stay the same. Files are
written under a temporary name and renamed, and existing outputs are skipped, so an
interrupted run can simply be started again. Files that fail to decode are listed, not
written. Train on a png or jpeg DST with `data.precropped=true`, on a raw DST with
`data.format=raw` (the torch loader).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import sys
from collections import Counter

from epg_fast.data.index import DataError, scan_image_folder
from epg_fast.data.shards import write_shards
from epg_fast.data.views import center_crop, load_image

log = logging.getLogger("epg_fast.data")


FORMATS = {"png": (".png", {"format": "PNG"}), "jpeg": (".jpg", {"format": "JPEG", "quality": 95})}


def _crop_one(task: tuple[str, str, int, dict]) -> str | None:
    """Crop one file; returns None on success, else "path: reason"."""
    src, dst, size, save_args = task
    if os.path.exists(dst):
        return None
    try:
        img = load_image(src)
    except Exception as e:  # decoders raise many types on corrupt input
        return f"{src}: {type(e).__name__}: {e}"
    tmp = f"{dst}.tmp{os.getpid()}"
    center_crop(img, size).save(tmp, **save_args)
    os.replace(tmp, dst)
    return None


def precrop(
    src: str, dst: str, size: int, workers: int, fmt: str = "png", quality: int = 95, per_shard: int = 1000
) -> tuple[int, list[str]]:
    """Returns (number of images indexed, failures as "path: reason")."""
    index = scan_image_folder(src, validate=False)  # failures are reported per file below
    if fmt == "raw":
        return write_shards(index, dst, size, per_shard, workers)
    ext, save_args = FORMATS[fmt]
    save_args = {**save_args, "quality": quality} if fmt == "jpeg" else save_args
    rels = [index.relpath(i) for i in range(len(index))]
    targets = [os.path.splitext(r)[0] + ext for r in rels]
    clashes = {t for t, n in Counter(targets).items() if n > 1}
    # a.jpg and a.png in one folder would both become a.png: keep their full names then.
    targets = [r + ext if t in clashes else t for r, t in zip(rels, targets)]
    for name in index.classes:
        os.makedirs(os.path.join(dst, name), exist_ok=True)
    for folder in {os.path.dirname(t) for t in targets}:
        os.makedirs(os.path.join(dst, folder), exist_ok=True)
    tasks = [(index.path(i), os.path.join(dst, t), size, save_args) for i, t in enumerate(targets)]
    failures: list[str] = []
    step = max(1, len(tasks) // 20)
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap_unordered(_crop_one, tasks, chunksize=64) if pool else map(_crop_one, tasks)
        for done, failure in enumerate(results, 1):
            if failure:
                failures.append(failure)
            if done % step == 0:
                log.info("precrop: %d/%d", done, len(tasks))
    return len(tasks), failures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("src", help="ImageFolder tree: SRC/<class>/<image>")
    parser.add_argument("dst", help="output tree (created; existing files are kept)")
    parser.add_argument("--size", type=int, default=256, help="crop side in pixels (default 256)")
    parser.add_argument("--format", choices=("png", "jpeg", "raw"), default="png",
                        help="png (lossless), jpeg (--quality) or raw (uint8 shards, no decode at read time)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (--format jpeg)")
    parser.add_argument("--per-shard", type=int, default=1000, help="images per shard file (--format raw)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.size <= 0 or args.per_shard <= 0:
        parser.error("--size and --per-shard must be > 0")
    if not 1 <= args.quality <= 100:
        parser.error("--quality must be in 1..100")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        total, failures = precrop(args.src, args.dst, args.size, args.workers, args.format, args.quality, args.per_shard)
    except (DataError, OSError) as err:
        print(f"epg_fast.data.precrop: error: {err}", file=sys.stderr)
        sys.exit(2)
    for failure in failures[:10]:
        log.warning("not written: %s", failure)
    log.info(
        "precrop: %d of %d images in %s (%d failed to decode)",
        total - len(failures), total, args.dst, len(failures),
    )


if __name__ == "__main__":
    main()

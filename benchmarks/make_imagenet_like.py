"""Re-encode the Imagenette archive at ImageNet's typical size, for data-loading benchmarks.

    python benchmarks/make_imagenet_like.py [--archive ../shared/data/imagenette-224-jpg.tar.gz]
        [--out ~/.cache/epg_fast/imagenet-like] [--every 1] [--size 500 375] [--quality 90]

How the tree is made (deterministic; re-running skips existing files):
- source: the Imagenette archive (224x224 JPEGs of real ImageNet photographs, see
  ../shared/data/README.md), `train/` and `val/` members, read in archive order; with
  --every N only every N-th image of each split is kept;
- each image is decoded with PIL, converted to RGB, resized to 500x375 (width x height, the
  ImageNet mean of ~400x350 rounded to a 4:3 landscape shape) with PIL's bicubic filter, and
  saved as a baseline JPEG, quality 90, 4:2:0 chroma subsampling (PIL's default), no EXIF;
- output: OUT/<split>/<wnid>/<name>.JPEG. Measured: ~40 KB per file, not ImageNet's ~110 KB:
  the 2.2x upsampling adds no detail, so the files compress better than real photographs of
  this size (quality 95 with 4:4:4 chroma gives ~62 KB, 98 ~80 KB). The decode's pixel work
  (IDCT, colour conversion, upsampling) matches ImageNet's; its entropy decoding, which grows
  with the file size, is cheaper, so decode costs measured here are somewhat optimistic.

The default OUT is under the epg_fast cache folder ($EPG_CACHE_DIR or ~/.cache/epg_fast),
never the repository. Nothing here is committed.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
from pathlib import Path

from PIL import Image


def default_out() -> Path:
    return Path(os.environ.get("EPG_CACHE_DIR") or Path.home() / ".cache" / "epg_fast") / "imagenet-like"


def default_archive() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette-224-jpg.tar.gz"


def make_tree(archive: Path, out: Path, every: int, size: tuple[int, int], quality: int) -> tuple[int, int]:
    """Returns (files written, total bytes of the tree's files)."""
    seen: dict[str, int] = {}
    written = total = 0
    with tarfile.open(archive) as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith(".JPEG")):
                continue
            split = member.name.split("/", 1)[0]
            seen[split] = seen.get(split, 0) + 1
            if (seen[split] - 1) % every:
                continue
            dst = out / member.name
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                tmp = dst.with_suffix(".tmp")
                img.resize(size, Image.BICUBIC).save(tmp, format="JPEG", quality=quality)
                os.replace(tmp, dst)
                written += 1
            total += dst.stat().st_size
    return written, total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--archive", type=Path, default=default_archive())
    parser.add_argument("--out", type=Path, default=default_out())
    parser.add_argument("--every", type=int, default=1, help="keep every N-th image of each split")
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args(argv)
    if not args.archive.is_file():
        parser.error(f"{args.archive} not found (see ../shared/data/README.md)")
    written, total = make_tree(args.archive, args.out, args.every, tuple(args.size), args.quality)
    files = sum(1 for _ in args.out.rglob("*.JPEG"))
    print(f"{args.out}: {files} files ({written} new), {total / max(files, 1) / 1e3:.0f} KB per file")


if __name__ == "__main__":
    main()

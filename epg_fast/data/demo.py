"""The embedded demo dataset: a smoke test for the whole pipeline, NOT a benchmark.

400 JPEGs in 8 classes of procedural pictures (discs, stripes at a class angle, checkers,
gradients, rings, triangles, smooth noise, crosses) with random colours, positions and sizes,
so that the classes are learnable but not trivial. Sizes and aspect ratios vary to exercise
the crops. Generation is deterministic and takes about a second.

    python -m epg_fast.data.demo [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from epg_fast.data.index import DataError

SEED = 20251014
PER_CLASS = 50
MARKER = ".complete"  # written last; its presence means the tree is whole
CLASSES = ("discs", "stripes", "checkers", "gradient", "rings", "triangles", "noise", "crosses")


def default_root() -> Path:
    cache = os.environ.get("EPG_CACHE_DIR") or Path.home() / ".cache" / "epg_fast"
    return Path(cache) / "demo"


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground colours far enough apart to keep the shapes visible."""
    bg = rng.uniform(0, 1, 3)
    while True:
        fg = rng.uniform(0, 1, 3)
        if np.linalg.norm(fg - bg) > 0.5:
            return bg, fg


def _draw(cls: int, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One float RGB picture of class `cls`, values in [0, 1]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    bg, fg = _colours(rng)
    img = np.empty((h, w, 3), np.float32)
    img[:] = bg
    side = min(h, w)
    if cls == 0:  # discs
        for _ in range(rng.integers(1, 5)):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.35) * side
            img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 1, 3) * 0.3 + fg * 0.7
    elif cls == 1:  # stripes near 30 degrees
        a = math.radians(30 + rng.normal(0, 6))
        t = (x * math.cos(a) + y * math.sin(a)) / rng.uniform(5, 18) + rng.uniform(0, 1)
        img[t % 1 < rng.uniform(0.3, 0.7)] = fg
    elif cls == 2:  # checkerboard
        cell = rng.uniform(4, 20)
        ox, oy = rng.uniform(0, cell, 2)
        img[((x + ox) // cell + (y + oy) // cell) % 2 == 1] = fg
    elif cls == 3:  # linear gradient between two colours
        a = rng.uniform(0, 2 * math.pi)
        t = x * math.cos(a) + y * math.sin(a)
        t = ((t - t.min()) / max(float(np.ptp(t)), 1e-6))[..., None]
        img = bg * (1 - t) + fg * t
    elif cls == 4:  # concentric rings
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
        img[(r / rng.uniform(4, 14)) % 1 < 0.5] = fg
    elif cls == 5:  # filled triangles
        for _ in range(rng.integers(1, 4)):
            (ax, bx, cx), (ay, by, cy) = rng.uniform(0, w, 3), rng.uniform(0, h, 3)
            e1 = (bx - ax) * (y - ay) - (by - ay) * (x - ax)
            e2 = (cx - bx) * (y - by) - (cy - by) * (x - bx)
            e3 = (ax - cx) * (y - cy) - (ay - cy) * (x - cx)
            inside = ((e1 >= 0) & (e2 >= 0) & (e3 >= 0)) | ((e1 <= 0) & (e2 <= 0) & (e3 <= 0))
            img[inside] = rng.uniform(0, 1, 3) * 0.3 + fg * 0.7
    elif cls == 6:  # smooth noise blobs
        cells = rng.integers(3, 9, 2)
        small = Image.fromarray((rng.uniform(0, 255, tuple(cells))).astype(np.uint8))
        t = np.asarray(small.resize((w, h), Image.BICUBIC), np.float32)[..., None] / 255
        img = bg * (1 - t) + fg * t
    else:  # crosses
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            arm, half = rng.uniform(0.15, 0.4) * side, rng.uniform(0.03, 0.1) * side
            dy, dx = abs(y - cy), abs(x - cx)
            img[((dx < half) & (dy < arm)) | ((dy < half) & (dx < arm))] = fg
    return img + rng.normal(0, 0.03, img.shape)  # sensor-like noise, so JPEGs are not flat


def write_demo(out: Path) -> int:
    """Write the demo tree into `out` (must exist); returns the number of images."""
    rng = np.random.default_rng(SEED)
    for c, name in enumerate(CLASSES):
        folder = out / f"{c}_{name}"
        folder.mkdir()
        for i in range(PER_CLASS):
            short = int(rng.integers(40, 161))
            aspect = rng.uniform(0.6, 1.7)  # width / height
            w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
            pixels = np.clip(_draw(c, rng, h, w) * 255 + 0.5, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return len(CLASSES) * PER_CLASS


def ensure_demo_data(root: str | os.PathLike | None = None, force: bool = False) -> Path:
    """The demo tree at `root` (default `$EPG_CACHE_DIR/demo` or ~/.cache/epg_fast/demo),
    written if missing. Safe when several ranks call it at once: each writes a private temp
    folder and renames it into place; a rank that loses the race uses the winner's tree."""
    root = Path(root) if root is not None else default_root()
    if root.exists() and not force:
        if (root / MARKER).is_file():  # checked second: the rename brings the marker along
            return root
        raise DataError(
            f"{root} exists but is not a complete demo dataset; remove it or run "
            f"`python -m epg_fast.data.demo --out {root} --force`"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-tmp-", dir=root.parent))
    try:
        count = write_demo(tmp)
        (tmp / MARKER).write_text(f"{count} images, seed {SEED}\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the tree is an ordinary cache folder
        if force and root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}-old-", dir=root.parent))
            os.replace(root, old / root.name)
            shutil.rmtree(old)
        try:
            os.rename(tmp, root)  # atomic; fails if another process renamed its tree first
        except OSError:
            if not (root / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help=f"target folder (default {default_root()})")
    parser.add_argument("--force", action="store_true", help="rewrite an existing tree")
    args = parser.parse_args(argv)
    print(ensure_demo_data(args.out, force=args.force))


if __name__ == "__main__":
    main()

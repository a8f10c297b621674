"""Decode small: JPEG decoding at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's `draft`)
when every view's source region stays at least R pixels wide and high at that scale.

The decisions are drawn first, from the header's size alone (the same draws as
views.make_views), then the largest reduction that keeps each view's region >= R x R
is chosen: the views are downsampled from fewer, DCT-averaged pixels instead of resampled
from the full decode, but no view is upsampled more than before and each covers the same
region of the photograph (boxes are scaled by 1/s; the reduced image's last row and column
may reach up to s - 1 source pixels further, which no box reaches). x is the center crop's
region (views.center_crop_box) resized in one bicubic step. Other formats, and JPEGs whose regions are too small, are decoded in full; the result
is then bit-identical to device_views.geometric_views.

The reduction pays on large files: at R=256 a 500x375 photograph (ImageNet's typical size)
cannot shrink (375 / 2 < 256); at R=128 or on larger photographs it can, and a 1/2 decode
costs ~1/3 of a full one (benchmarks/views_bench.py measures it).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

from epg_fast.data.device_views import crop_y, draw_views
from epg_fast.data.views import YDraw, center_crop, center_crop_box, to_rgb

_FACTORS = (8, 4, 2)


def reduction_factor(regions: Iterable[tuple[float, float]], size: int) -> int:
    """The largest s in (8, 4, 2, 1) with every (width, height) region / s >= size."""
    smallest = min(min(w, h) for w, h in regions)
    return next((s for s in _FACTORS if smallest / s >= size), 1)


def open_reduced(path: str, factor: int) -> tuple[Image.Image, float]:
    """RGB decode of `path`, at 1/factor scale when it is a JPEG (else in full), and the scale
    actually used (decoded pixels per source pixel: 1/factor or 1)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        width = img.width
        if factor > 1:
            img.draft("RGB", (width // factor, img.height // factor))  # None (no-op) for non-JPEG
        img.load()
    # draft keeps ceil(W / s) columns, so W / decoded width can be a hair below s: derive s.
    scale = 1.0 / round(width / img.width)
    return to_rgb(img), scale


def reduced_geometric_views(
    path: str, size: int, rng: np.random.Generator, with_y: bool, precropped: bool
) -> tuple[list[Image.Image], bool, list[YDraw], int]:
    """device_views.geometric_views from a file, decoding small when the draws allow:
    ([x, y1, y2], x's flip, [y1's, y2's decisions], reduction factor used)."""
    with open(path, "rb") as f:
        width, height = Image.open(f).size  # header only
    x_flip, draws = draw_views(width, height, size, rng, with_y, precropped)
    regions = [(width, height)]  # x: the center crop spans the short side
    if not precropped:
        regions += [d.box[2:] for d in draws]
    factor = reduction_factor(regions, size)
    img, scale = open_reduced(path, factor)
    factor = round(1 / scale)  # 1 when the format has no reduced decode
    if scale == 1:
        base = center_crop(img, size)
    else:  # the same region as from the full decode, in one bicubic resize
        base = img.resize((size, size), Image.BICUBIC, box=tuple(v * scale for v in center_crop_box(width, height, size)))
    if not with_y:
        return [base], x_flip, [], factor
    if precropped or scale == 1:
        src_img = base if precropped else img
        return [base] + [crop_y(src_img, size, d) for d in draws], x_flip, draws, factor
    ys = []
    for d in draws:
        left, top, w, h = d.box
        box = (left * scale, top * scale, (left + w) * scale, (top + h) * scale)
        ys.append(img.resize((size, size), Image.BILINEAR, box=box))
    return [base] + ys, x_flip, draws, factor

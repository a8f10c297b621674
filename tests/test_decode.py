"""data.decode: JPEG draft decoding keeps the draws and the cropped regions.

Tolerance: a reduced decode averages 2x2 (4x4) source pixels in the DCT domain and then
resamples, where the full path resamples the full image (box-halving and bicubic for x,
bilinear for y), so views differ by filtering only. Measured on 120 ImageNet-like files
(benchmarks/make_imagenet_like.py) at R=64: x >= 29 dB (median 35), y >= 34 dB (median 46);
at R=128 x >= 35 dB, y >= 38 dB. The bounds below sit a few dB under those minima; a region
off by a few pixels, or a wrong scale, falls to ~15-20 dB on photographs.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from photo_helpers import unpack_imagenette

from epg_fast.data import decode, device_views, views
from epg_fast.data.index import scan_image_folder


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory) -> list[str]:
    """Photographs at ImageNet's typical size, as make_imagenet_like.py writes them."""
    tmp = tmp_path_factory.mktemp("large")
    index = scan_image_folder(str(unpack_imagenette(tmp, every=150)), cache="off")
    paths = []
    for i in range(len(index)):
        out = tmp / f"{i}.jpg"
        views.load_image(index.path(i)).resize((500, 375), Image.BICUBIC).save(out, quality=90)
        paths.append(str(out))
    return paths


def test_reduction_factor():
    assert decode.reduction_factor([(500, 375)], 256) == 1
    assert decode.reduction_factor([(500, 375)], 128) == 2
    assert decode.reduction_factor([(500, 375), (300, 200)], 64) == 2  # the smallest region decides
    assert decode.reduction_factor([(4000, 3000)], 256) == 8


@pytest.mark.parametrize("size,x_db,y_db", [(64, 26, 31), (128, 32, 35)])
def test_reduced_views_keep_draws_and_regions(large_jpegs, size, x_db, y_db):
    factors = []
    for i, path in enumerate(large_jpegs):
        full, x_flip, draws = device_views.geometric_views(views.load_image(path), size, np.random.default_rng(i), True, False)
        rng = np.random.default_rng(i)
        small, x_flip2, draws2, factor = decode.reduced_geometric_views(path, size, rng, True, False)
        assert (x_flip2, draws2) == (x_flip, draws)
        assert rng.bit_generator.state == _after_make_views(path, size, i)
        factors.append(factor)
        assert [v.size for v in small] == [(size, size)] * 3
        if factor == 1:  # full decode: exactly the PIL path's crops
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(full, small))
        else:
            assert psnr(full[0], small[0]) >= x_db
            assert min(psnr(full[1], small[1]), psnr(full[2], small[2])) >= y_db
    assert any(f > 1 for f in factors)


def _after_make_views(path: str, size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    views.make_views(views.load_image(path), size, rng, True, False)
    return rng.bit_generator.state


def test_non_jpeg_is_decoded_in_full(tmp_path):
    path = str(tmp_path / "a.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    img, scale = decode.open_reduced(path, 4)
    assert scale == 1 and img.size == (400, 300)
    crops, _, _, factor = decode.reduced_geometric_views(path, 32, np.random.default_rng(0), False, False)
    assert factor == 1 and np.array_equal(np.asarray(crops[0]), np.asarray(views.center_crop(views.load_image(path), 32)))

"""data.device_views against the PIL reference (views.py), on real photographs and the demo data.

Tolerance: the device ops replay Pillow's integer arithmetic (see the module docstring), so on
this platform every view is expected to be bit-identical. A different Pillow build (e.g. one
that contracts a*b+c into a fused multiply-add, as GCC does by default on aarch64) can move
a float product across a rounding boundary: we allow one grey level on at most 1e-4 of the
pixels, far below what the training could notice (one level is 0.4% of the range; PSNR stays
> 80 dB) and far above what a wrong op would give (a wrong op order or formula changes most
pixels by several levels).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from photo_helpers import unpack_imagenette

from epg_fast.data import device_views as dv
from epg_fast.data import views
from epg_fast.data.index import scan_image_folder

MAX_FRACTION = 1e-4  # of pixels allowed to differ, by one level at most (see above)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Image.Image]:
    root = unpack_imagenette(tmp_path_factory.mktemp("photos"), every=60)  # ~158 photographs
    index = scan_image_folder(str(root), cache="off")
    return [views.load_image(index.path(i)) for i in range(len(index))]


@pytest.fixture(scope="module")
def demo_images(demo_root) -> list[Image.Image]:
    index = scan_image_folder(str(demo_root), cache="off")
    return [views.load_image(index.path(i)) for i in range(0, len(index), 4)]


def chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    diff = (ours.to(torch.int32) - ref.to(torch.int32)).abs()
    fraction = (diff > 0).float().mean().item()
    assert diff.max().item() <= 1 and fraction <= MAX_FRACTION, (
        f"{what}: max |diff| {diff.max().item()}, {fraction:.2e} of the pixels differ"
    )


def test_box_blur_taps_sum_to_one_and_grow_with_sigma():
    radii = [dv._box_radius(s) for s in np.linspace(*views.BLUR_SIGMA, 50)]
    assert all(a < b for a, b in zip(radii, radii[1:]))
    for sigma in np.linspace(*views.BLUR_SIGMA, 50):
        taps = dv.box_blur_taps(float(sigma))
        assert (1 << 24) - 2 < taps.sum() <= 1 << 24  # Pillow's truncated fixed point
        assert np.array_equal(taps, taps[::-1])
    identity = dv.box_blur_taps(0.0)
    assert identity[dv.BLUR_TAPS // 2] == 1 << 24 and identity.sum() == 1 << 24
    with pytest.raises(ValueError, match="box radius"):
        dv.box_blur_taps(5.0)


def test_pack_y_carries_every_decision():
    rng = np.random.default_rng(0)
    draws = [views.draw_y(300, 200, rng, **views.Y2) for _ in range(64)]
    p = dv.pack_y(draws)
    assert p["jitter"].tolist() == [d.jitter for d in draws]
    assert p["order"].tolist() == [list(d.order) for d in draws]
    for d, f, h in zip(draws, p["factors"].tolist(), p["hue_delta"].tolist()):
        assert f == pytest.approx(d.factors[:3] if d.jitter else (1, 1, 1), rel=1e-6)
        assert h == int(d.factors[3] * 255)
    for key in ("gray", "solarize", "flip"):
        assert p[key].tolist() == [getattr(d, key) for d in draws]
    blurred = [d.blur for d in draws]
    assert any(blurred) and not all(blurred)
    assert [bool((t != dv.box_blur_taps(0.0)).any()) for t in p["blur_taps"].numpy()] == blurred


@pytest.mark.parametrize("delta", [-25, -1, 1, 13, 25])
def test_hue_matches_pillow_on_random_colours(delta):
    rng = np.random.default_rng(delta + 100)
    colours = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    colours[0, :] = np.arange(128)[:, None] * 2  # greys: saturation 0
    img = Image.fromarray(colours)
    ref = chw(views._adjust_hue(img, delta / 255 + 1e-9 * np.sign(delta)))  # int(shift*255) = delta
    ours = dv._hue(chw(img).float()[None], torch.tensor([delta]))[0].to(torch.uint8)
    assert_close(ours, ref, f"hue {delta}")


OPS = {  # name -> (PIL op, device op); factors drawn from ColorJitter's ranges
    "brightness": (lambda im, f: views.color_jitter(im, (0,), (f, 1, 1, 0)), lambda x, f: dv._enhance(x, torch.zeros(len(x), dtype=torch.int64), f)),
    "contrast": (lambda im, f: views.color_jitter(im, (1,), (1, f, 1, 0)), lambda x, f: dv._enhance(x, torch.ones(len(x), dtype=torch.int64), f)),
    "saturation": (lambda im, f: views.color_jitter(im, (2,), (1, 1, f, 0)), lambda x, f: dv._enhance(x, torch.full((len(x),), 2), f)),
    "grey": (lambda im, f: im.convert("L").convert("RGB"), lambda x, f: dv._grey(x).expand_as(x)),
    "blur": (lambda im, f: im.filter(ImageFilter.GaussianBlur(radius=f)),
             lambda x, f: dv._blur(x, torch.from_numpy(np.stack([dv.box_blur_taps(float(s)) for s in f])))),
    "solarize": (lambda im, f: ImageOps.solarize(im, 128), lambda x, f: dv._solarize(x, torch.ones(len(x), dtype=torch.bool))),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_each_op_matches_pillow_on_photographs(photos, op):
    pil_op, device_op = OPS[op]
    rng = np.random.default_rng(1)
    crops = [views.center_crop(im, 64) for im in photos[:48]]
    lo, hi = views.BLUR_SIGMA if op == "blur" else (0.6, 1.4)
    factors = torch.tensor(rng.uniform(lo, hi, len(crops)), dtype=torch.float32)
    ref = torch.stack([chw(pil_op(im, float(f))) for im, f in zip(crops, factors)])
    ours = device_op(torch.stack([chw(im) for im in crops]).float(), factors).to(torch.uint8)
    assert_close(ours, ref, op)


def reference_and_device_views(images, size, seed, precropped=False):
    """make_views's views, and geometric_views + augment_views's, for the same generators."""
    ref, parts, flips, draws = [], [], [], []
    for i, img in enumerate(images):
        ref.append([chw(v) for v in views.make_views(img, size, np.random.default_rng([seed, i]), True, precropped)])
        rng = np.random.default_rng([seed, i])
        crops, x_flip, ys = dv.geometric_views(img, size, rng, True, precropped)
        parts.append([chw(v) for v in crops])
        flips.append(x_flip)
        draws.append(ys)
        # Same decisions: the generator is left exactly where make_views leaves it.
        after = np.random.default_rng([seed, i])
        views.make_views(img, size, after, True, precropped)
        assert rng.random() == after.random()
    batch = {name: torch.stack([p[k] for p in parts]) for k, name in enumerate(("x", "y1", "y2"))}
    batch["x_flip"] = torch.tensor(flips)
    batch["y1_params"] = dv.pack_y([d[0] for d in draws])
    batch["y2_params"] = dv.pack_y([d[1] for d in draws])
    batch["label"] = torch.arange(len(images))
    out = dv.augment_views(batch, torch.device("cpu"))
    assert set(out) == {"x", "y1", "y2", "label"}
    return {name: torch.stack([r[k] for r in ref]) for k, name in enumerate(("x", "y1", "y2"))}, out


@pytest.mark.parametrize("precropped", [False, True])
def test_views_match_make_views_on_photographs(photos, precropped):
    ref, out = reference_and_device_views(photos, 64, seed=7, precropped=precropped)
    for name in ("x", "y1", "y2"):
        assert_close(out[name], ref[name], name)
        # The statistics the encoder sees (per-channel mean and std) agree to a small fraction of a level.
        a, b = out[name].float(), ref[name].float()
        assert torch.allclose(a.mean((0, 2, 3)), b.mean((0, 2, 3)), atol=0.01)
        assert torch.allclose(a.std((0, 2, 3)), b.std((0, 2, 3)), atol=0.01)


def test_views_match_make_views_on_demo_data(demo_images):
    ref, out = reference_and_device_views(demo_images, 32, seed=3)
    for name in ("x", "y1", "y2"):
        assert_close(out[name], ref[name], name)


def test_augment_y_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        dv.augment_y(torch.zeros(1, 3, 4, 4), dv.pack_y([views.draw_y(4, 4, np.random.default_rng(0), **views.Y1)]))


@pytest.mark.parametrize("source", ["base", "photo"])
def test_crop_resize_matches_pillow(photos, source):
    """Up-scaling crops of the R x R base (pre-cropped data) and crops of whole photographs
    that shrink on both axes: Pillow's bilinear coefficients and rounding, replayed."""
    size = 48
    images = [views.center_crop(im, size) for im in photos[:32]] if source == "base" else [
        im.resize((224, 224)) for im in photos[:16]]
    rng = np.random.default_rng(5)
    draws = [views.draw_y(im.width, im.height, rng, **views.Y1) for im in images]
    if source == "photo":  # boxes of at least size x size (see crop_resize on mixed ones)
        draws = [dataclasses.replace(d, box=(d.box[0], d.box[1], max(d.box[2], size), max(d.box[3], size)))
                 if d.box[0] + size <= 224 and d.box[1] + size <= 224 else dataclasses.replace(d, box=(0, 0, 224, 224))
                 for d in draws]
    ref = torch.stack([chw(dv.crop_y(im, size, d)) for im, d in zip(images, draws)])
    ours = dv.crop_resize(torch.stack([chw(im) for im in images]), dv.pack_y(draws)["box"], size)
    assert_close(ours, ref, f"crop_resize of {source}")


def test_y_views_cut_on_the_device_match_precropped_make_views(photos):
    """A raw-shard batch carries only the R x R base: y1 and y2 are cut from it on the device."""
    size = 64
    images = [views.center_crop(im, size) for im in photos[:32]]
    ref, out = reference_and_device_views(images, size, seed=11, precropped=True)
    batch = {"x": ref["x"], "x_flip": torch.zeros(len(images), dtype=torch.bool)}
    parts = [dv.geometric_views(im, size, np.random.default_rng([11, i]), True, True) for i, im in enumerate(images)]
    batch["x"] = torch.stack([chw(p[0][0]) for p in parts])
    batch["x_flip"] = torch.tensor([p[1] for p in parts])
    batch["y1_params"] = dv.pack_y([p[2][0] for p in parts])
    batch["y2_params"] = dv.pack_y([p[2][1] for p in parts])
    from_base = dv.augment_views(batch, torch.device("cpu"))
    for name in ("x", "y1", "y2"):
        assert_close(from_base[name], ref[name], name)

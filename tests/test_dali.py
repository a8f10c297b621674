"""The DALI loader (CPU operators) against the torch reference loader on the same images: the
same order and random decisions, every effect applied exactly where it was decided and at the
reference's rates, the center view within 30 dB, normalised value ranges, determinism,
resume, rank sharding, the fine-tuning mode, bad files and colour modes.

Rates are checked against binomial 4-sigma bands of the sample size; the crop boxes are read
back from the pixels of a coordinate-gradient image. Skipped when NVIDIA DALI is missing.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import assert_same, deny_open, noise, take

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e .[dali])")

from epg_fast.config import DataConfig  # noqa: E402
from epg_fast.data import DataError, build_loader, dali, normalize, views  # noqa: E402
from epg_fast.data.views import IMAGENET_MEAN, IMAGENET_STD, Y1, Y2, center_crop, make_views  # noqa: E402

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------
# Helpers


def save_tree(root, images: dict[str, list[Image.Image]], ext: str = ".png"):
    for name, imgs in images.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs):
            img.save(root / name / f"{i}{ext}")
    return root


def noise_tree(root, counts: dict[str, int], lo: int = 8, hi: int = 32, seed: int = 0):
    """Noise images with sides in [lo, hi): below 2R = 32 for R = 16, so x involves no box-halving
    and matches the reference within a level (see the module docstring of epg_fast.data.dali)."""
    rng = np.random.default_rng(seed)
    return save_tree(root, {c: [noise(rng, *rng.integers(lo, hi, 2)) for _ in range(n)] for c, n in counts.items()})


def cfg_for(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), index_cache="none", **{"workers": 2, "prefetch": 2, **kw})


ALL = ("x", "y1", "y2")  # the pre-training views
X = ("x",)  # the fine-tuning view


def dali_loader(root, size=16, views=ALL, batch=4, seed=0, rank=0, world=1, device=CPU, **kw):
    return build_loader(cfg_for(root, loader="dali", **kw), image_size=size, views=views, global_batch=batch,
                        rank=rank, world_size=world, seed=seed, device=device)


def torch_loader(root, size=16, views=ALL, batch=4, seed=0, rank=0, world=1, **kw):
    return build_loader(cfg_for(root, **{"workers": 0, **kw}), image_size=size, views=views,
                        global_batch=batch, rank=rank, world_size=world, seed=seed)


def cat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, in dB, of uint8 batches [B, 3, H, W]."""
    mse = ((a.double() - b.double()) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(255**2 / mse.clamp_min(1e-10))


def is_grey(views_: torch.Tensor) -> torch.Tensor:
    return (views_[:, 0] == views_[:, 1]).flatten(1).all(1) & (views_[:, 1] == views_[:, 2]).flatten(1).all(1)


def within_4_sigma(hits: np.ndarray, p: float) -> bool:
    """The observed rate of `hits` is within 4 binomial standard deviations of p."""
    n = len(hits)
    return abs(hits.mean() - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12


def patch_draws(monkeypatch, record: list | None = None, x_flip: bool | None = None, **y_changes) -> None:
    """Make the DALI loader record the decisions it draws (before any change) and/or
    override some of them for every sample (an ablation: e.g. blur=False)."""
    real = dali.draw_views

    def patched(*args, **kwargs):
        d = real(*args, **kwargs)
        if record is not None:
            record.append(d)
        return dali.ViewDraws(d.x_flip if x_flip is None else x_flip,
                              tuple(dataclasses.replace(y, **y_changes) for y in d.y))

    monkeypatch.setattr(dali, "draw_views", patched)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return noise_tree(tmp_path_factory.mktemp("tree"), {"a": 7, "b": 7, "c": 6})


# ---------------------------------------------------------------------------------------
# The random decisions are the reference's


def test_draws_follow_the_reference_stream(monkeypatch):
    """draw_views consumes the generator exactly as views.make_views does, and its crop boxes,
    flips and grey decisions are the ones the reference applies."""
    ref_boxes: list[tuple[int, int, int, int]] = []
    real_box = views.random_resized_crop_box

    def recording_box(*args, **kwargs):
        ref_boxes.append(real_box(*args, **kwargs))
        return ref_boxes[-1]

    monkeypatch.setattr(views, "random_resized_crop_box", recording_box)
    rng = np.random.default_rng(0)
    size = 16
    for trial in range(300):
        w, h = (int(v) for v in rng.integers(6, 90, 2))
        img = noise(rng, w, h)
        with_y, precropped = trial % 5 != 0, trial % 3 == 0
        ours, theirs = np.random.default_rng([7, trial]), np.random.default_rng([7, trial])
        d = dali.draw_views(w, h, size, ours, with_y, precropped)
        ref_boxes.clear()
        out = make_views(img, size, theirs, with_y, precropped)
        assert ours.bit_generator.state == theirs.bit_generator.state  # same draws, same count
        assert [y.box for y in d.y] == ref_boxes
        base = np.asarray(center_crop(img, size))
        assert np.array_equal(np.asarray(out[0]), base[:, ::-1] if d.x_flip else base)
        for y, view in zip(d.y, out[1:]):
            v = np.asarray(view)
            assert bool((v[..., 0] == v[..., 1]).all() and (v[..., 1] == v[..., 2]).all()) == y.gray


def test_decision_rates_and_ranges():
    """Every decision at the reference's rate (4-sigma bands), factors in their ranges."""
    n = 8000
    rng = np.random.default_rng(1)
    draws = [dali.draw_views(int(rng.integers(20, 300)), int(rng.integers(20, 300)), 32,
                             np.random.default_rng([3, i]), True, False) for i in range(n)]
    assert within_4_sigma(np.array([d.x_flip for d in draws]), 0.5)
    for k, params in enumerate((Y1, Y2)):
        ys = [d.y[k] for d in draws]
        for name, p in (("jitter", 0.8), ("gray", 0.2), ("flip", 0.5), ("blur", params["blur_p"]),
                        ("solarize", params["solarize_p"])):
            assert within_4_sigma(np.array([getattr(y, name) for y in ys]), p), (k, name)
        factors = np.array([y.factors for y in ys if y.jitter])
        lo, hi = np.array([0.6, 0.6, 0.8, -0.1]), np.array([1.4, 1.4, 1.2, 0.1])
        assert (factors >= lo).all() and (factors <= hi).all()
        sd = (hi - lo) / math.sqrt(12 * len(factors))  # uniform: the means within 4 sigma of the centre
        assert (abs(factors.mean(0) - (lo + hi) / 2) <= 4 * sd).all()
        orders = np.array([y.order for y in ys if y.jitter])
        assert (np.sort(orders, axis=1) == np.arange(4)).all()  # permutations
        for op in range(4):  # each op first a quarter of the time
            assert within_4_sigma(orders[:, 0] == op, 0.25)
        sigmas = np.array([y.sigma for y in ys if y.blur])
        assert (sigmas >= 0.1).all() and (sigmas <= 2.0).all()


# ---------------------------------------------------------------------------------------
# The decisions are applied, exactly where drawn


def test_crop_boxes_are_applied_as_drawn_and_match_the_reference(tmp_path, monkeypatch):
    """Crop a coordinate gradient (R channel = x, G = y) and read each box back from the
    output: it is the drawn box, the same as the torch loader's for the same sample, and its
    pixels show the same region as the reference's view; so the area-fraction and
    aspect-ratio distributions are the reference's."""
    rng = np.random.default_rng(2)
    grads = []
    for _ in range(24):
        w, h = (int(v) for v in rng.integers(60, 256, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        grads.append(Image.fromarray(np.stack([xx, yy, np.full_like(xx, 128)], -1).astype(np.uint8)))
    root = save_tree(tmp_path, {"g": grads})
    size, batch, steps = 32, 8, 12  # 4 epochs of the 24 images
    drawn: list[dali.ViewDraws] = []
    # Only the crop and the flip: no jitter, grey, blur or solarize to disturb the gradient.
    patch_draws(monkeypatch, drawn, jitter=False, gray=False, blur=False, solarize=False)
    got = cat(take(dali_loader(root, size=size, batch=batch), steps))
    ref_boxes: list[tuple[int, int, int, int]] = []
    ref_sizes: list[tuple[int, int]] = []
    real_box = views.random_resized_crop_box

    def recording_box(width, height, rng):
        ref_sizes.append((width, height))
        ref_boxes.append(real_box(width, height, rng))
        return ref_boxes[-1]

    monkeypatch.setattr(views, "random_resized_crop_box", recording_box)
    ref = cat(take(torch_loader(root, size=size, batch=batch), steps))

    def read_back(view: torch.Tensor, flip: bool, j: np.ndarray) -> tuple[float, float, float, float]:
        """(left, top, width, height) of the region a view shows: output pixel j shows source
        coordinate start - 0.5 + (j + 0.5) * extent / R; fitted on interior pixels j."""
        img = view.double().numpy()
        found = []
        for profile in (img[0].mean(0)[::-1] if flip else img[0].mean(0), img[1].mean(1)):
            slope, icpt = np.polyfit(j, profile[j], 1)
            found.append((icpt + 0.5 - 0.5 * slope, slope * size))
        (left, w), (top, h) = found
        return left, top, w, h

    interior = np.arange(3, size - 3)  # the filters clamp at the crop's border
    center = np.arange(8, size - 8)  # also clear of the reference's blur at the border
    n = batch * steps
    est, applied, pairs = [], [], []
    for s in range(n):
        for k, view in enumerate(("y1", "y2")):
            d = drawn[s].y[k]
            est.append(read_back(got[view][s], d.flip, interior))
            applied.append(d.box)
            if not (d.jitter or d.gray or d.solarize):  # the reference's view shows the gradient too
                pairs.append((read_back(got[view][s], d.flip, center), read_back(ref[view][s], d.flip, center)))
    est, applied = np.array(est), np.array(applied, float)
    ref_boxes, src_area = np.array(ref_boxes[: 2 * n], float), np.prod(np.array(ref_sizes[: 2 * n], float), 1)
    assert np.array_equal(applied, ref_boxes)  # the reference's boxes, sample by sample
    # Within a source pixel: the bilinear filter's integer windows (PIL's too) shift the
    # apparent edges by up to half a pixel at some scales.
    assert np.abs(est - applied).max() <= 1.01
    assert len(pairs) >= 10
    assert np.abs(np.array(pairs)[:, 0] - np.array(pairs)[:, 1]).max() < 0.25  # the same region as PIL's
    # Distributions: two-sample KS statistic of the area fraction and aspect ratio against the
    # 1% critical value 1.63 * sqrt(2 / m) (met with room when the boxes agree sample by sample).
    m = len(est)
    for a, b in ((est[:, 2] * est[:, 3] / src_area, ref_boxes[:, 2] * ref_boxes[:, 3] / src_area),
                 (est[:, 2] / est[:, 3], ref_boxes[:, 2] / ref_boxes[:, 3])):
        grid = np.sort(np.concatenate([a, b]))
        ks = np.abs(np.searchsorted(np.sort(a), grid, "right") - np.searchsorted(np.sort(b), grid, "right")).max() / m
        assert ks <= 1.63 * math.sqrt(2 / m)


def _checker_tree(root, count: int = 32, seed: int = 3):
    """Colourful checkerboards (random colours, 4-pixel cells): high frequencies to blur,
    values on both sides of 128 to solarize, saturated colours to grey or jitter."""
    rng = np.random.default_rng(seed)
    imgs = []
    for _ in range(count):
        w, h = (int(v) for v in rng.integers(40, 90, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        cells = ((xx // 4 + yy // 4) % 2).astype(bool)
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        img = np.where(cells[..., None], a, b) + (xx[..., None] * 60 // w)  # a ramp: not mirror-symmetric
        imgs.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))
    return save_tree(root, {"c": imgs})


def _high_freq(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return (v[..., 1:, :] - v[..., :-1, :]).abs().mean(dim=(1, 2, 3)) + (v[..., 1:] - v[..., :-1]).abs().mean(dim=(1, 2, 3))


def test_effects_are_applied_exactly_where_drawn(tmp_path, monkeypatch):
    """Each effect, ablated in a second run with everything else equal, changes exactly the
    samples whose decision is true; the observed rates are the reference's (4-sigma bands);
    grey and flip decisions agree sample by sample with the torch loader's outputs."""
    root = _checker_tree(tmp_path)
    size, batch, steps = 24, 16, 16  # 256 samples
    n = batch * steps

    def run(**changes) -> dict[str, torch.Tensor]:
        with monkeypatch.context() as m:
            patch_draws(m, record if not changes else None, **changes)
            return cat(take(dali_loader(root, size=size, batch=batch), steps))

    record: list[dali.ViewDraws] = []
    base = run()
    drawn = record[:n]
    no = {name: run(**{name: False}) for name in ("jitter", "blur", "solarize", "flip")}
    no_x_flip = run(x_flip=False)

    x_flip = np.array([d.x_flip for d in drawn])
    for s in range(n):
        assert torch.equal(base["x"][s], no_x_flip["x"][s].flip(-1) if x_flip[s] else no_x_flip["x"][s])
    assert within_4_sigma(x_flip, 0.5)
    for k, (view, params) in enumerate((("y1", Y1), ("y2", Y2))):
        d = [dr.y[k] for dr in drawn]
        decided = {name: np.array([getattr(y, name) for y in d]) for name in ("jitter", "gray", "blur", "solarize", "flip")}
        changed = {name: np.array([not torch.equal(base[view][s], no[name][view][s]) for s in range(n)])
                   for name in ("jitter", "solarize", "flip")}
        assert (is_grey(base[view]).numpy() == decided["gray"]).all()
        assert (changed["jitter"] == decided["jitter"]).all()
        assert (changed["solarize"] == decided["solarize"]).all()
        assert (changed["flip"] == decided["flip"]).all()
        for s in np.flatnonzero(decided["flip"]):
            assert torch.equal(base[view][s], no["flip"][view][s].flip(-1))
        # Blur: a checkerboard loses high frequencies; sigma < 0.6 may barely change 24 px views.
        blurred = (_high_freq(base[view]) < 0.9 * _high_freq(no["blur"][view])).numpy()
        unchanged = np.array([torch.equal(base[view][s], no["blur"][view][s]) for s in range(n)])
        sigma = np.array([y.sigma for y in d])
        assert unchanged[~decided["blur"]].all()
        assert blurred[decided["blur"] & (sigma >= 0.6)].all()
        for name, p in (("jitter", 0.8), ("gray", 0.2), ("flip", 0.5), ("blur", params["blur_p"]),
                        ("solarize", params["solarize_p"])):
            assert within_4_sigma(decided[name], p), (view, name)

    # The torch loader on the same tree: the same grey samples, the same x flips.
    ref = cat(take(torch_loader(root, size=size, batch=batch), steps))
    assert torch.equal(ref["label"], base["label"])
    for view in ("y1", "y2"):
        assert torch.equal(is_grey(ref[view]), is_grey(base[view]))
    same, flipped = psnr(base["x"], ref["x"]), psnr(base["x"], ref["x"].flip(-1))
    assert (same > flipped + 5).all()  # the same flip decision on every sample


# ---------------------------------------------------------------------------------------
# Pixels against the reference


@pytest.mark.parametrize("size", [64, 128])
def test_center_view_within_30_db_of_the_reference(demo_root, size):
    """x of every demo JPEG against views.center_crop. Without box-halving (R=128: every
    short side < 2R) they agree within a level; with it (R=64), PIL's odd-size halving
    shifts the box windows, so a few sharp synthetic images are lower (module docstring)."""
    batch, steps = 50, 8  # one epoch: all 400 images
    got = cat(take(dali_loader(demo_root, size=size, views=X, batch=batch), steps))
    ref = cat(take(torch_loader(demo_root, size=size, views=X, batch=batch), steps))
    assert torch.equal(got["label"], ref["label"])
    per_image = psnr(got["x"], ref["x"])
    overall = 10 * math.log10(255**2 / ((got["x"].double() - ref["x"].double()) ** 2).mean().item())
    assert overall >= 30 and per_image.median() >= 40
    if size == 128:
        assert per_image.min() >= 45


def test_y_views_close_to_the_reference(demo_root, monkeypatch):
    """The SSL views of the demo JPEGs against the torch loader's: without colour jitter
    (crop, resize, grey, blur, solarize, flip) they agree within a few levels; the jitter's
    hue rotation is where the two differ most (module docstring of epg_fast.data.dali)."""
    drawn: list[dali.ViewDraws] = []
    patch_draws(monkeypatch, drawn)
    got = cat(take(dali_loader(demo_root, size=64, batch=50), 4))
    ref = cat(take(torch_loader(demo_root, size=64, batch=50), 4))
    for k, view in enumerate(("y1", "y2")):
        jittered = torch.tensor([d.y[k].jitter for d in drawn[:200]])
        quality = psnr(got[view], ref[view])
        assert quality[~jittered].median() >= 45 and quality[jittered].median() >= 25
        assert torch.equal(is_grey(got[view]), is_grey(ref[view]))


@pytest.mark.parametrize("mode", ["imagenet", "simple"])
def test_value_range_after_normalisation(demo_root, mode):
    got = cat(take(dali_loader(demo_root, size=32, batch=50), 2))
    ref = cat(take(torch_loader(demo_root, size=32, batch=50), 2))
    if mode == "simple":
        lo, hi = torch.full((3,), -1.0), torch.full((3,), 1.0)
    else:
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        lo, hi = -mean / (2 * std), (1 - mean) / (2 * std)
    for view in ("x", "y1", "y2"):
        a, b = normalize(got[view], mode), normalize(ref[view], mode)
        assert a.dtype == torch.float32
        per_channel = a.transpose(0, 1).flatten(1)
        assert (per_channel.min(1).values >= lo - 1e-6).all() and (per_channel.max(1).values <= hi + 1e-6).all()
        assert torch.allclose(a.mean(dim=(0, 2, 3)), b.mean(dim=(0, 2, 3)), atol=0.03)
        assert torch.allclose(a.std(dim=(0, 2, 3)), b.std(dim=(0, 2, 3)), atol=0.03)


# ---------------------------------------------------------------------------------------
# Order, determinism, resume, ranks, views


def test_same_order_as_the_torch_loader_deterministic_and_resumable(tree):
    k = 5  # 20 images / G=4: 5 steps per epoch, so 2k batches cross an epoch
    full = take(dali_loader(tree, seed=3), 2 * k)
    ref = take(torch_loader(tree, seed=3), 2 * k)
    for a, b in zip(full, ref):
        assert torch.equal(a["label"], b["label"]) and (psnr(a["x"], b["x"]) > 40).all()
    assert not torch.equal(full[0]["x"], full[k]["x"])  # epochs are reshuffled
    assert_same(take(dali_loader(tree, seed=3, workers=1, prefetch=1), 2 * k), full)  # threads do not matter
    first = dali_loader(tree, seed=3)
    head = take(first, k)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 0
    second = dali_loader(tree, seed=3)
    second.load_state_dict(state)
    assert_same(head + take(second, k), full)
    mid = dali_loader(tree, seed=3)
    mid.load_state_dict({"epoch": 0, "batch": 3})
    assert_same(take(mid, 4), full[3:7])
    assert not torch.equal(take(dali_loader(tree, seed=4), 1)[0]["y1"], full[0]["y1"])


def test_ranks_split_the_global_batch_like_the_torch_loader(tree):
    whole = take(dali_loader(tree, batch=8, seed=1), 2)
    for r in (0, 1):
        part = take(dali_loader(tree, batch=8, seed=1, rank=r, world=2), 2)
        ref = take(torch_loader(tree, batch=8, seed=1, rank=r, world=2), 2)
        for step in range(2):
            assert part[step]["x"].shape[0] == 4
            assert torch.equal(part[step]["label"], ref[step]["label"])
            for key in whole[step]:
                assert torch.equal(part[step][key], whole[step][key][4 * r : 4 * r + 4])


def test_x_alone_is_the_same_x_and_label(tree):
    pre = take(dali_loader(tree, seed=2), 2)
    got = take(dali_loader(tree, views=X, seed=2), 2)
    for b, p in zip(got, pre):
        assert b.keys() == {"x", "label"}
        assert b["x"].dtype == torch.uint8 and b["label"].dtype == torch.int64
        assert torch.equal(b["x"], p["x"]) and torch.equal(b["label"], p["label"])


def test_loader_interface(tree):
    loader = dali_loader(tree, batch=4, size=16)
    assert (loader.num_images, loader.num_classes, loader.steps_per_epoch, loader.skipped) == (20, 3, 5, 0)
    batch = next(iter(loader))
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "x": (4, 3, 16, 16), "y1": (4, 3, 16, 16), "y2": (4, 3, 16, 16), "label": (4,)}
    assert all(v.device == CPU for v in batch.values())
    assert loader.state_dict() == {"epoch": 0, "batch": 1, "seed": 0, "num_images": 20, "global_batch": 4}


# ---------------------------------------------------------------------------------------
# Bad files, formats, pre-cropped trees


def test_bad_files_are_skipped_counted_and_logged_like_the_torch_loader(tmp_path, monkeypatch, caplog):
    """half.jpg has a good header but its data is cut: DALI aborts, the loader finds it with
    PIL and replaces it; denied.png cannot be read at all. Both are hopped over exactly as the
    torch loader does, so the batches hold the same images."""
    noise_tree(tmp_path, {"a": 8, "b": 8}, lo=20)
    bad = tmp_path / "bad"
    bad.mkdir()
    rng = np.random.default_rng(1)
    noise(rng, 30, 30).save(bad / "half.jpg", quality=90)
    (bad / "half.jpg").write_bytes((bad / "half.jpg").read_bytes()[:1000])  # the headers, half the data
    noise(rng, 30, 30).save(bad / "denied.png")
    (bad / "text.jpg").write_text("not an image")  # excluded by the index's header check
    deny_open(monkeypatch, "denied.png", dali, views)
    with caplog.at_level(logging.WARNING, logger="epg_fast.data"):
        loader = dali_loader(tmp_path, batch=4)
        assert loader.steps_per_epoch == 4
        got = take(loader, 8)  # two epochs: every file met in each
    lines = [r.getMessage() for r in caplog.records]
    ref = take(torch_loader(tmp_path, batch=4), 8)
    for a, b in zip(got, ref):
        assert torch.equal(a["label"], b["label"]) and (a["label"] != 2).all()
        assert (psnr(a["x"], b["x"]) > 40).all()
    assert loader.skipped == 2
    assert sum("skipped unreadable image" in line for line in lines) == 1
    assert any("epoch 0: 2 unreadable images" in line for line in lines)


def test_all_files_bad_raises(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(4):  # good headers, data cut short: only decoding finds out
        path = tmp_path / "a" / f"{i}.jpg"
        noise(np.random.default_rng(i), 30, 30).save(path, quality=90)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="files in a row failed to decode"):
        next(iter(dali_loader(tmp_path, batch=2)))


def test_formats_and_colour_modes_decode_like_pil(tmp_path):
    """Every format and mode the torch loader reads, x compared with its x. GIF and TIFF go
    through PIL in the feeder; the rest is DALI's decoder (EXIF orientation ignored, as PIL)."""
    rng = np.random.default_rng(4)
    base = noise(rng, 40, 28)
    grey16 = Image.fromarray(rng.integers(0, 65536, (28, 40), dtype=np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": DALI would apply it by default
    files = {
        "rgb.jpg": (base, {"quality": 95}), "cmyk.jpg": (base.convert("CMYK"), {}), "grey.jpg": (base.convert("L"), {}),
        "exif.jpg": (base, {"exif": exif}), "rgb.png": (base, {}), "grey16.png": (grey16, {}),
        "palette.png": (base.convert("P"), {"transparency": 0}), "la.png": (base.convert("LA"), {}),
        "rgba.png": (base.convert("RGBA"), {}), "anim.gif": (base.convert("P"), {}), "rgb.tif": (base, {}),
        "la.tif": (base.convert("LA"), {}), "rgb.bmp": (base, {}), "rgb.webp": (base, {"lossless": True}),
        "rgb.ppm": (base, {}),
    }
    (tmp_path / "m").mkdir()
    for name, (img, kw) in files.items():
        img.save(tmp_path / "m" / name, **kw)
    n = len(files)
    got = take(dali_loader(tmp_path, size=16, views=X, batch=n), 1)[0]
    ref = take(torch_loader(tmp_path, size=16, views=X, batch=n), 1)[0]
    assert (psnr(got["x"], ref["x"]) > 45).all()


def test_files_dali_cannot_decode_go_through_pil(tmp_path, monkeypatch):
    """A file that PIL decodes but DALI does not (here a GIF, let through on purpose) makes
    the pipeline fail once; the loader then decodes it with PIL and carries on."""
    noise_tree(tmp_path, {"a": 7}, lo=20)
    noise(np.random.default_rng(5), 30, 20).convert("P").save(tmp_path / "a" / "z.gif")
    monkeypatch.setattr(dali, "_DALI_FORMATS", dali._DALI_FORMATS | {"GIF"})
    loader = dali_loader(tmp_path, batch=8, views=X)
    got = take(loader, 2)
    ref = take(torch_loader(tmp_path, batch=8, views=X), 2)
    assert len(loader.source.via_pil) == 1 and loader.skipped == 0
    for a, b in zip(got, ref):
        assert torch.equal(a["label"], b["label"]) and (psnr(a["x"], b["x"]) > 40).all()


def test_precropped_tree(tmp_path, caplog):
    """x is the stored R x R image itself (or its mirror); the y views crop inside it; an
    image of another size gets the center crop and one warning."""
    size = 16
    root = noise_tree(tmp_path, {"a": 8}, lo=size, hi=size + 1)
    noise(np.random.default_rng(6), 30, 20).save(tmp_path / "a" / "odd.png")
    with caplog.at_level(logging.WARNING, logger="epg_fast.data"):
        got = take(dali_loader(root, size=size, batch=9, precropped=True), 1)[0]
    warnings = [r.getMessage() for r in caplog.records if "pre-cropped data holds images" in r.getMessage()]
    assert len(warnings) == 1 and "odd.png is 30x20" in warnings[0]
    ref = take(torch_loader(root, size=size, batch=9, precropped=True), 1)[0]
    assert torch.equal(got["label"], ref["label"])
    stored = [i for i in range(9) if psnr(got["x"][i : i + 1], ref["x"][i : i + 1]).item() > 100]
    assert len(stored) >= 8  # the R x R files come through bit-identical
    for view in ("y1", "y2"):
        assert torch.equal(is_grey(got[view]), is_grey(ref[view]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (DALI's GPU operators)")
def test_gpu_pipeline_matches_the_cpu_one(tree):
    """The same graph with a "mixed" decoder and GPU operators: CUDA tensors, same samples."""
    cpu = take(dali_loader(tree, seed=5), 3)
    gpu = take(dali_loader(tree, seed=5, device=torch.device("cuda")), 3)
    for a, b in zip(cpu, gpu):
        assert all(v.is_cuda for v in b.values())
        b = {k: v.cpu() for k, v in b.items()}
        assert torch.equal(a["label"], b["label"])
        assert (psnr(a["x"], b["x"]) > 40).all()
        for view in ("y1", "y2"):
            assert torch.equal(is_grey(a[view]), is_grey(b[view]))
            assert psnr(a[view], b[view]).median() > 30

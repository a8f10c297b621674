"""Data pipeline: index errors, bad files, colour modes, the three views, normalisation,
determinism, resume, rank sharding, pre-cropping and the demo data. Small images, tiny R."""

from __future__ import annotations

import itertools
import logging
import math
import os
import pickle
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import assert_same, deny_open, noise, take

from epg_fast.config import DataConfig
from epg_fast.data import (
    BatchPlan,
    DataError,
    DataRootNotFoundError,
    build_loader,
    ensure_demo_data,
    normalize,
    scan_image_folder,
    views,
)
from epg_fast.data.demo import MARKER
from epg_fast.data.precrop import precrop
from epg_fast.data.views import IMAGENET_MEAN, IMAGENET_STD, load_image, make_views, to_rgb

R = 16


def make_tree(root, classes: dict[str, int], seed: int = 0):
    """root/<class>/<i>.png with random-noise images of varied small sizes."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            noise(rng, int(rng.integers(8, 40)), int(rng.integers(8, 40))).save(root / name / f"{i}.png")
    return root


ALL = ("x", "y1", "y2")  # the pre-training views


def loader_for(root, views=ALL, batch=4, workers=0, seed=0, rank=0, world=1, **kw):
    cfg = DataConfig(root=str(root), workers=workers, prefetch=2, **kw)
    return build_loader(cfg, image_size=R, views=views, global_batch=batch, rank=rank,
                        world_size=world, seed=seed)


def mirrored(t: torch.Tensor) -> torch.Tensor:
    return t.flip(-1)


def as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"), {"a": 7, "b": 7, "c": 6})


# ---------------------------------------------------------------------------------------
# Bad roots and index


def _one_line_error(excinfo, path) -> None:
    msg = str(excinfo.value)
    assert str(path) in msg and "\n" not in msg


def test_missing_root(tmp_path):
    with pytest.raises(DataRootNotFoundError) as e:
        loader_for(tmp_path / "nope")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, DataError)
    _one_line_error(e, tmp_path / "nope")


def test_root_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="not a directory") as e:
        loader_for(tmp_path / "f")
    _one_line_error(e, tmp_path / "f")


def test_root_without_class_folders(tmp_path):
    noise(np.random.default_rng(0), 8, 8).save(tmp_path / "loose.png")
    (tmp_path / ".hidden").mkdir()  # a dot-folder is not a class
    with pytest.raises(DataError, match="no class folders") as e:
        loader_for(tmp_path)
    _one_line_error(e, tmp_path)


def test_root_without_images(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images") as e:
        loader_for(tmp_path)
    _one_line_error(e, tmp_path)


def test_fewer_images_than_one_batch(tree):
    with pytest.raises(DataError, match="fewer than one global batch"):
        loader_for(tree, batch=21)


def test_extensions_and_non_image_files(tmp_path, caplog):
    exts = [".jpg", ".JPEG", ".png", ".Bmp", ".webp", ".tif", ".TIFF", ".gif", ".ppm"]
    (tmp_path / "a").mkdir()
    for i, ext in enumerate(exts):
        (tmp_path / "a" / f"{i}{ext}").write_bytes(b"")  # not validated: only the names count
    for name in ("readme.txt", "labels.csv", ".DS_Store"):
        (tmp_path / "a" / name).write_text("x")
    with caplog.at_level(logging.WARNING, logger="epg_fast.data"):
        index = scan_image_folder(tmp_path, validate=False)
    assert len(index) == len(exts)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "ignored 3 non-image files" in lines[0] and "readme.txt" in lines[0]


def test_empty_class_keeps_its_label(tmp_path, caplog):
    make_tree(tmp_path, {"a": 2, "b": 0, "c": 3})
    with caplog.at_level(logging.WARNING, logger="epg_fast.data"):
        index = scan_image_folder(tmp_path)
    assert index.classes == ["a", "b", "c"]
    assert index.labels.tolist() == [0, 0, 2, 2, 2]
    assert index.relpath(2) == os.path.join("c", "0.png")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "b (label 1)" in lines[0]


# ---------------------------------------------------------------------------------------
# Files that do not decode


def _bad_tree(root, monkeypatch):
    """16 good images in classes a/b, 4 bad ones (class 'bad', label 2) with image names."""
    make_tree(root, {"a": 8, "b": 8})
    bad = root / "bad"
    bad.mkdir()
    (bad / "text.jpg").write_text("not an image at all")
    buf = bad / "half.jpg"
    noise(np.random.default_rng(1), 30, 30).save(buf, quality=90)
    buf.write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    (bad / "empty.png").write_bytes(b"")
    denied = bad / "denied.png"
    noise(np.random.default_rng(2), 30, 30).save(denied)
    denied.chmod(0)
    if os.geteuid() == 0:  # root reads mode-000 files: make the open fail as it would for a user
        deny_open(monkeypatch, "denied.png", views)
    return [str(p) for p in sorted(bad.iterdir())]


def test_bad_files_are_excluded_or_replaced_counted_and_logged_once(tmp_path, monkeypatch, caplog):
    _bad_tree(tmp_path, monkeypatch)
    bad = tmp_path / "bad"
    with caplog.at_level(logging.WARNING, logger="epg_fast.data"):
        # The header check excludes text.jpg and empty.png; half.jpg (a good header, cut data)
        # and denied.png (unreadable at decode) remain: 18 images, 4 steps of 4.
        loader = loader_for(tmp_path, batch=4)
        assert loader.steps_per_epoch == 4
        batches = take(loader, 8)  # two epochs: every file met in each
    for b in batches:
        assert b.keys() == {"x", "y1", "y2", "label"}
        assert all(v.shape[0] == 4 for v in b.values())
        assert (b["label"] != 2).all()  # the replacement is a good image with its own label
    assert loader.skipped == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # the exclusions at build time, the first skip, one epoch summary
    assert "excluded 2 files" in lines[0] and "text.jpg" in lines[0] and "empty.png" in lines[0]
    assert "skipped unreadable image" in lines[1] and str(bad) in lines[1]
    assert "epoch 0: 2 unreadable images" in lines[2] and "1 new" in lines[2]
    # The replacement is deterministic and independent of the workers.
    assert_same(batches, take(loader_for(tmp_path, batch=4, workers=2), 8))


def test_all_files_bad_raises(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(4):
        (tmp_path / "a" / f"{i}.jpg").write_text("nope")
    with pytest.raises(DataError, match="no readable images .* all 4 image files failed the header check"):
        loader_for(tmp_path, batch=2)
    for i in range(4):  # good headers, data cut short: only decoding finds out
        path = tmp_path / "a" / f"{i}.jpg"
        noise(np.random.default_rng(i), 30, 30).save(path, quality=90)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    loader = loader_for(tmp_path, batch=2)
    with pytest.raises(DataError, match="files in a row failed to decode"):
        next(iter(loader))


# ---------------------------------------------------------------------------------------
# Colour modes and sizes


def test_modes_convert_to_rgb():
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    assert np.array(to_rgb(rgba))[0, 0].tolist() == [10, 20, 30]  # alpha dropped
    grey16 = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    for img in (Image.fromarray(grey16), Image.fromarray(grey16.astype(">u2")),
                Image.fromarray(grey16.astype(np.int32))):
        assert img.mode in ("I;16", "I;16B", "I")
        out = np.array(to_rgb(img))
        assert out.dtype == np.uint8 and out[0, :, 0].tolist() == [0, 100, 255]  # scaled, not clipped
        assert (out == out[..., :1]).all()
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert np.array(to_rgb(pal)).tolist() == [[[255, 0, 0], [0, 255, 0]]]
    for mode in ("L", "LA", "1", "CMYK", "P", "RGB"):
        assert to_rgb(Image.new(mode, (3, 2))).mode == "RGB"


def test_modes_from_files(tmp_path):
    files = {
        "cmyk.jpg": Image.new("CMYK", (8, 8), (0, 255, 255, 0)),  # red
        "grey16.png": Image.fromarray(np.full((4, 4), 65535, np.uint16)),
        "grey16b.tif": Image.fromarray(np.full((4, 4), 257 * 50, ">u2")),
        "bits.bmp": Image.new("1", (5, 5), 1),
        "la.png": Image.new("LA", (3, 3), (77, 0)),
        "pal_t.png": Image.new("P", (3, 3), 0),
        "rgba.webp": Image.new("RGBA", (3, 3), (1, 2, 3, 4)),
    }
    files["pal_t.png"].info["transparency"] = 0
    for name, img in files.items():
        img.save(tmp_path / name)
    out = {name: np.array(load_image(str(tmp_path / name))) for name in files}
    assert all(v.dtype == np.uint8 and v.shape[-1] == 3 for v in out.values())
    assert out["cmyk.jpg"][4, 4, 0] > 240 and out["cmyk.jpg"][4, 4, 1:].max() < 15
    assert (out["grey16.png"] == 255).all() and (out["grey16b.tif"] == 50).all()
    assert (out["bits.bmp"] == 255).all() and (out["la.png"] == 77).all()


def test_tiny_images_are_upsampled(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (1, 1), (9, 99, 199)).save(tmp_path / "a" / "one.png")
    Image.new("RGB", (5, 7), (50, 60, 70)).save(tmp_path / "a" / "five.png")
    for b in take(loader_for(tmp_path, batch=2), 3):
        assert b["x"].shape == b["y1"].shape == b["y2"].shape == (2, 3, R, R)
    x = take(loader_for(tmp_path, views=("x",), batch=2), 1)[0]["x"]
    colours = sorted(tuple(img[:, 0, 0].tolist()) for img in x)
    assert colours == [(9, 99, 199), (50, 60, 70)]
    assert all((img == img[:, :1, :1]).all() for img in x)


# ---------------------------------------------------------------------------------------
# Views


def test_x_is_the_adm_center_crop_with_flip(tmp_path):
    img = noise(np.random.default_rng(3), 100, 70)
    (tmp_path / "a").mkdir()
    img.save(tmp_path / "a" / "img.png")
    # By hand for R=16: 70 >= 32 -> box-halve to 50x35; 35 >= 32 -> 25x17; bicubic to
    # (round(25*16/17)=24, 16); crop left (24-16)//2 = 4.
    half = img.resize((50, 35), Image.BOX).resize((25, 17), Image.BOX)
    ref = half.resize((24, 16), Image.BICUBIC).crop((4, 0, 20, 16))
    ref = as_tensor(ref)
    flips = 0
    for b in take(loader_for(tmp_path, batch=1), 12):
        x = b["x"][0]
        assert torch.equal(x, ref) or torch.equal(x, mirrored(ref))
        flips += not torch.equal(x, ref)
    assert 0 < flips < 12  # both orientations occur (P(fail) = 2 * 2^-12)


def _rate_bounds(n: int, p: float) -> tuple[float, float]:
    """n*p +- 4 sigma of a binomial count."""
    sigma = math.sqrt(n * p * (1 - p))
    return n * p - 4 * sigma, n * p + 4 * sigma


def test_flip_and_grayscale_rates():
    img = noise(np.random.default_rng(4), 24, 20)
    n = 400
    ref = as_tensor(make_views(img, 8, np.random.default_rng(0), False, False)[0])
    flips, grey = 0, [0, 0]
    for i in range(n):
        x, y1, y2 = (as_tensor(v) for v in make_views(img, 8, np.random.default_rng([7, i]), True, False))
        flips += torch.equal(x, mirrored(ref)) and not torch.equal(x, ref)
        for j, y in enumerate((y1, y2)):
            grey[j] += bool((y == y[:1]).all())  # jitter keeps a coloured image coloured
    lo, hi = _rate_bounds(n, 0.5)
    assert lo < flips < hi
    lo, hi = _rate_bounds(n, 0.2)
    assert lo < grey[0] < hi and lo < grey[1] < hi


def test_random_resized_crop_box():
    rng = np.random.default_rng(0)
    for _ in range(300):
        left, top, w, h = views.random_resized_crop_box(40, 30, rng)
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30
        assert 0.08 * 1200 - 40 <= w * h <= 1200  # area fraction in [0.08, 1] up to rounding
        assert 3 / 4 - 0.1 < w / h < 4 / 3 + 0.1
    # A 200x10 strip never fits a 3/4..4/3 crop of >= 8% area: the fallback is centered.
    assert views.random_resized_crop_box(200, 10, rng) == (93, 0, 13, 10)


def test_y2_solarizes_and_y1_does_not():
    # Uniform grey 250: jitter keeps it uniform in [150, 255]; solarize maps v >= 128 to 255 - v.
    img = Image.new("RGB", (20, 20), (250, 250, 250))
    n = 400
    solarized, exact, y1_dark = 0, 0, 0
    for i in range(n):
        _, y1, y2 = (as_tensor(v) for v in make_views(img, 8, np.random.default_rng([9, i]), True, False))
        y1_dark += bool((y1 < 128).any())
        solarized += bool((y2 < 128).all())
        exact += bool((y2 == 5).all())  # no jitter, then solarized: exactly 255 - 250
    lo, hi = _rate_bounds(n, 0.2)
    assert lo < solarized < hi and y1_dark == 0 and exact > 0
    # Solarized at 128, any image ends below 128 (values < 128 stay, values >= 128 invert).
    noisy = noise(np.random.default_rng(5), 20, 20)
    top = [int(as_tensor(views.y_view(noisy, 8, np.random.default_rng([10, i]), 0.0, 1.0)).max())
           for i in range(50)]
    assert max(top) == 127


def test_precropped_views_stay_inside_the_crop(tmp_path, caplog):
    # Black center square, white margins: y views of the raw image sometimes see white;
    # views of the pre-cropped image never do.
    img = Image.new("RGB", (2 * R, R), (255, 255, 255))
    img.paste((0, 0, 0), (R // 2, 0, R // 2 + R, R))
    (tmp_path / "a").mkdir()
    img.save(tmp_path / "a" / "img.png")
    raw = take(loader_for(tmp_path, batch=1), 30)
    assert all((b["x"] == 0).all() for b in raw)
    assert any(b["y1"].any() or b["y2"].any() for b in raw)
    with caplog.at_level(logging.WARNING, logger="epg_fast.data"):
        pre = take(loader_for(tmp_path, batch=1, precropped=True), 30)
    assert all(not (b["x"].any() or b["y1"].any() or b["y2"].any()) for b in pre)
    warned = [r.getMessage() for r in caplog.records if "not 16x16" in r.getMessage()]
    assert len(warned) == 1 and "32x16" in warned[0]


def test_normalize():
    u8 = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 3).expand(3, 1, 3)
    simple = normalize(u8, "simple")
    assert simple.dtype == torch.float32
    torch.testing.assert_close(simple[0, 0], torch.tensor([-1.0, 2 * 128 / 255 - 1, 1.0]))
    assert simple.min() == -1 and simple.max() == 1  # the ends are exact
    net = normalize(u8[None], "imagenet")[0]
    for c in range(3):
        want = [(v / 255 - IMAGENET_MEAN[c]) / (2 * IMAGENET_STD[c]) for v in (0, 128, 255)]
        torch.testing.assert_close(net[c, 0], torch.tensor(want))
    torch.testing.assert_close(net[0, 0, 0], torch.tensor(-0.485 / 0.458))  # by hand
    with pytest.raises(ValueError):
        normalize(u8.float(), "simple")
    with pytest.raises(ValueError):
        normalize(u8, "other")


# ---------------------------------------------------------------------------------------
# Determinism, resume, sharding, views


def test_plan_slots_replacements_and_generators(tree):
    """The plan's slots are this rank's slice of the epoch permutation; an unreadable image is
    replaced by the next one of the permutation (hop 1, its own generator) and tried once per
    verdict cache; the plan survives pickling (DataLoader workers get copies)."""
    plan = BatchPlan(scan_image_folder(tree), global_batch=8, rank=1, world_size=2, seed=5)
    perm = plan.permutation(1)
    assert sorted(perm.tolist()) == list(range(20)) and not np.array_equal(perm, plan.permutation(0))
    assert list(itertools.islice(plan.keys((0, 1)), 3)) == [(0, 1), (1, 0), (1, 1)]  # 2 steps per epoch
    planned = [int(i) for i in perm[8 + 4 : 8 + 8]]  # batch 1, rank 1's half
    broken, reads = planned[1], []

    def read(i, rng):
        reads.append(i)
        if i == broken:
            raise OSError("cut short")
        return f"image {i}"

    verdicts, skipped = {}, []
    got = list(plan.samples(1, 1, read, verdicts, skipped))
    assert [s.index for s in got] == [planned[0], planned[2], planned[2], planned[3]]
    assert [s.hop for s in got] == [0, 1, 0, 0] and got[1].item == f"image {planned[2]}"
    assert got[1].rng.random() != got[2].rng.random()  # the duplicate draws other augmentations
    assert verdicts == {broken: "OSError: cut short"} and skipped == [(plan.index.path(broken), "OSError: cut short")]
    list(plan.samples(1, 1, read, verdicts, []))
    assert reads.count(broken) == 1  # the verdict is kept
    again = pickle.loads(pickle.dumps(plan))
    assert [(s.index, s.hop, s.rng.random()) for s in again.samples(1, 1, read, verdicts, [])] == [
        (s.index, s.hop, np.random.default_rng([5, 1, s.index, s.hop]).random()) for s in got]

    def unreadable(i, rng):
        raise OSError("nope")

    with pytest.raises(DataError, match="8 files in a row failed to decode .* OSError: nope"):
        list(plan.samples(0, 0, unreadable, {}, []))


def test_deterministic_across_workers_and_resumable(tree):
    k = 5  # 20 images / G=4: 5 steps per epoch, so 2k batches cross an epoch
    full = take(loader_for(tree, seed=3), 2 * k)
    assert not torch.equal(full[0]["x"], full[k]["x"])  # epochs are reshuffled
    for workers in (0, 2):
        first = loader_for(tree, seed=3, workers=workers)
        head = take(first, k)
        state = first.state_dict()
        assert state["epoch"] == 1 and state["batch"] == 0
        second = loader_for(tree, seed=3, workers=workers)
        second.load_state_dict(state)
        assert_same(head + take(second, k), full)
    mid = loader_for(tree, seed=3, workers=2)
    mid.load_state_dict({"epoch": 0, "batch": 3})
    assert_same(take(mid, 4), full[3:7])
    assert not torch.equal(take(loader_for(tree, seed=4), 1)[0]["y1"], full[0]["y1"])


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_a_new_iterator_retires_the_old_one(tree, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e .[dali])")
    full = take(loader_for(tree, seed=3, loader=kind), 3)
    for workers in (0, 2) if kind == "torch" else (1,):
        loader = loader_for(tree, seed=3, workers=workers, loader=kind)
        old = iter(loader)
        assert_same([next(old)], full[:1])
        new = iter(loader)  # continues from the position after the batches handed out
        with pytest.raises(RuntimeError, match="retired"):
            next(old)
        assert_same([next(new), next(new)], full[1:3])


def test_ranks_split_the_global_batch(tree):
    whole = take(loader_for(tree, batch=8, seed=1), 2)
    parts = [take(loader_for(tree, batch=8, seed=1, rank=r, world=2), 2) for r in (0, 1)]
    for step in range(2):
        a, b = parts[0][step], parts[1][step]
        assert a["x"].shape[0] == 4
        for key in whole[step]:
            assert torch.equal(torch.cat([a[key], b[key]]), whole[step][key])
        assert not any(torch.equal(u, v) for u in a["x"] for v in b["x"])  # disjoint images


def test_x_alone_is_the_same_x_and_label(tree):
    pre = take(loader_for(tree, seed=2), 2)
    got = take(loader_for(tree, views=("x",), seed=2), 2)
    for b, p in zip(got, pre):
        assert b.keys() == {"x", "label"}
        assert torch.equal(b["x"], p["x"]) and torch.equal(b["label"], p["label"])


def test_unknown_views_are_refused(tree):
    for bad in (("y1",), ("x", "y1"), ("x", "y2", "y1")):
        with pytest.raises(ValueError, match="unknown views"):
            loader_for(tree, views=bad)


# ---------------------------------------------------------------------------------------
# Pre-cropped tree and demo data


def test_precrop_writes_the_center_crop_tree(tmp_path):
    src = make_tree(tmp_path / "src", {"a": 3, "b": 0, "c": 2})
    (src / "c" / "broken.jpg").write_text("x")
    total, failures = precrop(str(src), str(tmp_path / "dst"), R, workers=1)
    assert total == 6 and len(failures) == 1 and "broken.jpg" in failures[0]
    dst = scan_image_folder(tmp_path / "dst")
    assert dst.classes == ["a", "b", "c"] and dst.labels.tolist() == [0, 0, 0, 2, 2]
    with Image.open(dst.path(0)) as out:
        assert out.size == (R, R) and out.format == "PNG"
        written = np.array(out)
    assert np.array_equal(written, np.array(views.center_crop(load_image(str(src / "a" / "0.png")), R)))
    mtime = os.stat(dst.path(0)).st_mtime_ns
    precrop(str(src), str(tmp_path / "dst"), R, workers=1)  # a re-run keeps finished files
    assert os.stat(dst.path(0)).st_mtime_ns == mtime


def test_demo_data(demo_root, monkeypatch):
    index = scan_image_folder(demo_root)
    assert len(index.classes) == 8 and len(index) == 400
    assert np.bincount(index.labels).tolist() == [50] * 8
    sizes = []
    for i in range(0, 400, 7):
        with Image.open(index.path(i)) as img:
            sizes.append(img.size)
    shorts, aspects = [min(s) for s in sizes], [w / h for w, h in sizes]
    assert min(shorts) < 60 and max(shorts) > 140
    assert min(aspects) < 0.8 and max(aspects) > 1.4
    marker = (demo_root / MARKER).stat().st_mtime_ns
    assert ensure_demo_data(demo_root) == demo_root
    assert (demo_root / MARKER).stat().st_mtime_ns == marker  # re-run is a no-op
    monkeypatch.setenv("EPG_CACHE_DIR", str(demo_root.parent))
    loader = build_loader(DataConfig(root=None, workers=0), image_size=R, views=ALL,
                          global_batch=32, seed=0)
    assert (loader.num_images, loader.num_classes, loader.steps_per_epoch) == (400, 8, 12)


def test_demo_data_concurrent_writers_and_determinism(tmp_path, demo_root):
    root = tmp_path / "demo"
    results, errors = [], []

    def call():
        try:
            results.append(ensure_demo_data(root))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [root, root]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp folder left
    for rel in ("0_discs/discs_000.jpg", "7_crosses/crosses_049.jpg"):
        assert (root / rel).read_bytes() == (demo_root / rel).read_bytes()


def test_incomplete_demo_folder_is_refused(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "stray.txt").write_text("x")
    with pytest.raises(DataError, match="--force"):
        ensure_demo_data(tmp_path / "demo")
    assert ensure_demo_data(tmp_path / "demo", force=True) == tmp_path / "demo"
    assert (tmp_path / "demo" / MARKER).is_file() and not (tmp_path / "demo" / "stray.txt").exists()


# ---------------------------------------------------------------------------------------
# The validated, cached file index


def test_index_validates_headers(tmp_path, caplog):
    make_tree(tmp_path, {"a": 3, "b": 2})
    (tmp_path / "b" / "fake.png").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="epg_fast.data"):
        index = scan_image_folder(tmp_path)
    assert len(index) == 5 and "b/fake.png" not in [index.relpath(i) for i in range(len(index))]
    assert any("excluded 1 files" in r.getMessage() and "fake.png" in r.getMessage() for r in caplog.records)


def test_index_cache_is_reused_until_the_tree_changes(tmp_path, monkeypatch):
    from epg_fast.data import index as index_module

    make_tree(tmp_path, {"a": 3, "b": 2})
    calls = []
    real = index_module._header
    monkeypatch.setattr(index_module, "_header", lambda p: calls.append(p) or real(p))
    first = scan_image_folder(tmp_path, cache="auto")
    assert len(calls) == 5 and (tmp_path / ".epg_index.npz").is_file()
    again = scan_image_folder(tmp_path, cache="auto")
    assert len(calls) == 5  # no file was opened again
    assert [again.relpath(i) for i in range(len(again))] == [first.relpath(i) for i in range(len(first))]
    assert np.array_equal(again.labels, first.labels)
    noise(np.random.default_rng(9), 12, 12).save(tmp_path / "b" / "new.png")  # the tree changes
    changed = scan_image_folder(tmp_path, cache="auto")
    assert len(changed) == 6 and len(calls) == 11


def test_index_cache_of_read_only_data_goes_to_the_cache_folder(tmp_path, monkeypatch):
    from epg_fast.data.index import cache_path

    data = make_tree(tmp_path / "data", {"a": 2})
    monkeypatch.setenv("EPG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a read-only mount
    where = cache_path(str(data), "auto")
    assert where.startswith(str(tmp_path / "cache" / "index"))
    scan_image_folder(data, cache="auto")
    assert os.path.isfile(where) and not (data / ".epg_index.npz").exists()
    assert cache_path(str(data), "none") is None

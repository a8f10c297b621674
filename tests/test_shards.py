"""Raw shards (data.shards) and `precrop --format`: written, read back without decoding,
resumed, and damaged shards reported as unreadable images."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from data_helpers import noise
from photo_helpers import unpack_imagenette

from epg_fast.data import precrop, shards, views
from epg_fast.data.index import DataError, scan_image_folder


@pytest.fixture()
def tree(tmp_path):
    """Two classes of noise images of mixed sizes, plus one corrupt file."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(7):
            noise(rng, int(rng.integers(20, 60)), int(rng.integers(20, 60))).save(tmp_path / "src" / c / f"{i}.png")
    (tmp_path / "src" / "b" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return tmp_path


def test_raw_shards_hold_the_center_crops(tree):
    dst = str(tree / "raw")
    precrop.main([str(tree / "src"), dst, "--size", "16", "--format", "raw", "--per-shard", "4", "--workers", "1"])
    raw = shards.RawShards(dst)
    src = scan_image_folder(str(tree / "src"), validate=False)
    assert len(raw) == len(src) - 1 and raw.size == 16 and raw.classes == ["a", "b"]
    assert sorted(os.listdir(dst)).count("index.npz") == 1 and len([f for f in os.listdir(dst) if f.endswith(".npy")]) == 4
    by_rel = {src.relpath(i): i for i in range(len(src))}
    for i in range(len(raw)):
        j = by_rel[raw.relpath(i)]
        assert raw.labels[i] == src.labels[j]
        expected = np.asarray(views.center_crop(views.load_image(src.path(j)), 16))
        img = raw.image(i)
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and isinstance(img.base, np.memmap)
        assert np.array_equal(img, expected)
    assert "bad.jpg" not in {raw.relpath(i) for i in range(len(raw))}


def test_raw_shards_resume_and_report_failures(tree, caplog):
    dst = tree / "raw"
    total, failures = precrop.precrop(str(tree / "src"), str(dst), 16, 1, "raw", per_shard=4)
    assert total == 15 and len(failures) == 1 and "bad.jpg" in failures[0]
    first = (dst / "shard-00000.npy").stat().st_mtime_ns
    total, failures = precrop.precrop(str(tree / "src"), str(dst), 16, 1, "raw", per_shard=4)
    assert len(failures) == 1 and (dst / "shard-00000.npy").stat().st_mtime_ns == first  # kept
    with pytest.raises(DataError, match="size 16, not 8"):
        precrop.precrop(str(tree / "src"), str(dst), 8, 1, "raw", per_shard=4)


def test_damaged_shards_raise_shard_error_for_their_images_only(tree):
    dst = tree / "raw"
    precrop.precrop(str(tree / "src"), str(dst), 16, 1, "raw", per_shard=4)
    data = (dst / "shard-00001.npy").read_bytes()
    (dst / "shard-00001.npy").write_bytes(data[: len(data) // 2])  # cut short
    (dst / "shard-00002.npy").unlink()
    raw = shards.RawShards(str(dst))
    kinds = []
    for i in range(len(raw)):
        try:
            raw.image(i)
            kinds.append("ok")
        except shards.ShardError as e:  # an OSError: the loaders' skip-and-count catches it
            assert isinstance(e, OSError)
            kinds.append("short" if "short" in str(e) else "missing" if "missing" in str(e) else str(e))
    locations = [int(raw._locations[i][0]) for i in range(len(raw))]
    assert kinds == ["short" if k == 1 else "missing" if k == 2 else "ok" for k in locations]
    assert "shard-00001.npy[" in raw.path(locations.index(1))


def test_raw_shards_reject_a_foreign_folder(tmp_path):
    with pytest.raises(DataError, match="not a raw-shard folder"):
        shards.RawShards(str(tmp_path))
    (tmp_path / "index.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="unreadable"):
        shards.RawShards(str(tmp_path))


@pytest.mark.parametrize("fmt,ext", [("png", ".png"), ("jpeg", ".jpg")])
def test_precrop_file_formats(tree, fmt, ext):
    dst = tree / fmt
    precrop.main([str(tree / "src"), str(dst), "--size", "16", "--format", fmt, "--workers", "1"])
    files = sorted(p for p in dst.rglob("*") if p.is_file())
    assert len(files) == 14 and all(p.suffix == ext for p in files)
    assert all(Image.open(p).size == (16, 16) for p in files)
    if fmt == "png":  # lossless: the raw crop exactly
        src = tree / "src" / "a" / "0.png"
        assert np.array_equal(np.asarray(Image.open(dst / "a" / "0.png")),
                              np.asarray(views.center_crop(views.load_image(str(src)), 16)))


def test_raw_shards_of_photographs(tmp_path):
    src = unpack_imagenette(tmp_path, every=300)
    total, failures = precrop.precrop(str(src), str(tmp_path / "raw"), 64, 1, "raw", per_shard=8)
    raw = shards.RawShards(str(tmp_path / "raw"))
    assert len(raw) == total and not failures
    assert raw.image(len(raw) - 1).std() > 10  # real pixels, not zeros

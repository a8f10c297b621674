"""The torch loader's paths (data.augment=pil|device, data.decode_draft, data.format=folder|raw):
the same batches bit for bit where the building blocks are exact, the same decisions where
they are not (reduced decoding), resume, bad files and shards skipped and counted, and the
combinations that are refused."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from data_helpers import assert_same, noise, take

from epg_fast.config import ConfigError, DataConfig
from epg_fast.data import DataError, build_loader, ensure_demo_data
from epg_fast.data.precrop import precrop

R = 32
ALL = ("x", "y1", "y2")
CPU = torch.device("cpu")


def loader_for(root, views=ALL, batch=16, size=R, **kw):
    cfg = DataConfig(root=None if root is None else str(root), workers=kw.pop("workers", 0), prefetch=2, **kw)
    return build_loader(cfg, image_size=size, views=views, global_batch=batch, seed=3)


def finished(loader, n: int, start: dict | None = None) -> list[dict[str, torch.Tensor]]:
    """n batches as the trainer sees them (after ImageLoader.to_device), from `start`."""
    if start is not None:
        loader.load_state_dict(start)
    return [loader.to_device(b, CPU) for b in take(loader, n)]


@pytest.fixture(scope="module")
def demo():
    return ensure_demo_data()


@pytest.fixture(scope="module")
def demo_crops(demo, tmp_path_factory):
    """The demo data's center crops at R, as raw shards and as a PNG tree (the same pixels)."""
    root = tmp_path_factory.mktemp("crops")
    precrop(str(demo), str(root / "raw"), R, 1, "raw", per_shard=64)
    precrop(str(demo), str(root / "png"), R, 1, "png")
    return root


@pytest.mark.parametrize("views", [ALL, ("x",)])
def test_device_augment_is_the_pil_path_bit_for_bit(demo, views):
    """Workers crop and hand the decisions along, the device augments: the trainer gets the
    PIL path's batches exactly (pre-training and fine-tuning views), with any worker count."""
    pil = finished(loader_for(demo, views), 4)
    device = loader_for(demo, views, augment="device")
    raw = next(iter(device))
    assert raw.keys() == {*views, "label", "x_flip", *(("y1_params", "y2_params") if len(views) > 1 else ())}
    assert torch.equal(raw["x"], torch.where(raw["x_flip"].view(-1, 1, 1, 1), pil[0]["x"].flip(-1), pil[0]["x"]))
    assert 0 < int(raw["x_flip"].sum()) < 16  # flips drawn, applied on the device
    assert_same(pil, finished(device, 4, {"epoch": 0, "batch": 0}))
    assert_same(pil, finished(loader_for(demo, views, augment="device", workers=1), 4))


def test_device_augment_resumes_bit_exact(demo):
    """The device path draws from the plan's (seed, epoch, index, hop) keys: a resumed loader
    continues with the batches an uninterrupted one gives (across the epoch boundary)."""
    steps = loader_for(demo, batch=64).steps_per_epoch  # 6 steps of 64 per epoch
    straight = finished(loader_for(demo, batch=64, augment="device"), steps + 2)
    loader = loader_for(demo, batch=64, augment="device")
    take(loader, 2)
    state = loader.state_dict()
    resumed = loader_for(demo, batch=64, augment="device")
    assert state["batch"] == 2
    assert_same(straight[-steps:], finished(resumed, steps, state))


def test_reduced_decoding_keeps_the_decisions(demo):
    """With data.decode_draft the same decisions reach the device; the pixels differ by the
    resampling from a DCT-reduced decode (on the demo data's sharp synthetic patterns at
    R=16, where every file is reduced: ~31-33 dB per batch and view; x lowest, since PIL's
    full-size path box-halves before the bicubic resize)."""
    full = loader_for(demo, size=16, augment="device")
    small = loader_for(demo, size=16, augment="device", decode_draft=True)
    for a, b in zip(take(full, 2), take(small, 2)):
        assert torch.equal(a["x_flip"], b["x_flip"]) and torch.equal(a["label"], b["label"])
        for view in ("y1_params", "y2_params"):
            assert_same([a[view]], [b[view]])
        a, b = full.to_device(a, CPU), small.to_device(b, CPU)
        for k in ALL:
            mse = (a[k].double() - b[k].double()).pow(2).mean().item()
            assert 0 < mse and 10 * math.log10(255**2 / mse) > 28, k


@pytest.mark.parametrize("views", [ALL, ("x",)])
def test_raw_shards_give_the_precropped_trees_batches(demo_crops, views):
    """data.format=raw reads the shards without decoding; its batches are those of the same
    crops as a PNG tree (data.precropped=true), with the PIL path or the device path (which
    also cuts the y crops from x on the device)."""
    reference = finished(loader_for(demo_crops / "png", views, precropped=True), 3)
    assert_same(reference, finished(loader_for(demo_crops / "raw", views, format="raw"), 3))
    device = loader_for(demo_crops / "raw", views, format="raw", augment="device")
    assert "y1" not in next(iter(device))  # the worker copies x only
    assert_same(reference, finished(device, 3, {"epoch": 0, "batch": 0}))


def test_refused_combinations(demo, demo_crops):
    with pytest.raises(DataError, match="is a raw-shard folder .* data.format=raw"):
        loader_for(demo_crops / "raw")
    with pytest.raises(DataError, match="holds 32x32 crops, the model takes 16"):
        loader_for(demo_crops / "raw", format="raw", size=16)
    with pytest.raises(DataError, match="not a raw-shard folder"):
        loader_for(demo, format="raw")
    with pytest.raises(ConfigError, match="decode_draft=true needs data.augment=device"):
        loader_for(demo, decode_draft=True)
    with pytest.raises(ConfigError, match="does not apply to data.format=raw"):
        loader_for(demo_crops / "raw", format="raw", augment="device", decode_draft=True)
    with pytest.raises(ConfigError, match="data.loader=dali runs data.format=folder with data.augment=pil only"):
        loader_for(demo, loader="dali", augment="device")


@pytest.fixture()
def damaged(tmp_path):
    """20 JPEGs (60-120 px: reduced decoding applies at R=16) and one cut short, and the
    same images as raw shards of 4 with one shard cut short."""
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(10):
            noise(rng, int(rng.integers(60, 120)), int(rng.integers(60, 120))).save(tmp_path / "src" / c / f"{i}.jpg")
    half = tmp_path / "src" / "b" / "half.jpg"
    noise(rng, 90, 90).save(half)
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])  # a good header, cut data
    precrop(str(tmp_path / "src"), str(tmp_path / "raw"), 16, 1, "raw", per_shard=4)
    shard = tmp_path / "raw" / "shard-00002.npy"
    shard.write_bytes(shard.read_bytes()[:1000])
    return tmp_path


@pytest.mark.parametrize("fmt,augment,draft", [
    ("folder", "pil", False), ("folder", "device", False), ("folder", "device", True),
    ("raw", "pil", False), ("raw", "device", False),
])
def test_bad_files_and_shards_are_skipped_and_counted(damaged, caplog, fmt, augment, draft):
    root = damaged / ("src" if fmt == "folder" else "raw")
    with caplog.at_level(logging.WARNING, logger="epg_fast.data"):
        loader = loader_for(root, batch=4, size=16, format=fmt, augment=augment, decode_draft=draft)
        batches = [loader.to_device(b, CPU) for b in take(loader, 2 * loader.steps_per_epoch)]  # two epochs
    assert all(b["x"].shape == (4, 3, 16, 16) and b["y2"].shape == (4, 3, 16, 16) for b in batches)
    # The cut JPEG; raw: the 4 images of the damaged shard (precrop wrote the cut JPEG's failure
    # into the shard list, not the index).
    assert loader.skipped == (1 if fmt == "folder" else 4)
    first = next(r.getMessage() for r in caplog.records if "skipped unreadable image" in r.getMessage())
    assert ("half.jpg" in first) if fmt == "folder" else ("shard-00002.npy[" in first and "short" in first)

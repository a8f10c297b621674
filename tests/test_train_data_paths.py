"""The trainer with each loader path and data format (data.augment=pil|device,
data.decode_draft, data.format=folder|raw): a few steps each, the same losses where the
batches are bit-identical, and a bit-exact resume on the device-augment path."""

from __future__ import annotations

import pytest

from test_train import assert_same_training_state, env, final_state, losses, run, train_cmd  # noqa: F401 (env: fixture)

from epg_fast.data import ensure_demo_data
from epg_fast.data.precrop import precrop

STEPS = ("train.total_steps=3", "log.every=1", "train.save_every=100")


@pytest.fixture(scope="module")
def raw_demo(env, tmp_path_factory):  # noqa: F811
    """The demo data's center crops at the tiny model's R=16 as raw shards."""
    dst = tmp_path_factory.mktemp("raw") / "demo16"
    precrop(str(ensure_demo_data()), str(dst), 16, 1, "raw", per_shard=100)
    return dst


@pytest.fixture(scope="module")
def pil_run(env, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("pil")
    run(train_cmd(run_dir, *STEPS), env)
    return run_dir


def test_device_augment_trains_as_the_pil_path(env, pil_run, tmp_path):  # noqa: F811
    run(train_cmd(tmp_path, *STEPS, "data.augment=device"), env)
    assert "augment: device; the loader decodes and crops" in (tmp_path / "train.log").read_text()
    assert losses(tmp_path) == losses(pil_run)  # bit-identical batches, identical losses
    assert_same_training_state(final_state(pil_run, 3), final_state(tmp_path, 3))


def test_reduced_decoding_trains_near_the_full_decode(env, pil_run, tmp_path):  # noqa: F811
    """Same decisions, views within the resampling difference (~31-33 dB at R=16 on the demo
    data, tests/test_loader_paths.py): the losses move by a fraction of a percent."""
    run(train_cmd(tmp_path, *STEPS, "data.augment=device", "data.decode_draft=true"), env)
    assert "augment: device; the loader decodes small and crops" in (tmp_path / "train.log").read_text()
    got, ref = losses(tmp_path), losses(pil_run)
    assert got != ref and got == pytest.approx(ref, rel=0.02)


def test_raw_shards_train_with_either_augment_path(env, raw_demo, tmp_path):  # noqa: F811
    for augment in ("pil", "device"):
        run(train_cmd(tmp_path / augment, *STEPS, f"data.root={raw_demo}", "data.format=raw",
                      f"data.augment={augment}"), env)
        assert "raw shards; augment:" in (tmp_path / augment / "train.log").read_text()
    assert losses(tmp_path / "pil") == losses(tmp_path / "device")
    assert_same_training_state(final_state(tmp_path / "pil", 3), final_state(tmp_path / "device", 3))


@pytest.mark.parametrize("fmt", ["folder", "raw"])
def test_device_augment_resume_is_bit_exact(env, raw_demo, tmp_path, fmt):  # noqa: F811
    """Stop at step 3, resume to 6: the state equals an uninterrupted 6-step run's."""
    data = ["data.augment=device"] + ([f"data.root={raw_demo}", "data.format=raw"] if fmt == "raw" else [])
    total = ("train.total_steps=6", "train.save_every=100")
    run(train_cmd(tmp_path / "straight", *total, *data), env)
    run(train_cmd(tmp_path / "resumed", *total, "train.stop_after=3", *data), env)
    proc = run(train_cmd(tmp_path / "resumed", *total, *data), env)
    assert "resumed from" in proc.stderr and "at step 3" in proc.stderr
    assert_same_training_state(final_state(tmp_path / "straight", 6), final_state(tmp_path / "resumed", 6))

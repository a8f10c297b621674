"""The whole method on CPU, as subprocesses: pre-train -> fine-tune (denoise and consistency)
from that checkpoint -> sample with Heun + guidance and one-step -> grid and ADM-style npz."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from epg_fast import schedule
from epg_fast.sample import DEFAULT_INTERVAL, sampling_levels

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "epg_fast" / "train.py")
ARCH = ["model.depth=2", "model.dim=32", "model.heads=2", "model.image_size=16", "model.patch_size=4",
        "train.global_batch=8", "data.workers=0", "log.every=5", "optim.warmup_steps=3"]
FINETUNE = ARCH + ["model.decoder_dim=48", "model.decoder_heads=2", "model.num_classes=8", "train.sample_every=0"]


def run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return proc


def expected_nfe(sampler: str, steps: int, guidance: float, image_size: int) -> int:
    """Network evaluations per image the levels imply: one per level visited (Heun: also at
    each next level but 0), two where the default guidance interval applies."""
    s = schedule.resolution_shift(image_size)
    lo, hi = (bound * s for bound in DEFAULT_INTERVAL)
    cost = lambda t: 2 if guidance != 1 and lo < t <= hi else 1  # noqa: E731
    levels = sampling_levels(steps, image_size)
    if sampler == "onestep":
        return cost(levels[0])
    return sum(cost(t) + (cost(t_next) if t_next > 0 else 0) for t, t_next in zip(levels, levels[1:]))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, DS_ACCELERATOR="cpu", EPG_CACHE_DIR=str(tmp_path_factory.mktemp("cache")), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(key, None)
    return e


@pytest.fixture(scope="module")
def pretrained(env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain")
    run([sys.executable, TRAIN, "--stage", "pretrain", *ARCH, "model.proj_hidden=64", "model.proj_dim=16",
         "train.total_steps=10", f"train.run_dir={run_dir}"], env)
    return run_dir / "checkpoints" / "step_00000010"


@pytest.mark.parametrize("stage,sampler,steps,guidance,extra", [
    ("denoise", "heun", 8, 2.0, []),
    # the reference's consistency setup: model dropout and the perceptual term
    ("consistency", "onestep", 1, 1.0, ["model.dropout=0.5", "consistency.perceptual_weight=1.0"]),
])
def test_finetune_then_sample(env, pretrained, tmp_path, stage, sampler, steps, guidance, extra):
    run_dir = tmp_path / stage
    proc = run([sys.executable, TRAIN, "--stage", stage, *FINETUNE, "train.total_steps=10", *extra,
                f"init.encoder={pretrained}", f"train.run_dir={run_dir}", "consistency.round_steps=5"], env)
    assert f"encoder initialised from {pretrained}" in proc.stderr and "missing keys: none" in proc.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
    if "consistency.perceptual_weight=1.0" in extra:
        assert rows[-1]["perceptual"] > 0  # ECT round 1 at step 10: the term is on
    out = tmp_path / "samples"
    proc = run([sys.executable, "-m", "epg_fast.sample", str(run_dir), "--out", str(out), "--sampler", sampler,
                "--steps", str(steps), "--guidance", str(guidance), "--num", "16", "--batch-size", "8"], env)
    with np.load(out / "samples_16x16x16x3.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.shape == (16, 16, 16, 3) and images.dtype == np.uint8 and labels.shape == (16,)
    assert images.std() > 0  # not a blank canvas
    assert (out / "grid.png").is_file()
    assert f"NFE per image: {expected_nfe(sampler, steps, guidance, image_size=16)} ({sampler}" in proc.stdout, proc.stdout


def test_init_encoder_must_be_a_pretraining_checkpoint(env, pretrained, tmp_path):
    first = tmp_path / "denoise"
    run([sys.executable, TRAIN, "--stage", "denoise", *FINETUNE, "train.total_steps=2", f"init.encoder={pretrained}",
         f"train.run_dir={first}"], env)
    wrong = first / "checkpoints" / "step_00000002"
    proc = subprocess.run([sys.executable, TRAIN, "--stage", "denoise", *FINETUNE, f"init.encoder={wrong}",
                           f"train.run_dir={tmp_path / 'again'}"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is a 'denoise' checkpoint, not a pre-training one" in proc.stderr


def test_convert_a_checkpoint_folder(env, pretrained, tmp_path):
    """The converter reads our checkpoint folders through epg_fast.checkpoint: the shadow
    (here the EMA target) by default, the online weights with --weights model."""
    import torch

    from epg_fast.checkpoint import read_checkpoint

    saved = read_checkpoint(pretrained)
    for weights, expected in (("ema", saved.shadow), ("model", saved.weights)):
        out = tmp_path / f"{weights}.pth"
        run([sys.executable, "-m", "epg_fast.convert", str(pretrained), str(out), "--to", "reference",
             "--weights", weights], env)
        converted = torch.load(out)
        assert converted.keys() == {k.removeprefix("encoder."): None for k in expected}.keys()
        assert all(torch.equal(converted[k.removeprefix("encoder.")], v) for k, v in expected.items())

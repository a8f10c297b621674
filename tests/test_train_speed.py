"""Issue 13, the trainer's speed options on CPU: data.source=synthetic, train.compile (the same
losses as eager, no graph breaks), optim.impl and the MFU peak in the start-up block."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epg_fast.config import DataConfig
from epg_fast.data import build_loader

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "epg_fast" / "train.py")
TINY = ["model.depth=2", "model.dim=32", "model.heads=2", "model.image_size=16", "model.patch_size=4",
        "model.proj_hidden=64", "model.proj_dim=16", "train.global_batch=8", "log.every=1", "optim.warmup_steps=3",
        "data.source=synthetic", "train.total_steps=4", "train.save_every=100", "train.resume=none"]


def test_synthetic_loader_batches_are_a_function_of_seed_step_and_rank():
    cfg = DataConfig(source="synthetic", root="/nonexistent")  # no disk is read
    make = lambda rank: build_loader(cfg, image_size=16, views=("x", "y1", "y2"), global_batch=8, rank=rank,
                                     world_size=2, seed=3, num_classes=10)
    a, b, other_rank = make(0), make(0), make(1)
    it = iter(a)
    batches = [next(it) for _ in range(4)]
    assert set(batches[0]) == {"x", "y1", "y2", "label"}
    assert batches[0]["x"].shape == (4, 3, 16, 16) and batches[0]["x"].dtype == torch.uint8
    assert batches[0]["label"].dtype == torch.int64 and int(batches[0]["label"].max()) < 10
    assert a.state_dict()["batch"] == 4 and a.num_classes == 10 and a.steps_per_epoch > 0 and a.skipped == 0
    b.load_state_dict({"epoch": 0, "batch": 2})  # resume: the same batch as the straight run's third
    resumed = next(iter(b))
    assert all(torch.equal(resumed[k], batches[2][k]) for k in resumed)
    assert not all(torch.equal(batches[0][k], batches[1][k]) for k in ("x", "label"))  # steps differ
    assert not torch.equal(next(iter(other_rank))["x"], batches[0]["x"])  # so do ranks


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, DS_ACCELERATOR="cpu", EPG_CACHE_DIR=str(tmp_path_factory.mktemp("cache")), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        e.pop(key, None)
    return e


def train(run_dir: Path, env: dict, *overrides: str) -> tuple[list[dict], str]:
    cmd = [sys.executable, TRAIN, "--stage", "pretrain", *TINY, f"train.run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, (run_dir / "train.log").read_text()


def test_compiled_trainer_matches_eager_without_graph_breaks(env, tmp_path):
    eager, eager_log = train(tmp_path / "eager", env)
    compiled, log = train(tmp_path / "compiled", env, "train.compile=true", "train.compile_backend=aot_eager")
    assert "compile off" in eager_log and "compile aot_eager" in log
    assert "optim.impl=torch: torch.optim.adamw.AdamW (foreach)" in log
    assert "MFU peak     none on CPU" in log
    assert "data: synthetic" in log and "source: synthetic" in log
    assert "graph breaks: 0" in log, [line for line in log.splitlines() if "compile" in line]
    assert [r["step"] for r in compiled] == [1, 2, 3, 4]
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)

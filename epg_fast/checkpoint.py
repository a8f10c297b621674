"""Checkpoints: atomic, complete, resumable.

Layout under <run_dir>/checkpoints/:
    step_00000100/                  one completed checkpoint
        mp_rank_00_model_states.pt  DeepSpeed: online weights + our client state
        *optim_states.pt            DeepSpeed: optimiser (ZeRO shards, one per rank)
        rank_00000.pt               per-rank RNG states
        COMPLETE                    written last: {"step": 100}
    step_00000200.tmp/              a save in progress (or killed mid-write): never loaded

A save writes everything into `<name>.tmp`, fsyncs it, writes COMPLETE, then renames the
folder into place. Whatever kills the process mid-save, the previous completed checkpoint
is untouched and `latest()` does not see the partial one. Multi-node runs need run_dir on a
filesystem shared by all nodes (rank 0 does the rename).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("epg_fast")
_NAME = re.compile(r"^step_(\d{8})$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpoints:
    def __init__(self, run_dir: str | Path, keep_last: int, rank: int) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank = keep_last, rank

    def completed(self) -> list[Path]:
        """Completed checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if _NAME.match(p.name) and (p / "COMPLETE").is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.completed()
        return done[-1] if done else None

    def save(self, engine, step: int, client_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the completed checkpoint's path."""
        name = f"step_{step:08d}"
        tmp, final = self.dir / f"{name}.tmp", self.dir / name
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that was killed
            tmp.mkdir(parents=True)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=tmp.name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), tmp / f"rank_{self.rank:05d}.pt")
        _barrier()
        if self.rank == 0:
            (tmp / "COMPLETE").write_text(json.dumps({"step": step}))
            for p in sorted(tmp.rglob("*")) + [tmp]:
                _fsync(p)
            if final.exists():  # re-saving a step (e.g. a run restarted with resume=none)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.dir)
            for old in self.completed()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            for debris in self.dir.glob("*.tmp"):
                shutil.rmtree(debris, ignore_errors=True)
        _barrier()
        log.info("checkpoint saved: %s", final)
        return final

    def load(self, engine, path: Path) -> dict[str, Any]:
        """Restore engine (weights, optimiser, lr schedule) and this rank's RNG; returns the
        client state saved with it."""
        if not (path / "COMPLETE").is_file():
            raise FileNotFoundError(f"{path} is not a completed checkpoint (no COMPLETE marker)")
        loaded, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        rank_file = path / f"rank_{self.rank:05d}.pt"
        if rank_file.is_file():  # absent when resuming on a different number of ranks
            set_rng_state(torch.load(rank_file, weights_only=False))
        return client_state

"""Checkpoints: atomic, complete, resumable.

Layout under <run_dir>/checkpoints/:
    step_00000100/                  one completed checkpoint
        mp_rank_00_model_states.pt  DeepSpeed: online weights + our client state
        *optim_states.pt            DeepSpeed: optimiser (ZeRO shards, one per rank)
        rank_00000.pt               per-rank RNG states
        COMPLETE                    written last: {"step": 100, "run": "<run id>"}
    step_00000200.tmp/              a save in progress (or killed mid-write): never loaded

The model-states file holds the online weights ("module", DeepSpeed's name), the shadow
weights (pre-training's EMA target under "target", fine-tuning's EMA weights under "ema"),
the step, the loader state ("data") and the resolved config ("config"). `read_checkpoint`
reads it for whoever needs a saved model (the sampler, `init.encoder`, a probe); the
trainer resumes through `Checkpoints.load` (DeepSpeed: weights, optimiser, lr schedule).

A save writes everything into `<name>.tmp`, fsyncs it, writes COMPLETE, then renames the
folder into place. Whatever kills the process mid-save, the previous completed checkpoint
is untouched and `latest()` does not see the partial one. Multi-node runs need run_dir on a
filesystem shared by all nodes (rank 0 does the rename).

A run id (new at a fresh start, inherited from the checkpoint a run resumes) is written into
every COMPLETE: pruning (`keep_last`) removes only checkpoints of this run, and a run that
would not continue the checkpoints already in its directory is refused (`Checkpoints.claim`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("epg_fast")
_NAME = re.compile(r"^step_(\d{8})$")
MARKER = "COMPLETE"
STATES = "*mp_rank_00_model_states.pt"  # ZeRO-3 prefixes zero_pp_rank_0_
SHADOW_KEYS = ("target", "ema")  # where a stage keeps its shadow weights


class CheckpointError(ValueError):
    """A path that is not a readable completed checkpoint; the message is one line."""


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def run_of(folder: Path) -> str | None:
    """The run id in a checkpoint's COMPLETE (None: written before run ids, or unreadable)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker.get("run") if isinstance(marker, dict) else None


def completed(run_dir: str | Path) -> list[Path]:
    """The completed checkpoints of a run folder, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name) and is_complete(p)), key=lambda p: p.name)


def find_checkpoint(path: str | Path) -> Path:
    """A completed checkpoint folder as given, or the newest completed one of a run folder."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        done = completed(path)
        if not done:
            raise CheckpointError(f"{path} has no completed checkpoint in {path / 'checkpoints'}")
        return done[-1]
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a completed checkpoint folder (no {MARKER} marker)")
    return path


@dataclass
class Saved:
    """What a checkpoint holds for someone who is not resuming the run."""

    folder: Path
    file: Path  # the model-states file
    config: dict[str, Any]  # the resolved config of the run (Config.to_dict())
    step: int | None
    weights: Mapping[str, torch.Tensor]  # the online network's state dict
    shadow: Mapping[str, torch.Tensor] | None  # the shadow network's (target or EMA weights)

    @property
    def stage(self) -> str | None:
        return self.config.get("stage")


def read_checkpoint(path: str | Path) -> Saved:
    """The config, weights and shadow weights of a completed checkpoint folder (or of a run
    folder's newest). Raises CheckpointError (one line) for anything else."""
    folder = find_checkpoint(path)
    files = sorted(folder.glob(STATES))
    if not files:
        raise CheckpointError(f"{folder} has no {STATES}")
    # Our own trainer's file: it also pickles DeepSpeed's bookkeeping, hence weights_only=False.
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    config = state.get("config")
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{files[0]} has no 'config': not a checkpoint written by epg_fast.train")
    shadow = next((state[k] for k in SHADOW_KEYS if isinstance(state.get(k), Mapping)), None)
    return Saved(folder, files[0], dict(config), state.get("step"), state.get("module"), shadow)


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
        self.run: str | None = None  # set by claim()

    def claim(self, resume: Path | None) -> str:
        """This run's id: the resumed checkpoint's, or a new one. A run that would not continue
        the checkpoints already in the directory is refused (ConfigError, one line): they
        belong to another run, whose pruning and resumes would mix with this one's."""
        from epg_fast.config import ConfigError

        self.run = (run_of(resume) if resume is not None else None) or uuid.uuid4().hex[:12]
        ours = {self.run, run_of(resume) if resume is not None else self.run}  # a resumed pre-run-id checkpoint: None
        others = [p.name for p in self.completed() if run_of(p) not in ours]
        if others:
            what = "train.resume=none" if resume is None else f"train.resume={resume} (another run)"
            raise ConfigError(f"{what}, but {self.dir} holds checkpoints of another run ({', '.join(others[-3:])}); "
                              f"use another train.run_dir, or train.resume=auto to continue that run")
        return self.run

    def completed(self) -> list[Path]:
        """Completed checkpoints, oldest first."""
        return completed(self.dir.parent)

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
            (tmp / MARKER).write_text(json.dumps({"step": step, "run": self.run}))
            for p in sorted(tmp.rglob("*")) + [tmp]:
                _fsync(p)
            if final.exists():  # re-saving a step (e.g. a run restarted with resume=none)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.dir)
            own = [p for p in self.completed() if run_of(p) == self.run]
            for old in own[: -self.keep_last]:
                if old != final:  # resumed from an older checkpoint of the run: keep the new one
                    shutil.rmtree(old, ignore_errors=True)
            for debris in self.dir.glob("*.tmp"):
                shutil.rmtree(debris, ignore_errors=True)
        _barrier()
        log.info("checkpoint saved: %s", final)
        return final

    def load(self, engine, path: Path) -> dict[str, Any]:
        """Restore engine (weights, optimiser, lr schedule) and this rank's RNG; returns the
        client state saved with it."""
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is not a completed checkpoint (no {MARKER} marker)")
        loaded, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        rank_file = path / f"rank_{self.rank:05d}.pt"
        if rank_file.is_file():  # absent when resuming on a different number of ranks
            set_rng_state(torch.load(rank_file, weights_only=False))
        return client_state

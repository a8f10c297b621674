"""Checkpoints: atomic, complete, resumable.

Layout under <run_dir>/checkpoints/:
    step_00000100/                  one completed checkpoint
        mp_rank_00_model_states.pt  DeepSpeed: online weights + our client state
        *optim_states.pt            DeepSpeed: optimiser (ZeRO shards, one per rank)
        rank_00000.pt               per-rank RNG states (tensors and lists)
        COMPLETE                    written last: {"step": 100, "run": "<run id>",
                                    "files": {name: {"size", "sha256"}}}
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

A save that fails (a full disk, a
permission) removes its `.tmp` and raises CheckpointWriteError naming the cause.

Verified: COMPLETE records the size and SHA-256 of every file; a checkpoint is verified before
it is read (`verify`): `latest()` falls back, with a warning, to the newest one that verifies;
a checkpoint named explicitly that does not verify is a CheckpointError. Checkpoints written
before the checksums (COMPLETE without "files") load with a note.

Safe: every file is read with `torch.load(weights_only=True)` (`load_file`), DeepSpeed's own
reads included (`Checkpoints.load`); nothing in a checkpoint can run code when loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
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
    """A path that is not a readable, intact completed checkpoint; the message is one line."""


class CheckpointWriteError(OSError):
    """A save that failed (its .tmp removed, the previous checkpoint kept); one line."""


# What weights_only=True must also accept: the numpy RNG state of rank files written before
# they held tensors (numpy arrays of a plain dtype rebuild without running code).
_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
_reconstruct = getattr(getattr(np, "_core", np.core), "multiarray")._reconstruct


def _deepspeed_globals() -> list[type]:
    """The plain-data classes DeepSpeed 0.19 pickles into its ZeRO optimiser files (found with
    torch.serialization.get_unsafe_globals_in_checkpoint): loss-scaler settings, the ZeRO
    stage enum, fragment addresses. Rebuilding them sets attributes; nothing else runs."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_file(path: str | Path, map_location: Any = "cpu", allow: list[type] = ()) -> Any:
    """torch.load with weights_only=True: tensors, containers and numbers (and the `allow`
    classes) only; a pickle that would import or call anything else is refused. Raises
    CheckpointError (one line)."""
    try:
        with torch.serialization.safe_globals([*_NUMPY_GLOBALS, _reconstruct, *allow]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever a foreign file makes the unpickler raise
        raise CheckpointError(f"{path}: {_load_failure(err)}") from None


def _load_failure(err: BaseException) -> str:
    """One line for a failed torch.load, never suggesting weights_only=False."""
    text = str(err)
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    if "Unsupported global" in text or "Unsupported operand" in text or "weights_only" in text.lower():
        return "refused: it holds pickled Python objects other than tensors (it could run code when loaded)"
    if isinstance(err, pickle.UnpicklingError) and "load key" not in text:
        return f"refused by the weights-only loader: {text.strip().splitlines()[0]}"
    return "not a PyTorch checkpoint file (damaged, truncated, or another format)"


def _sha256(path: Path) -> str:
    digest, buf = hashlib.sha256(), bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(memoryview(buf)[:n])
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under `folder` (but COMPLETE), by relative path."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def verify(folder: Path) -> None:
    """Check every file of a completed checkpoint against COMPLETE; raises CheckpointError
    naming the file and what is wrong. A checkpoint without checksums passes with a note."""
    try:
        files = json.loads((folder / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{folder / MARKER} is unreadable ({err})") from None
    if files is None:
        log.info("note: %s was written before checkpoints carried checksums; loaded unverified", folder)
        return
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{path} is damaged: {size} bytes, {want['size']} when saved (truncated?)")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path} is damaged: its SHA-256 differs from the one saved in {MARKER}")


def newest_intact(candidates: list[Path]) -> Path | None:
    """The newest of `candidates` (oldest first) that verifies; each one skipped is a warning
    naming the file and the reason."""
    for folder in reversed(candidates):
        try:
            verify(folder)
            return folder
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s", folder.name, err)
    return None


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
    """A completed checkpoint folder as given (verified), or the newest completed one of a run
    folder that verifies (falling back past damaged ones with a warning)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        done = completed(path)
        if not done:
            raise CheckpointError(f"{path} has no completed checkpoint in {path / 'checkpoints'}")
        intact = newest_intact(done)
        if intact is None:
            raise CheckpointError(f"{path}: none of its {len(done)} completed checkpoints is intact")
        return intact
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a completed checkpoint folder (no {MARKER} marker)")
    verify(path)
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
    state = load_file(files[0])
    config = state.get("config") if isinstance(state, Mapping) else None
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{files[0]} has no 'config': not a checkpoint written by epg_fast.train")
    shadow = next((state[k] for k in SHADOW_KEYS if isinstance(state.get(k), Mapping)), None)
    return Saved(folder, files[0], dict(config), state.get("step"), state.get("module"), shadow)


def check_same_model(folder: Path, config: Mapping[str, Any]) -> None:
    """Refuse to resume a checkpoint of another stage or model shape (a one-line error naming
    the key, before DeepSpeed's size-mismatch tracebacks)."""
    saved = read_checkpoint(folder).config
    if saved.get("stage") != config["stage"]:
        raise CheckpointError(f"{folder} is a '{saved.get('stage')}' checkpoint, this run is '{config['stage']}' "
                              "(use another train.run_dir)")
    for key, value in config["model"].items():
        if key not in ("attention", "kernels", "dropout") and saved.get("model", {}).get(key, value) != value:
            raise CheckpointError(f"{folder} has model.{key}={saved['model'][key]}, this run model.{key}={value} "
                                  "(resume with the same model, or use another train.run_dir)")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """The RNG states as tensors, lists and numbers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _first_failure(message: str | None) -> str | None:
    """Collective: the first rank's failure message, or None when every rank succeeded (a
    rank whose write failed must not leave the others waiting at a barrier)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return message
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m), None)


def _on_rank0(rank: int, decide):
    """Collective: `decide()` runs on rank 0 (e.g. hashing a checkpoint once), every rank gets
    its result; a CheckpointError raised there is raised on every rank."""
    result: list[Any] = [None]
    if rank == 0:
        try:
            result[0] = decide()
        except CheckpointError as err:
            result[0] = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], CheckpointError):
        raise result[0]
    return result[0]


def _test_fault(step: int) -> None:
    """Test-only hooks (benchmarks/faults.py, tests): EPG_TEST_SAVE_DELAY=SECONDS sleeps inside
    every save, after its first file; EPG_TEST_SAVE_FAIL=STEP:ENOSPC fails the save of STEP
    with that OSError, as a full disk would."""
    if os.environ.get("EPG_TEST_SAVE_DELAY"):
        time.sleep(float(os.environ["EPG_TEST_SAVE_DELAY"]))
    at, _, name = os.environ.get("EPG_TEST_SAVE_FAIL", "").partition(":")
    if at and int(at) == step:
        code = getattr(errno, name)
        raise OSError(code, os.strerror(code))


def check_writable(run_dir: str | Path) -> None:
    """Refuse a run folder this process cannot write into, before any work (a probe file)."""
    folder = Path(run_dir)
    probe = folder / f".write_probe_{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise CheckpointWriteError(f"cannot write into {folder}: {_cause(err)}") from None


class Checkpoints:
    def __init__(self, run_dir: str | Path, keep_last: int, rank: int) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank = keep_last, rank
        self.verified: set[Path] = set()  # by latest(): load() need not hash them again
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
        """The newest completed checkpoint that verifies (collective: rank 0 hashes, all get
        its answer); a damaged newer one is skipped with a warning naming file and reason."""
        newest = _on_rank0(self.rank, lambda: newest_intact(self.completed()))
        self.verified.add(newest)
        return newest

    def _engine_io(self, engine, step: int):
        """DeepSpeed's file reads and writes, made ours for the duration of a save or load:
        writes through a Python file (a full disk is an OSError naming ENOSPC, not a torch
        RuntimeError), reads with weights_only=True."""
        ce = engine.checkpoint_engine
        zipfile = getattr(ce, "zipfile_serialization", True)
        allow = _deepspeed_globals() if "deepspeed" in type(engine).__module__ else []

        def save(state_dict, path: str) -> None:
            _write(state_dict, Path(path), step, zipfile)

        def load(path: str, map_location=None):
            return load_file(path, map_location, allow)

        return _Patched(ce, save=save, load=load)

    def save(self, engine, step: int, client_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the completed checkpoint's path. A failed
        write removes the .tmp, keeps every earlier checkpoint and raises CheckpointWriteError."""
        name = f"step_{step:08d}"
        tmp, final = self.dir / f"{name}.tmp", self.dir / name
        failure = None
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that was killed
            try:
                tmp.mkdir(parents=True)
            except OSError as err:
                failure = _describe(err, tmp)
        failure = _first_failure(failure)
        if failure is None:
            try:
                with self._engine_io(engine, step):
                    engine.save_checkpoint(str(self.dir), tag=tmp.name, client_state=client_state, save_latest=False)
                _write(rng_state(), tmp / f"rank_{self.rank:05d}.pt", step)
            except OSError as err:
                failure = _describe(err, tmp)
            failure = _first_failure(failure)
        if failure is None and self.rank == 0:
            try:
                (tmp / MARKER).write_text(json.dumps({"step": step, "run": self.run, "files": manifest(tmp)}))
                for p in sorted(tmp.rglob("*")) + [tmp]:
                    _fsync(p)
            except OSError as err:
                failure = _describe(err, tmp)
        failure = _first_failure(failure)
        if failure is not None:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = self.completed()
            raise CheckpointWriteError(
                f"checkpoint of step {step} not written: {failure}; "
                + (f"the previous checkpoint {kept[-1]} is kept" if kept else "no earlier checkpoint exists"))
        if self.rank == 0:
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
        """Restore engine (weights, optimiser, lr schedule) and this rank's RNG from a
        verified checkpoint (CheckpointError otherwise); returns the client state saved with it."""
        path = Path(path)
        if not is_complete(path):
            raise CheckpointError(f"{path} is not a completed checkpoint (no {MARKER} marker)")
        if path not in self.verified:
            _on_rank0(self.rank, lambda: verify(path))
        with self._engine_io(engine, step=-1):
            loaded, client_state = engine.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint at {path}")
        rank_file = path / f"rank_{self.rank:05d}.pt"
        if rank_file.is_file():  # absent when resuming on a different number of ranks
            set_rng_state(load_file(rank_file))
        return client_state


class _Patched:
    """Replace attributes of an object for the duration of a `with` block."""

    def __init__(self, obj: Any, **attrs: Any) -> None:
        self.obj, self.attrs = obj, attrs

    def __enter__(self) -> None:
        self.before = {name: vars(self.obj).get(name, _Patched) for name in self.attrs}
        for name, value in self.attrs.items():
            setattr(self.obj, name, value)

    def __exit__(self, *exc: Any) -> None:
        for name, value in self.before.items():
            if value is _Patched:
                delattr(self.obj, name)  # the class's own method shows through again
            else:
                setattr(self.obj, name, value)


def _write(obj: Any, path: Path, step: int, zipfile: bool = True) -> None:
    """torch.save through a Python file object, so that a failed write is an OSError with its
    errno (torch's own writer reports a full disk as an opaque RuntimeError)."""
    with open(path, "wb") as f:
        torch.save(obj, f, _use_new_zipfile_serialization=zipfile)
        f.flush()
        _test_fault(step)


def _cause(err: OSError) -> str:
    """'no space left on device (ENOSPC)' from an OSError."""
    code = errno.errorcode.get(err.errno or 0)
    return f"{(err.strerror or str(err)).lower()}{f' ({code})' if code else ''}"


def _describe(err: OSError, where: Path) -> str:
    """'no space left on device (ENOSPC) writing <file>' from an OSError."""
    return f"{_cause(err)} writing {getattr(err, 'filename', None) or where}"

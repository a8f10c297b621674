"""Checkpoints: atomic saves (a save that dies mid-write leaves the last good checkpoint
intact), failed writes (a full disk: .tmp removed, one-line error naming the cause), pruning,
refusal of incomplete checkpoints, verification (checksums in COMPLETE: flipped bytes and
truncation caught, resume falls back) and safe loading (weights_only: no code runs)."""

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from epg_fast.checkpoint import (CheckpointError, Checkpoints, CheckpointWriteError, check_writable, load_file,
                                 read_checkpoint)


class TorchEngine:
    """DeepSpeed's TorchCheckpointEngine: how the engine reads and writes its files."""

    def save(self, state_dict, path: str) -> None:
        torch.save(state_dict, path)

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)  # as DeepSpeed 0.19 does


class FakeEngine:
    """Writes a model-states file like DeepSpeed (through its checkpoint engine)."""

    def __init__(self) -> None:
        self.checkpoint_engine = TorchEngine()

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        out = Path(save_dir) / tag
        out.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"module": {"w": torch.full((3,), float(client_state["step"]))}, **client_state},
                                    str(out / "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs):
        path = Path(load_dir) / tag
        state = self.checkpoint_engine.load(str(path / "mp_rank_00_model_states.pt"))
        return str(path), state


def test_full_disk_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """ENOSPC inside the model-states write (the test hook raises it after the file is
    written, as a disk that fills up would): one line naming the cause, no .tmp left."""
    ckpts = Checkpoints(tmp_path, keep_last=3, rank=0)
    ckpts.save(FakeEngine(), 5, {"step": 5})
    monkeypatch.setenv("EPG_TEST_SAVE_FAIL", "10:ENOSPC")
    with pytest.raises(CheckpointWriteError, match="no space left on device .ENOSPC.*step_00000005 is kept") as err:
        ckpts.save(FakeEngine(), 10, {"step": 10})
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # the failed save's files are gone
    assert ckpts.latest().name == "step_00000005"
    monkeypatch.delenv("EPG_TEST_SAVE_FAIL")
    state = ckpts.load(FakeEngine(), ckpts.latest())
    assert state["step"] == 5 and torch.equal(state["module"]["w"], torch.full((3,), 5.0))
    ckpts.save(FakeEngine(), 10, {"step": 10})
    assert ckpts.latest().name == "step_00000010"


def test_killed_save_debris_is_cleaned_by_the_next_save(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=3, rank=0)
    ckpts.save(FakeEngine(), 5, {"step": 5})
    (tmp_path / "checkpoints" / "step_00000010.tmp").mkdir()  # a save killed mid-write
    assert ckpts.latest().name == "step_00000005"
    ckpts.save(FakeEngine(), 10, {"step": 10})
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("code", ["ENOSPC", "EACCES", "EIO"])
def test_any_write_error_is_one_line_naming_the_cause(tmp_path, monkeypatch, code):
    """The real OSError of a write (not torch's opaque RuntimeError): a /dev/full-like failure."""
    ckpts = Checkpoints(tmp_path, keep_last=3, rank=0)
    real_open = open

    def failing_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if "w" in mode and str(path).endswith("model_states.pt"):
            f.close()
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(path))
        return f

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(CheckpointWriteError, match=f"{os.strerror(getattr(errno, code)).lower()} .{code}.") as err:
        ckpts.save(FakeEngine(), 3, {"step": 3})
    assert "no earlier checkpoint" in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "checkpoints").iterdir())


def test_torch_save_to_a_full_device_names_enospc():
    """Why saves go through a Python file: torch.save(obj, path) on a full disk raises an
    opaque RuntimeError; through a file object the OSError names ENOSPC."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    from epg_fast.checkpoint import _write

    with pytest.raises(OSError) as err:
        _write({"w": torch.zeros(100_000)}, Path("/dev/full"), step=0)
    assert err.value.errno == errno.ENOSPC



def test_unwritable_run_directory_is_refused_up_front(tmp_path, unwritable_dir):
    folder = unwritable_dir
    with pytest.raises(CheckpointWriteError, match=f"cannot write into {folder}"):
        check_writable(folder)
    with pytest.raises(CheckpointWriteError, match=f"cannot write into {folder / 'run'}"):
        check_writable(folder / "run")
    check_writable(tmp_path / "fresh" / "run")  # created when missing
    assert (tmp_path / "fresh" / "run").is_dir() and not list((tmp_path / "fresh" / "run").iterdir())


def test_keep_last_prunes_oldest(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=2, rank=0)
    for step in (1, 2, 3, 4):
        ckpts.save(FakeEngine(), step, {"step": step})
    assert [p.name for p in ckpts.completed()] == ["step_00000003", "step_00000004"]


def test_incomplete_checkpoints_are_never_loaded(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=3, rank=0)
    ckpts.save(FakeEngine(), 7, {"step": 7})
    fake = tmp_path / "checkpoints" / "step_00000009"  # right name, but no COMPLETE marker
    fake.mkdir()
    assert ckpts.latest().name == "step_00000007"
    with pytest.raises(CheckpointError, match="not a completed checkpoint"):
        ckpts.load(FakeEngine(), fake)


def test_rng_state_round_trip(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=3, rank=0)
    torch.manual_seed(123)
    path = ckpts.save(FakeEngine(), 1, {"step": 1})
    expected = torch.rand(4)
    torch.manual_seed(999)
    ckpts.load(FakeEngine(), path)
    assert torch.equal(torch.rand(4), expected)


def test_read_checkpoint_of_a_step_or_run_folder(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=3, rank=0)
    for step in (3, 6):
        ckpts.save(FakeEngine(), step, {"step": step, "ema": {"w": torch.zeros(2)}, "config": {"stage": "denoise"}})
    (tmp_path / "checkpoints" / "step_00000009").mkdir()  # no COMPLETE marker: skipped
    saved = read_checkpoint(tmp_path)  # a run folder: its newest completed checkpoint
    assert saved.folder.name == "step_00000006" and saved.step == 6 and saved.stage == "denoise"
    assert torch.equal(saved.weights["w"], torch.full((3,), 6.0)) and torch.equal(saved.shadow["w"], torch.zeros(2))
    assert read_checkpoint(tmp_path / "checkpoints" / "step_00000003").step == 3
    for path, message in ((tmp_path / "checkpoints" / "step_00000009", "no COMPLETE marker"),
                          (tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "no completed checkpoint")):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True, exist_ok=True)
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(path)


# ---------------------------------------------------------------------------------------
# Verification


def saved_run(tmp_path: Path, steps=(3, 6)) -> Checkpoints:
    ckpts = Checkpoints(tmp_path, keep_last=5, rank=0)
    for step in steps:
        ckpts.save(FakeEngine(), step, {"step": step, "ema": {"w": torch.zeros(2)}, "config": {"stage": "denoise"}})
    return ckpts


def states_file(ckpts: Checkpoints, step: int) -> Path:
    return ckpts.dir / f"step_{step:08d}" / "mp_rank_00_model_states.pt"


def flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_complete_records_size_and_checksum_of_every_file(tmp_path):
    ckpts = saved_run(tmp_path, steps=(3,))
    marker = json.loads((ckpts.dir / "step_00000003" / "COMPLETE").read_text())
    assert marker["step"] == 3
    assert set(marker["files"]) == {"mp_rank_00_model_states.pt", "rank_00000.pt"}
    entry = marker["files"]["mp_rank_00_model_states.pt"]
    assert entry["size"] == states_file(ckpts, 3).stat().st_size and len(entry["sha256"]) == 64


@pytest.mark.parametrize("damage", [flip_bytes, truncate], ids=["flipped", "truncated"])
def test_resume_auto_falls_back_loudly_past_a_damaged_newest(tmp_path, caplog, damage):
    ckpts = saved_run(tmp_path)
    damage(states_file(ckpts, 6))
    with caplog.at_level(logging.WARNING, logger="epg_fast"):
        assert ckpts.latest().name == "step_00000003"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "step_00000006" in warning and "mp_rank_00_model_states.pt" in warning and "damaged" in warning
    assert read_checkpoint(tmp_path).step == 3  # a run folder given to sample/probe/init.encoder: same


@pytest.mark.parametrize("damage", [flip_bytes, truncate], ids=["flipped", "truncated"])
def test_a_damaged_checkpoint_named_explicitly_is_a_one_line_error(tmp_path, damage):
    ckpts = saved_run(tmp_path)
    damage(states_file(ckpts, 6))
    folder = ckpts.dir / "step_00000006"
    for load in (lambda: read_checkpoint(folder), lambda: ckpts.load(FakeEngine(), folder)):
        with pytest.raises(CheckpointError, match="step_00000006/mp_rank_00_model_states.pt is damaged") as err:
            load()
        assert "\n" not in str(err.value)


def test_damaged_rank_file_and_missing_file_are_caught(tmp_path):
    ckpts = saved_run(tmp_path)
    flip_bytes(ckpts.dir / "step_00000006" / "rank_00000.pt", count=4)
    with pytest.raises(CheckpointError, match="rank_00000.pt is damaged"):
        ckpts.load(FakeEngine(), ckpts.dir / "step_00000006")
    states_file(ckpts, 3).unlink()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is missing"):
        read_checkpoint(ckpts.dir / "step_00000003")
    assert ckpts.latest() is None


def test_checkpoints_written_before_checksums_still_load_with_a_note(tmp_path, caplog):
    ckpts = saved_run(tmp_path, steps=(3,))
    folder = ckpts.dir / "step_00000003"
    (folder / "COMPLETE").write_text(json.dumps({"step": 3}))  # the old marker
    # ... and the old rank file: numpy's RNG state as a numpy array
    import random

    import numpy as np

    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               folder / "rank_00000.pt")
    with caplog.at_level(logging.INFO, logger="epg_fast"):
        assert ckpts.latest() == folder
        assert ckpts.load(FakeEngine(), folder)["step"] == 3
    assert any("before checkpoints carried checksums" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------
# Safe loading


class Payload:
    """Writes a marker file when unpickled: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_pickle_payload_in_a_checkpoint_does_not_run(tmp_path):
    """A crafted model-states file with a valid COMPLETE (checksums of the crafted file)."""
    ckpts = saved_run(tmp_path, steps=(3,))
    folder = ckpts.dir / "step_00000003"
    marker = tmp_path / "pwned"
    torch.save({"module": {"w": torch.zeros(3)}, "config": {"stage": "denoise"}, "x": Payload(marker)},
               folder / "mp_rank_00_model_states.pt")
    from epg_fast.checkpoint import manifest

    (folder / "COMPLETE").write_text(json.dumps({"step": 3, "files": manifest(folder)}))
    for load in (lambda: read_checkpoint(folder), lambda: ckpts.load(FakeEngine(), folder),
                 lambda: load_file(folder / "mp_rank_00_model_states.pt")):
        with pytest.raises(CheckpointError, match="refused: it holds pickled Python objects") as err:
            load()
        assert "weights_only=False" not in str(err.value)
    assert not marker.exists()


def test_rank_files_load_weights_only_and_restore_every_rng(tmp_path):
    import random

    import numpy as np

    ckpts = Checkpoints(tmp_path, keep_last=3, rank=0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ckpts.save(FakeEngine(), 1, {"step": 1})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    torch.load(path / "rank_00000.pt", weights_only=True)  # plain tensors, lists and numbers
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpts.load(FakeEngine(), path)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected

"""Checkpoint atomicity: a save that dies mid-write leaves the last good checkpoint intact
and invisible debris; pruning; refusal of incomplete checkpoints."""

from pathlib import Path

import pytest
import torch

from epg_fast.checkpoint import CheckpointError, Checkpoints, read_checkpoint


class FakeEngine:
    """Writes a model-states file like DeepSpeed; can fail half-way through a save."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        out = Path(save_dir) / tag
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.full((3,), float(client_state["step"]))}, **client_state},
                   out / "mp_rank_00_model_states.pt")
        if self.fail:
            raise OSError("No space left on device")

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs):
        path = Path(load_dir) / tag
        state = torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)
        return str(path), state


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=3, rank=0)
    ckpts.save(FakeEngine(), 5, {"step": 5})
    with pytest.raises(OSError, match="No space"):
        ckpts.save(FakeEngine(fail=True), 10, {"step": 10})
    assert (tmp_path / "checkpoints" / "step_00000010.tmp").is_dir()  # the debris of the failed save
    assert ckpts.latest().name == "step_00000005"
    state = ckpts.load(FakeEngine(), ckpts.latest())
    assert state["step"] == 5 and torch.equal(state["module"]["w"], torch.full((3,), 5.0))
    ckpts.save(FakeEngine(), 10, {"step": 10})
    assert ckpts.latest().name == "step_00000010"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # debris cleaned by the next save


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
    with pytest.raises(FileNotFoundError, match="not a completed checkpoint"):
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

"""What a long run on a shared cluster meets, tried on the trainer as subprocesses on CPU:
signals to the launcher's process group, a second trainer on the same run directory, a
fresh run into a directory of another run, non-finite steps, changed settings on resume and
a hung rank."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from epg_fast.distributed import free_port
from test_train import TRAIN, assert_same_training_state, env, final_state, run, straight, train_cmd  # noqa: F401

# The trainer's own exit status, whatever the launcher above it returns.
RC_TRAINER = """
import sys
import epg_fast.train as train
rc = train.main(sys.argv[1:])
open(rc_file, "w").write(str(rc))
sys.exit(rc)
"""


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "training ended early"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


def wait_group_gone(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Every process of the group led by `proc` has ended: no orphaned trainer or worker is left."""
    pgid, deadline = proc.pid, time.time() + timeout
    while True:
        proc.poll()  # reaps the leader: a zombie still counts as a member of its group
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.time() < deadline, f"process group {pgid} still alive after {timeout} s"
        time.sleep(0.1)


@pytest.mark.parametrize("launcher,sig", [("deepspeed", signal.SIGINT), ("python", signal.SIGTERM)])
def test_signal_to_the_process_group_checkpoints_and_resumes_exactly(straight, env, tmp_path, launcher, sig):
    """Ctrl-C / Slurm's SIGTERM reach the launcher, the trainer and its DataLoader workers at
    once: the trainer checkpoints at the end of its step and exits 0."""
    script, rc_file, run_dir = tmp_path / "rc_train.py", tmp_path / "rc", tmp_path / "run"
    script.write_text(f"rc_file = {str(rc_file)!r}\n" + RC_TRAINER)
    prefix = ([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port())]
              if launcher == "deepspeed" else [sys.executable])
    cmd = train_cmd(run_dir, "train.total_steps=20", "train.save_every=5", "data.workers=1", launcher=prefix)
    cmd[cmd.index(TRAIN)] = str(script)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(run_dir / "checkpoints" / "step_00000005" / "COMPLETE", proc)
        os.killpg(proc.pid, sig)
        wait_group_gone(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (run_dir / "train.log").read_text()
    assert rc_file.is_file() and rc_file.read_text() == "0", log[-3000:]
    assert f"received {sig.name}" in log and "stopped at step" in log
    stopped = int(log.split("stopped at step ")[1].split()[0])
    assert 5 <= stopped < 20 and (run_dir / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").is_file()
    run(train_cmd(run_dir, "train.total_steps=20", "train.save_every=5", "data.workers=1"), env)
    assert_same_training_state(final_state(straight[0], 20), final_state(run_dir, 20))


def test_second_trainer_on_a_run_dir_is_refused_and_a_dead_holder_never_blocks(env, tmp_path):
    first = subprocess.Popen(train_cmd(tmp_path, "train.total_steps=200", "train.save_every=5"), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(tmp_path / "checkpoints" / "step_00000005" / "COMPLETE", first)
        second = subprocess.run(train_cmd(tmp_path, "train.total_steps=6"), env=env, capture_output=True,
                                text=True, timeout=300)
        assert first.poll() is None, "the second trainer disturbed the first"
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"is in use by another trainer (pid {first.pid} on " in second.stderr
    assert second.stderr.count("\n") == 1  # one line
    proc = run(train_cmd(tmp_path, "train.total_steps=10", "train.save_every=5"), env)  # the holder died: go on
    assert "resumed from" in proc.stderr


def test_resume_none_into_a_run_dir_with_checkpoints_is_refused(straight, env):
    run_dir = straight[0]
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = subprocess.run(train_cmd(run_dir, "train.total_steps=20", "train.resume=none"), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "train.resume=none, but" in proc.stderr and "use another train.run_dir" in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_pruning_touches_only_this_runs_checkpoints(tmp_path, monkeypatch):
    from epg_fast.checkpoint import Checkpoints
    from test_checkpoint import FakeEngine

    monkeypatch.setattr("epg_fast.checkpoint.rng_state", lambda: {})
    other = Checkpoints(tmp_path, keep_last=5, rank=0)
    other.run = "other-run"
    for step in (10, 20, 30):
        other.save(FakeEngine(), step, {"step": step})
    ours = Checkpoints(tmp_path, keep_last=2, rank=0)
    ours.run = "this-run"
    for step in (1, 2, 3, 4):
        ours.save(FakeEngine(), step, {"step": step})
    names = sorted(p.name for p in ours.completed())
    assert names == ["step_00000003", "step_00000004", "step_00000010", "step_00000020", "step_00000030"]


def strict_rows(run_dir: Path) -> list[dict]:
    def refuse(name):
        raise AssertionError(f"metrics.jsonl holds a bare {name}: not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_nonfinite_steps_change_nothing_and_are_counted(env, tmp_path):
    common = ("train.total_steps=6", "train.save_every=2", "log.every=1", "train.keep_last=5")
    proc = run(train_cmd(tmp_path, *common), dict(env, EPG_TEST_NAN_AT_STEP="0,2,3"))
    a, b = final_state(tmp_path, 2), final_state(tmp_path, 4)  # steps 2 and 3 were NaN
    for key in ("module", "target"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} changed in a non-finite step"
    for i, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][name]), f"optimizer {i}.{name} changed"
    assert all(float(s["step"]) == 1 for s in a["optimizer"]["state"].values())  # step 0 left no trace
    assert all(v.abs().sum() > 0 for k, v in a["module"].items() if k.endswith("weight"))  # nothing zeroed
    c = final_state(tmp_path, 6)["module"]  # finite steps 4 and 5 do train
    assert any(not torch.equal(a["module"][name], c[name]) for name in c)
    rows = strict_rows(tmp_path)
    assert [r["loss"] is None for r in rows] == [True, False, True, True, False, False]
    assert [r["nonfinite_steps"] for r in rows] == [1, 1, 2, 3, 3, 3]
    assert "non-finite loss or update" in proc.stderr


def test_too_many_nonfinite_steps_stop_the_run_and_keep_the_last_checkpoint(env, tmp_path):
    common = ("train.total_steps=10", "train.save_every=2", "log.every=1", "train.max_nonfinite=3")
    proc = subprocess.run(train_cmd(tmp_path, *common), env=dict(env, EPG_TEST_NAN_AT_STEP="2,3,4,5,6,7,8,9"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "step 5: 3 consecutive non-finite steps (train.max_nonfinite=3)" in proc.stderr
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == ["step_00000002", "step_00000004"]
    for name, value in final_state(tmp_path, 4)["module"].items():
        assert torch.isfinite(value).all(), name


def test_nonfinite_lr_is_refused(env, tmp_path):
    for value in ("nan", "inf"):
        proc = subprocess.run(train_cmd(tmp_path, f"optim.lr={value}"), env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and "'optim.lr' must be > 0 and finite" in proc.stderr


def test_resume_applies_changed_optimiser_settings(env, tmp_path):
    from epg_fast.config import OptimConfig
    from epg_fast.optim import lr_factor

    run(train_cmd(tmp_path, "train.total_steps=20", "train.save_every=5", "train.stop_after=5", "optim.lr=1e-3"), env)
    proc = run(train_cmd(tmp_path, "train.total_steps=20", "train.save_every=5", "train.stop_after=6", "optim.lr=1e-4",
                         "optim.weight_decay=0.1", "optim.betas=[0.8,0.9]", "optim.grad_clip=1.0"), env)
    for change in ("optim.lr changed 0.001 -> 0.0001", "optim.weight_decay changed 0.03 -> 0.1",
                   "optim.betas changed [0.9, 0.95] -> [0.8, 0.9]", "optim.grad_clip changed 0.0 -> 1.0"):
        assert change in proc.stderr, change
    (group,) = final_state(tmp_path, 6)["optimizer"]["param_groups"]
    assert group["lr"] == pytest.approx(1e-4 * lr_factor(OptimConfig(warmup_steps=3), 20)(6))
    assert group["weight_decay"] == 0.1 and tuple(group["betas"]) == (0.8, 0.9)


@pytest.mark.parametrize("override,key", [("train.zero_stage=1", "train.zero_stage=0"), ("train.seed=1", "train.seed=0")])
def test_resume_refuses_a_change_that_cannot_apply(straight, env, override, key):
    proc = subprocess.run(train_cmd(straight[0], "train.total_steps=30", override), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"resuming a checkpoint with {key}, this run has {override}" in proc.stderr


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    import datetime

    import epg_fast.distributed as distributed

    seen = {}
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, {"WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.get(key, "0"))
    distributed.setup_distributed("cpu", group_of_one=True, timeout_minutes=0.5)
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(seconds=30)


def test_a_collective_timeout_is_one_line_naming_the_step(monkeypatch, capsys):
    import epg_fast.train as train

    def hung_peer(cfg, comments=""):
        train.progress["step"] = 7
        raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv operation\nmore")

    monkeypatch.setattr(train, "train", hung_peer)
    assert train.main(["train.dist_timeout=0.1"]) == 1
    assert capsys.readouterr().err == ("epg_fast: step 7: no answer from another rank for train.dist_timeout=0.1 min "
                                       "(hung or dead): [gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                                       "6000ms for recv operation\n")


def test_nonfinite_guard_adds_no_host_sync_to_a_step():
    from types import SimpleNamespace

    from epg_fast.safety import NonFiniteGuard
    from epg_fast.syncs import SyncCounter

    torch.manual_seed(0)
    online, shadow = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)), torch.nn.Linear(4, 4)
    engine = SimpleNamespace(module=online, optimizer=torch.optim.AdamW(online.parameters(), lr=0.1))
    guard = NonFiniteGuard(engine, shadow, torch.device("cpu"), max_consecutive=5)

    def step(i: int, poison: bool) -> None:
        guard.begin_step()
        loss = online(torch.randn(8, 4)).square().mean() * (float("nan") if poison else 1.0)
        loss.backward()
        engine.optimizer.step()
        engine.optimizer.zero_grad()
        guard.end_step(loss, i)

    step(0, False)  # creates the optimiser state
    before = {k: v.clone() for k, v in online.state_dict().items()}
    with SyncCounter() as counter:
        counter.treat_as_host([s["step"] for s in engine.optimizer.state.values()])  # torch AdamW's own reads
        step(1, True)
        step(2, True)
    assert counter.events == [], counter.report()
    assert all(torch.equal(before[k], v) for k, v in online.state_dict().items())
    assert all(float(s["step"]) == 1 for s in engine.optimizer.state.values())
    assert guard.read(3, SimpleNamespace(warning=lambda *a: None)) == 2

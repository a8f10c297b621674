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


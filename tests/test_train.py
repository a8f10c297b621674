"""The trainer end to end, as subprocesses on CPU: artifacts, exact resume (after a clean
stop, SIGTERM and SIGKILL), two DeepSpeed ranks, ZeRO stages, bf16, and clear exits."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from epg_fast.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "epg_fast" / "train.py")
TINY = [
    "model.depth=2", "model.dim=32", "model.heads=2", "model.image_size=16", "model.patch_size=4",
    "model.proj_hidden=64", "model.proj_dim=16", "train.global_batch=8", "data.workers=0",
    "log.every=5", "optim.warmup_steps=3",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, DS_ACCELERATOR="cpu", EPG_CACHE_DIR=str(tmp_path_factory.mktemp("cache")), OMP_NUM_THREADS="1")
    e.pop("RANK", None), e.pop("WORLD_SIZE", None), e.pop("LOCAL_RANK", None)
    return e


def train_cmd(run_dir: Path, *overrides: str, launcher: list[str] | None = None) -> list[str]:
    return (launcher or [sys.executable]) + [TRAIN, "--stage", "pretrain", *TINY, f"train.run_dir={run_dir}", *overrides]


def run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stderr ---\n{proc.stderr[-4000:]}"
    return proc


def final_state(run_dir: Path, step: int) -> dict:
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    assert (ckpt / "COMPLETE").is_file(), f"no completed checkpoint at {ckpt}"
    (states,) = ckpt.glob("*mp_rank_00_model_states.pt")  # ZeRO-3 prefixes zero_pp_rank_0_
    return torch.load(states, weights_only=False, map_location="cpu")


def assert_bitwise_equal(a, b, path="state"):
    if torch.is_tensor(a):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys differ"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")


def assert_same_training_state(a: dict, b: dict) -> None:
    assert_bitwise_equal(a["module"], b["module"], "online")
    assert_bitwise_equal(a["target"], b["target"], "target")
    assert_bitwise_equal(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    assert a["data"] == b["data"] and a["step"] == b["step"]


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory):
    """The reference run: 20 steps straight."""
    run_dir = tmp_path_factory.mktemp("straight")
    proc = run(train_cmd(run_dir, "train.total_steps=20", "train.save_every=10"), env)
    return run_dir, proc


def test_run_directory_contents(straight):
    run_dir, proc = straight
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    for key in ("loss", "contrastive", "consistency", "N", "tau_contrastive", "tau_consistency", "lr",
                "grad_norm", "param_norm", "img_per_s", "data_wait_frac"):
        assert all(key in r for r in rows), key
    assert all(r["loss"] == pytest.approx(r["contrastive"] + r["consistency"], rel=1e-5) for r in rows)
    assert rows[0]["N"] == 41 and rows[-1]["N"] > rows[0]["N"]  # the curriculum advances
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    log = (run_dir / "train.log").read_text()
    for needle in ("resolved config:", "parameters", "world size   1", "precision    fp32", "attention sdpa",
                   "ZeRO stage 0", "images, 8 classes", "identical on all 1 ranks"):
        assert needle in log, needle
    state = final_state(run_dir, 20)
    assert state["step"] == 20 and state["config"]["train"]["total_steps"] == 20
    assert (run_dir / "checkpoints" / "step_00000010" / "COMPLETE").is_file()


def test_resume_after_stop_is_bit_exact(straight, env, tmp_path):
    run(train_cmd(tmp_path, "train.total_steps=20", "train.save_every=100", "train.stop_after=10"), env)
    assert not (tmp_path / "checkpoints" / "step_00000020").exists()
    proc = run(train_cmd(tmp_path, "train.total_steps=20", "train.save_every=100"), env)
    assert "resumed from" in proc.stderr and "at step 10" in proc.stderr
    assert_same_training_state(final_state(straight[0], 20), final_state(tmp_path, 20))


def _run_until_checkpoint_then(sig: int, env: dict, run_dir: Path, step: int) -> subprocess.Popen:
    proc = subprocess.Popen(train_cmd(run_dir, "train.total_steps=20", "train.save_every=5"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, f"training ended early:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def test_sigkill_mid_training_then_resume_is_bit_exact(straight, env, tmp_path):
    proc = _run_until_checkpoint_then(signal.SIGKILL, env, tmp_path, 5)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "checkpoints" / "step_00000020").exists()  # killed mid-training
    run(train_cmd(tmp_path, "train.total_steps=20", "train.save_every=5"), env)
    assert_same_training_state(final_state(straight[0], 20), final_state(tmp_path, 20))


def test_sigterm_checkpoints_then_resume_is_bit_exact(straight, env, tmp_path):
    proc = _run_until_checkpoint_then(signal.SIGTERM, env, tmp_path, 5)
    err = proc.stderr.read()
    assert proc.returncode == 0, err[-3000:]
    assert "received SIGTERM" in err and "stopped at step" in err
    stopped = int(err.split("stopped at step ")[1].split()[0])
    assert stopped < 20 and (tmp_path / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").is_file()
    run(train_cmd(tmp_path, "train.total_steps=20", "train.save_every=5"), env)
    assert_same_training_state(final_state(straight[0], 20), final_state(tmp_path, 20))


def test_finished_run_is_not_repeated(straight, env):
    proc = run(train_cmd(straight[0], "train.total_steps=20"), env)
    assert "nothing to do" in proc.stderr


# The trainer, with every rank saving its final online weights to dump_dir/rank<r>.pt where
# the trainer compares the replicas itself.
DUMPING_TRAINER = """
import sys, torch, torch.distributed as dist
import epg_fast.train as train

def dump(module, world):
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    torch.save(state, f"{dump_dir}/rank{dist.get_rank()}.pt")

train.check_replicas_identical = dump
sys.exit(train.main(sys.argv[1:]))
"""


def test_two_deepspeed_ranks_end_identical(env, tmp_path):
    script = tmp_path / "dumping_train.py"
    script.write_text(f"dump_dir = {str(tmp_path)!r}\n" + DUMPING_TRAINER)
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd = train_cmd(tmp_path / "run", "train.total_steps=5", launcher=launcher)
    cmd[cmd.index(TRAIN)] = str(script)
    proc = run(cmd, env, timeout=600)
    assert "world size   2 (gloo)" in proc.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert_bitwise_equal(ranks[0], ranks[1], "rank 0 vs rank 1")
    assert_bitwise_equal(ranks[0], final_state(tmp_path / "run", 5)["module"], "rank 0 vs checkpoint")
    assert (tmp_path / "run" / "checkpoints" / "step_00000005" / "rank_00001.pt").is_file()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_stage_0(env, tmp_path, stage):
    base, other = tmp_path / "z0", tmp_path / f"z{stage}"
    # target_ema=0 makes the target (a full replica at every stage) a copy of the online weights
    common = ("train.total_steps=4", "train.save_every=100", "pretrain.target_ema=0")
    run(train_cmd(base, *common, "train.zero_stage=0"), env)
    run(train_cmd(other, *common, f"train.zero_stage={stage}"), env)
    a, b = final_state(base, 4)["target"], final_state(other, 4)["target"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bf16_on_cpu(env, tmp_path):
    """bf16 autocast: the forward runs in bf16 (losses near fp32's, not equal to them), the
    weights and the optimiser stay fp32."""
    common = ("train.total_steps=3", "log.every=1", "train.save_every=100")
    run(train_cmd(tmp_path / "fp32", *common, "train.precision=fp32"), env)
    run(train_cmd(tmp_path / "bf16", *common, "train.precision=bf16"), env)
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(bf16) == 3 and bf16[0] == pytest.approx(fp32[0], rel=0.02)
    assert all(a != b for a, b in zip(fp32, bf16)), "bf16 losses equal fp32's bit for bit: autocast is not on"
    assert "precision    bf16" in (tmp_path / "bf16" / "train.log").read_text()
    state = final_state(tmp_path / "bf16", 3)
    for name, weights in (("online", state["module"]), ("target", state["target"])):
        assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point()), name


def test_bad_config_fails_before_any_work(env, tmp_path):
    proc = subprocess.run(train_cmd(tmp_path / "run", "train.total_stpes=3"), env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown config key 'train.total_stpes'; did you mean 'train.total_steps'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_deepspeed_config_mapping():
    from epg_fast.stages import load_config
    from epg_fast.train import deepspeed_config

    cfg = load_config(None, ["train.global_batch=64", "optim.grad_clip=1.5", "train.zero_stage=2"])
    ds = deepspeed_config(cfg, world=4, precision="fp16")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 16, 1)
    assert ds["gradient_clipping"] == 1.5 and ds["zero_optimization"]["stage"] == 2
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert not deepspeed_config(cfg, world=4, precision="bf16")["fp16"]["enabled"]  # bf16 = autocast


@pytest.mark.parametrize("override,message", [
    ("data.root=/nonexistent/imagenet", "data error: data root does not exist: /nonexistent/imagenet"),
    ("train.resume=/nonexistent/step_00000010", "checkpoint error: /nonexistent/step_00000010 does not exist"),
])
def test_bad_data_root_or_resume_path_is_a_one_line_error(env, tmp_path, override, message):
    proc = subprocess.run(train_cmd(tmp_path, override), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fused_kernels_in_training(env, tmp_path):
    """The trainer on the Triton path (interpreter on CPU): every op reports it, the loss is finite."""
    fused = dict(env, EPG_KERNELS="triton", TRITON_INTERPRET="1")
    run(train_cmd(tmp_path, "train.total_steps=2", "log.every=1"), fused)
    log = (tmp_path / "train.log").read_text()
    assert "kernels triton" in log
    for op in ("layer_norm", "patch_embed", "ema"):
        assert f"op {op:<16} -> triton" in log, op
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_dali_loader_in_training(env, tmp_path):
    """The DALI loader feeds the trainer the torch loader's samples (same images, crops and
    random decisions; its resize and colour filters differ, which moves the first loss by up
    to ~7% at 16 px), and the log names the loader object that ran: a silent fallback to the
    torch loader fails here."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e .[dali])")
    common = ("train.total_steps=3", "log.every=1", "train.save_every=100")
    run(train_cmd(tmp_path / "torch", *common), env)
    run(train_cmd(tmp_path / "dali", *common, "data.loader=dali", "data.workers=1"), env)
    assert losses(tmp_path / "dali")[0] == pytest.approx(losses(tmp_path / "torch")[0], rel=0.15)
    def loader_object(run_dir: Path) -> str:  # the class the startup block names, module included
        return re.search(r"; loader: \w+ \(([\w.]+)\)", (run_dir / "train.log").read_text())[1]

    assert "dali" in loader_object(tmp_path / "dali").lower()
    assert "dali" not in loader_object(tmp_path / "torch").lower()

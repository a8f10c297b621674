"""What a user meets when something is wrong: one line on stderr and exit status 2, nothing
lost and nothing executed (issue 12, item 8 and safe loading). Each command runs as a
subprocess, as a user would run it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "epg_fast" / "train.py")
TINY = ["model.depth=2", "model.dim=32", "model.heads=2", "model.image_size=16", "model.patch_size=4",
        "model.proj_hidden=64", "model.proj_dim=16", "train.global_batch=8", "data.workers=0", "log.every=5",
        "optim.warmup_steps=3"]
FINETUNE = ["model.decoder_dim=32", "model.decoder_heads=2", "model.num_classes=8", "train.sample_every=0"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, DS_ACCELERATOR="cpu", EPG_CACHE_DIR=str(tmp_path_factory.mktemp("cache")), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    return e


def one_line_error(cmd: list[str], env: dict, *needles: str, cwd: Path | None = None) -> str:
    """Run `cmd`: exit 2 and a single stderr line holding every needle; returns that line."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    lines = [l for l in proc.stderr.splitlines() if "error" in l.lower() or "Traceback" in l]
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def train(*args: str) -> list[str]:
    return [sys.executable, TRAIN, *args]


class Payload:
    """Writes a marker file when unpickled: what a crafted checkpoint from the internet does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.fixture(scope="module")
def pretrained(env, tmp_path_factory) -> Path:
    """A tiny pre-training run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("pretrain")
    proc = subprocess.run(train("--stage", "pretrain", *TINY, "train.total_steps=4", "train.save_every=2",
                                f"train.run_dir={run_dir}"), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("content, needle", [
    (b"train: [1,\n", "is not valid YAML"),
    (b"train:\n  seed: \xff\xfe\n", "is not UTF-8 text"),
], ids=["malformed", "not-utf8"])
def test_bad_config_files(tmp_path, env, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    one_line_error(train("--config", str(path)), env, needle, str(path))


@pytest.mark.parametrize("override, needle", [
    ("optim.betas=[0.9,", "override 'optim.betas=[0.9,': the value is not valid YAML"),
    ("model.mlp_ratio=-1", "'model.mlp_ratio' must be > 0"),
    ("model.mlp_ratio=0", "'model.mlp_ratio' must be > 0"),
    ("data.root=''", "data.root is empty"),
    ("train.precision=fp16", "train.precision=fp16 needs CUDA"),
])
def test_bad_overrides(tmp_path, env, override, needle):
    if override.startswith("train.precision") and torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    one_line_error(train(*TINY, f"train.run_dir={tmp_path / 'run'}", override), env, needle)
    assert not (tmp_path / "run" / "checkpoints").exists()



def test_unwritable_run_directory_is_refused_before_any_work(tmp_path, env, unwritable_dir):
    folder = unwritable_dir / "run"
    line = one_line_error(train(*TINY, f"train.run_dir={folder}"), env, f"cannot write into {folder}")
    assert "checkpoint error" in line


# ---------------------------------------------------------------------------------------
# Resuming and init.encoder


def test_resume_with_another_model_shape_or_stage(pretrained, tmp_path, env):
    run = copy_run(pretrained, tmp_path / "run")
    one_line_error(train(*TINY, "model.depth=3", "train.total_steps=6", f"train.run_dir={run}"), env,
                   "model.depth=2, this run model.depth=3")
    one_line_error(train("--stage", "denoise", *TINY, *FINETUNE, "init.encoder=null", "train.total_steps=6",
                         f"train.run_dir={run}"), env,
                   "is a 'pretrain' checkpoint, this run is 'denoise'")


def test_resume_auto_skips_a_damaged_newest_and_continues_exactly(pretrained, tmp_path, env):
    """Flipped bytes in the newest model-states file: a warning naming it, resume from step 2,
    and the re-trained step 4 equals the original bit for bit."""
    run = copy_run(pretrained, tmp_path / "run")
    states = run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 64])
    states.write_bytes(bytes(data))
    # the damaged one named explicitly: one line, no fallback
    one_line_error(train(*TINY, "train.total_steps=4", f"train.run_dir={tmp_path / 'other'}",
                         f"train.resume={states.parent}"), env, f"{states} is damaged")
    proc = subprocess.run(train(*TINY, "train.total_steps=6", "train.save_every=2", f"train.run_dir={run}"),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping checkpoint step_00000004" in proc.stderr and "mp_rank_00_model_states.pt is damaged" in proc.stderr
    assert "resumed from" in proc.stderr and "step_00000002 at step 2" in proc.stderr
    redone = torch.load(run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt", weights_only=True)
    original = torch.load(pretrained / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt", weights_only=True)
    for key in original["module"]:
        assert torch.equal(redone["module"][key], original["module"][key]), key


def crafted_checkpoint(pretrained: Path, dst: Path, marker: Path) -> Path:
    """A copy of a real checkpoint whose model-states file carries a payload, with a COMPLETE
    whose checksums match it (verification cannot help: only weights_only can)."""
    from epg_fast.checkpoint import manifest

    folder = shutil.copytree(pretrained / "checkpoints" / "step_00000004", dst)
    states = folder / "mp_rank_00_model_states.pt"
    state = torch.load(states, weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, states)
    (folder / "COMPLETE").write_text(json.dumps({"step": 4, "files": manifest(folder)}))
    return folder


def test_a_crafted_pickle_never_runs(pretrained, tmp_path, env):
    marker = tmp_path / "pwned"
    folder = crafted_checkpoint(pretrained, tmp_path / "step_00000004", marker)
    payload_file = tmp_path / "encoder.pt"
    torch.save({"encoder.cls_token": torch.zeros(1), "x": Payload(marker)}, payload_file)
    refused = "refused: it holds pickled Python objects"
    ft = ["--stage", "denoise", *TINY, *FINETUNE, "train.total_steps=2", f"train.run_dir={tmp_path / 'ft'}"]
    one_line_error(train(*ft, f"init.encoder={payload_file}"), env, "init.encoder", refused)
    one_line_error(train(*ft, f"init.encoder={folder}"), env, "init.encoder", refused)
    one_line_error(train(*TINY, "train.total_steps=6", f"train.run_dir={tmp_path / 'resume'}",
                         f"train.resume={folder}"), env, refused)
    sample = [sys.executable, "-m", "epg_fast.sample", "--out", str(tmp_path / "samples")]
    one_line_error(sample + [str(folder)], env, refused)
    one_line_error(sample + [str(payload_file), "--preset", "EPG-L", "--image-size", "32", "--patch-size", "4",
                             "--prediction", "x0", "--normalization", "simple"], env, refused)
    one_line_error([sys.executable, "-m", "epg_fast.convert", str(payload_file), str(tmp_path / "o.pt")], env, refused)
    assert not marker.exists()


def test_init_encoder_of_another_depth_needs_allow_partial(pretrained, tmp_path, env):
    ft = ["--stage", "denoise", *TINY, *FINETUNE, "train.total_steps=1", f"train.run_dir={tmp_path / 'ft'}",
          f"init.encoder={pretrained}"]
    one_line_error(train(*ft, "model.depth=3"), env, "does not fit this model", "missing", "init.allow_partial=true")
    one_line_error(train(*ft, "model.dim=48", "model.decoder_dim=48"), env, "does not fit this model", "shape")
    proc = subprocess.run(train(*ft, "model.depth=3", "init.allow_partial=true"), env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# The tools


def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.pt"
    path.write_text("hello, this is not a checkpoint\n")
    return path


def test_sample_errors(tmp_path, env, unwritable_dir):
    text = text_file(tmp_path)
    flags = ["--preset", "EPG-L", "--image-size", "32", "--patch-size", "4", "--prediction", "x0",
             "--normalization", "simple"]
    sample = [sys.executable, "-m", "epg_fast.sample", str(text)]
    one_line_error(sample + ["--out", str(tmp_path / "s"), *flags], env, "not a PyTorch checkpoint file")
    one_line_error(sample + ["--out", str(tmp_path / "s"), "--guidance", "nan", *flags], env, "--guidance")
    out = unwritable_dir / "samples"
    one_line_error(sample + ["--out", str(out), *flags], env, f"--out: cannot write into {out}")


def test_convert_errors(tmp_path, env, unwritable_dir):
    text = text_file(tmp_path)
    line = one_line_error([sys.executable, "-m", "epg_fast.convert", str(text), str(tmp_path / "o.pt")], env,
                          "not a PyTorch checkpoint file")
    assert "weights_only=False" not in line
    dst = unwritable_dir / "o.pt"
    one_line_error([sys.executable, "-m", "epg_fast.convert", str(text), str(dst)], env, f"cannot write {dst}")


def test_precrop_of_a_missing_source(tmp_path, env):
    one_line_error([sys.executable, "-m", "epg_fast.data.precrop", str(tmp_path / "nowhere"), str(tmp_path / "out")],
                   env, "does not exist")


def test_samples_folder_is_ignored_by_git():
    assert "samples/" in (ROOT / ".gitignore").read_text().split()


def test_fault_injection_benchmark_short(tmp_path, env):
    """benchmarks/faults.py shortened: one interrupted run and the full-disk fault, each
    ending exactly on the uninterrupted run's weights."""
    out = tmp_path / "faults"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--runs", "1", "--faults", "enospc",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["exact"] for r in result["runs"]] == [True] and not result["runs"][0]["damaged_left"]
    assert result["faults"][0]["ok"] and "no space left on device" in result["faults"][0]["error"][0]
    assert "exact resumes" in out.with_suffix(".md").read_text()

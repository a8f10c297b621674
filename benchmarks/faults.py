"""Fault injection: interrupted runs must resume exactly, damaged checkpoints must never be
chosen, and every injected fault must end in a correct continuation or a one-line error.

    nice python benchmarks/faults.py [--runs 10] [--seed 0] [--faults damaged enospc second nan]
        [--out benchmarks/results/faults-DATE] [--timeout 600]

A tiny pre-training (CPU, one process, `data.workers=0`, 20 steps, a checkpoint every 5) is
run once uninterrupted: the reference, identified by the SHA-256 of its final online and
target weights. Then:

- `--runs N` interrupted runs: each is killed with SIGKILL, SIGTERM or SIGINT, sent to the
  trainer or to its process group, at a random moment of training or inside a checkpoint write
  (the test hook EPG_TEST_SAVE_DELAY makes every save sleep after its first file; the kill
  comes when the `.tmp` folder appears). Every completed checkpoint left behind is verified
  (a damaged one must never exist, or must be skipped); the run is resumed with
  `train.resume=auto` and its final weights compared with the reference, bit for bit.
- `damaged`: flipped bytes in the newest checkpoint, then resume: the trainer must warn,
  fall back to the previous one and still end on the reference.
- `enospc`: the save of step 10 fails with ENOSPC (test hook EPG_TEST_SAVE_FAIL): exit 2 with
  one line naming "no space left on device", no `.tmp` left, step 5 kept; resume to the end.
- `second`: a second trainer started on the same run folder while the first runs: recorded
  (exit statuses, first error line, whether the first run still ends on the reference).
- `nan`: EPG_TEST_NAN_AT_STEP=7 (a test hook of the trainer's non-finite guard): recorded
  (exit status, whether the final weights are finite and equal to the reference).

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from epg_fast.checkpoint import CheckpointError, completed, verify  # noqa: E402

TRAIN = str(ROOT / "epg_fast" / "train.py")
TINY = ["model.depth=2", "model.dim=32", "model.heads=2", "model.image_size=16", "model.patch_size=4",
        "model.proj_hidden=64", "model.proj_dim=16", "train.global_batch=16", "data.workers=0", "log.every=1",
        "log.progress=false", "optim.warmup_steps=2", "train.total_steps=20", "train.save_every=5"]
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


def base_env(cache: Path) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", EPG_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "EPG_TEST_SAVE_DELAY", "EPG_TEST_SAVE_FAIL", "EPG_TEST_NAN_AT_STEP"):
        env.pop(k, None)
    return env


def start(run_dir: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, TRAIN, "--stage", "pretrain", *TINY, f"train.run_dir={run_dir}", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as under a launcher or Slurm


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return -999, err
    return proc.returncode, err


def run(run_dir: Path, env: dict, timeout: float, *extra: str) -> tuple[int, str]:
    return finish(start(run_dir, env, *extra), timeout)


def final_digest(run_dir: Path, step: int = 20) -> str | None:
    """SHA-256 of the online and target weights of the checkpoint of `step` (None: absent)."""
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    files = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    if not (folder / "COMPLETE").is_file() or not files:
        return None
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for part in ("module", "target"):
        for key in sorted(state[part]):
            digest.update(key.encode())
            digest.update(state[part][key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def damaged_checkpoints(run_dir: Path) -> list[str]:
    bad = []
    for folder in completed(run_dir):
        try:
            verify(folder)
        except CheckpointError as err:
            bad.append(str(err))
    return bad


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if "error" in l.lower() or "Traceback" in l]


def interrupted_run(i: int, rng: random.Random, work: Path, env: dict, reference: str, duration: float,
                    timeout: float) -> dict:
    sig_name = rng.choice(list(SIGNALS))
    target = rng.choice(["trainer", "group"])
    moment = rng.choice(["random", "in-save"])
    run_dir = work / f"run{i}"
    run_env = dict(env, EPG_TEST_SAVE_DELAY="1.5") if moment == "in-save" else env
    proc = start(run_dir, run_env)
    t0 = time.perf_counter()
    delay = rng.uniform(0.0, 0.5) * duration  # after the first step began
    sent_at = started = None
    while proc.poll() is None and time.perf_counter() - t0 < timeout:
        # Not before training starts: a kill inside DeepSpeed's start-up (its JIT op build)
        # leaves a stale ~/.cache/torch_extensions/.../lock that makes every later start on
        # the machine wait forever (a DeepSpeed/torch hazard, not a checkpoint one).
        if started is None and "training steps" in _read(run_dir / "train.log"):
            started = time.perf_counter()
        in_save = any((run_dir / "checkpoints").glob("*.tmp")) if (run_dir / "checkpoints").is_dir() else False
        if started is not None and ((moment == "in-save" and in_save) or
                                    (moment == "random" and time.perf_counter() - started >= delay)):
            sent_at = time.perf_counter() - t0
            (os.killpg if target == "group" else os.kill)(proc.pid, SIGNALS[sig_name])
            break
        time.sleep(0.05)
    rc_killed, err_killed = finish(proc, timeout)
    left = [p.name for p in completed(run_dir)]
    damaged = damaged_checkpoints(run_dir)
    rc, err = run(run_dir, env, timeout)
    digest = final_digest(run_dir)
    return {"run": i, "signal": sig_name, "to": target, "moment": moment,
            "sent_after_s": None if sent_at is None else round(sent_at, 2), "rc_interrupted": rc_killed,
            "checkpoints_left": left, "damaged_left": damaged, "rc_resumed": rc,
            "resumed_from": next((l.split("resumed from ", 1)[1] for l in err.splitlines() if "resumed from" in l), None),
            "skipped_warnings": [l for l in err.splitlines() if "skipping checkpoint" in l],
            "exact": digest == reference, "errors": error_lines(err_killed)[-2:] + error_lines(err)[-2:]}


def fault_damaged(work: Path, env: dict, reference: str, timeout: float) -> dict:
    run_dir = work / "damaged"
    rc1, _ = run(run_dir, env, timeout, "train.stop_after=10")
    states = next((run_dir / "checkpoints" / "step_00000010").glob("*model_states.pt"))
    data = bytearray(states.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    states.write_bytes(bytes(data))
    rc, err = run(run_dir, env, timeout)
    warned = [l for l in err.splitlines() if "skipping checkpoint" in l]
    resumed = next((l for l in err.splitlines() if "resumed from" in l), "")
    ok = rc1 == 0 and rc == 0 and bool(warned) and "step_00000005" in resumed and final_digest(run_dir) == reference
    return {"fault": "damaged newest checkpoint (64 flipped bytes)", "ok": ok, "rc": rc, "warning": warned[:1],
            "resumed": resumed.split("INFO ")[-1], "exact": final_digest(run_dir) == reference}


def fault_enospc(work: Path, env: dict, reference: str, timeout: float) -> dict:
    run_dir = work / "enospc"
    rc1, err1 = run(run_dir, dict(env, EPG_TEST_SAVE_FAIL="10:ENOSPC"), timeout)
    lines = error_lines(err1)
    tmp_left = [p.name for p in (run_dir / "checkpoints").glob("*.tmp")]
    kept = [p.name for p in completed(run_dir)]
    rc2, _ = run(run_dir, env, timeout)
    exact = final_digest(run_dir) == reference
    ok = (rc1 == 2 and len(lines) == 1 and "no space left on device" in lines[0] and not tmp_left
          and kept == ["step_00000005"] and rc2 == 0 and exact)
    return {"fault": "ENOSPC in the save of step 10 (EPG_TEST_SAVE_FAIL)", "ok": ok, "rc": rc1, "error": lines,
            "tmp_left": tmp_left, "kept": kept, "rc_resumed": rc2, "exact": exact}


def fault_second(work: Path, env: dict, reference: str, timeout: float) -> dict:
    run_dir = work / "second"
    first = start(run_dir, env)
    time.sleep(3)
    rc2, err2 = run(run_dir, env, timeout)
    rc1, err1 = finish(first, timeout)
    exact = final_digest(run_dir) == reference
    return {"fault": "a second trainer on the same run folder", "ok": None, "rc_first": rc1, "rc_second": rc2,
            "second_error": error_lines(err2)[-1:], "first_error": error_lines(err1)[-1:], "exact": exact,
            "note": "recorded: the run-folder lock is another change of issue 12"}


def fault_nan(work: Path, env: dict, reference: str, timeout: float) -> dict:
    run_dir = work / "nan"
    rc, err = run(run_dir, dict(env, EPG_TEST_NAN_AT_STEP="7"), timeout)
    digest = final_digest(run_dir)
    finite = None
    if digest is not None:
        state = torch.load(next((run_dir / "checkpoints" / "step_00000020").glob("*model_states.pt")),
                           weights_only=True)
        finite = all(bool(torch.isfinite(v).all()) for v in state["module"].values() if v.is_floating_point())
    return {"fault": "NaN injected at step 7 (EPG_TEST_NAN_AT_STEP)", "ok": None, "rc": rc,
            "error": error_lines(err)[-1:], "final_weights_finite": finite, "equal_to_reference": digest == reference,
            "nonfinite_log": [l.split("] ", 1)[-1] for l in err.splitlines() if "non-finite" in l.lower()][:2],
            "note": "recorded: the non-finite guard and its hook are another change of issue 12"}


FAULTS = {"damaged": fault_damaged, "enospc": fault_enospc, "second": fault_second, "nan": fault_nan}


def markdown(result: dict) -> str:
    runs, faults = result["runs"], result["faults"]
    lines = [f"# Fault injection ({result['date']})", "",
             f"`{result['command']}` on {result['machine']}; tiny pre-training, {result['config']}.", "",
             f"Reference (uninterrupted) final weights sha256 `{result['reference'][:16]}...` "
             f"in {result['reference_s']:.0f} s.", "",
             f"**Interrupted runs: {sum(r['exact'] for r in runs)}/{len(runs)} exact resumes; "
             f"damaged checkpoints left behind: {sum(len(r['damaged_left']) for r in runs)}.**", "",
             "| run | signal | to | moment | sent after s | rc | checkpoints left | resumed from | rc | exact |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['run']} | {r['signal']} | {r['to']} | {r['moment']} | {r['sent_after_s']} | "
                     f"{r['rc_interrupted']} | {', '.join(r['checkpoints_left']) or '-'} | "
                     f"{(r['resumed_from'] or '-').split('/')[-1]} | {r['rc_resumed']} | {r['exact']} |")
    lines += ["", "## Faults", ""]
    for f in faults:
        rest = {k: v for k, v in f.items() if k not in ("fault", "ok")}
        verdict = {True: "ok", False: "FAILED", None: "recorded"}[f["ok"]]
        lines.append(f"- **{f['fault']}**: {verdict}; `{json.dumps(rest)}`")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", nargs="*", default=list(FAULTS), choices=list(FAULTS))
    p.add_argument("--out", default=None, help="output path without suffix (default benchmarks/results/faults-DATE)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per trainer process")
    args = p.parse_args()
    date = datetime.date.today().isoformat()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"faults-{date}")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="epg_faults_") as tmp:
        work = Path(tmp)
        env = base_env(work / "cache")
        t0 = time.perf_counter()
        rc, err = run(work / "reference", env, args.timeout)
        duration = time.perf_counter() - t0
        reference = final_digest(work / "reference")
        if rc != 0 or reference is None:
            print(f"the reference run failed (rc {rc}):\n{err[-3000:]}", file=sys.stderr)
            return 1
        print(f"reference: {reference[:16]}... in {duration:.0f} s", flush=True)
        runs = []
        for i in range(args.runs):
            runs.append(interrupted_run(i, rng, work, env, reference, duration, args.timeout))
            r = runs[-1]
            print(f"run {i}: {r['signal']} to {r['to']} ({r['moment']}, {r['sent_after_s']} s): rc {r['rc_interrupted']}, "
                  f"left {r['checkpoints_left']}, damaged {len(r['damaged_left'])}, resumed rc {r['rc_resumed']}, "
                  f"exact {r['exact']}", flush=True)
            shutil.rmtree(work / f"run{i}", ignore_errors=True)
        faults = []
        for name in args.faults:
            faults.append(FAULTS[name](work, env, reference, args.timeout))
            print(f"{name}: {json.dumps(faults[-1])}", flush=True)
    result = {"date": date, "command": "python benchmarks/faults.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.node()} ({os.cpu_count()} CPUs), torch {torch.__version__}",
              "config": " ".join(TINY), "reference": reference, "reference_s": duration, "runs": runs, "faults": faults}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out}.json and {out}.md")
    good = all(r["exact"] and not r["damaged_left"] for r in runs) and all(f["ok"] is not False for f in faults)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())

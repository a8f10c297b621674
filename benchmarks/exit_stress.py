"""Exit-status stress test: a finished run must exit 0, every time (issue 16).

    python benchmarks/exit_stress.py [--runs 50] [--launchers deepspeed torchrun single]
        [--json FILE] [--timeout S]

Runs the demo pre-training for a few steps (tiny batch, checkpoint at the end, its own temp
run_dir) again and again: with the `deepspeed` launcher on two ranks (`--num_gpus 2`, CPU
ranks on gloo), with `torchrun --nproc_per_node 2`, and as a single process. Counts the exit
statuses per launcher, prints a table, and keeps the stderr tail of every failed run.
The runs are sequential; prefix with `nice` on a shared machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "epg_fast" / "train.py")
BIN = Path(sys.executable).parent
# A tiny encoder: the exit path (process-group teardown) does not depend on the model's size.
OVERRIDES = ["train.global_batch=16", "train.total_steps=3", "train.save_every=3", "log.progress=false",
             "data.workers=1", "log.every=3", "model.depth=2", "model.dim=32", "model.heads=2",
             "model.proj_hidden=64", "model.proj_dim=16"]


def launcher_cmd(name: str, port: int) -> list[str]:
    if name == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), TRAIN]
    if name == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), TRAIN]
    return [sys.executable, TRAIN]


def one_run(name: str, index: int, timeout: float, env: dict) -> dict:
    port = 29500 + (os.getpid() + index) % 2000
    with tempfile.TemporaryDirectory(prefix=f"exit_stress_{name}_") as tmp:
        cmd = launcher_cmd(name, port) + ["--stage", "pretrain", *OVERRIDES, f"train.run_dir={tmp}"]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as exc:
            out = exc.stderr or ""
            rc, err = "timeout", out if isinstance(out, str) else out.decode(errors="replace")
        seconds = time.perf_counter() - start
        finished = (Path(tmp) / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    row = {"launcher": name, "run": index, "rc": rc, "seconds": round(seconds, 1), "checkpointed": finished,
           "terminate": "terminate called" in err}
    if rc != 0:
        row["stderr_tail"] = err[-3000:]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=50, help="runs per launcher")
    p.add_argument("--launchers", nargs="+", default=["deepspeed", "torchrun", "single"],
                   choices=["deepspeed", "torchrun", "single"])
    p.add_argument("--json", default=None, help="write the counts and every run's row here")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a run counts as hung")
    args = p.parse_args()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    rows, start = [], time.time()
    for name in args.launchers:
        for i in range(args.runs):
            row = one_run(name, i, args.timeout, env)
            rows.append(row)
            print(f"{name:<9} run {i + 1:>3}/{args.runs}: exit {row['rc']} in {row['seconds']:.0f} s"
                  f"{'' if row['checkpointed'] else ' (no final checkpoint)'}", flush=True)
    counts = {name: dict(collections.Counter(str(r["rc"]) for r in rows if r["launcher"] == name))
              for name in args.launchers}
    print(f"\n{'launcher':<10} {'runs':>5} {'exit 0':>7}  other exit statuses")
    for name in args.launchers:
        c = counts[name]
        others = ", ".join(f"{k}: {v}" for k, v in c.items() if k != "0") or "-"
        print(f"{name:<10} {sum(c.values()):>5} {c.get('0', 0):>7}  {others}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "overrides": OVERRIDES,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
            "wall_s": round(time.time() - start), "counts": counts, "runs": rows,
        }, indent=1))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

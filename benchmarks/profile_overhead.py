"""Overhead of the step-time breakdown (log.breakdown): the trainer run side by side with it
on and off, images/s compared.

    python benchmarks/profile_overhead.py [--stage pretrain] [--steps 60] [--every 10]
        [--repeats 3] [--json FILE] [--markdown FILE] [override ...]

Runs `epg_fast/train.py` (single process, the stage's demo preset unless an override says
otherwise) 2 x repeats times, alternating on/off so that drift in the machine's load hits
both alike. Per run: the median `img_per_s` of its metric records, the first one (start-up,
first-step allocation) left out. Reported: the median over repeats per setting, the
overhead (1 - on/off), and the mean `time/*` shares of the runs with the breakdown on (an
example breakdown for the README). Timing belongs here, not in tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "epg_fast" / "train.py"


def run_trainer(stage: str, steps: int, every: int, breakdown: bool, run_dir: Path, overrides: list[str]) -> list[dict]:
    cmd = [sys.executable, str(TRAIN), "--stage", stage, f"train.total_steps={steps}", f"log.every={every}",
           f"train.save_every={steps}", f"train.run_dir={run_dir}", "train.resume=none", "log.tensorboard=false",
           "log.progress=false", f"log.breakdown={str(breakdown).lower()}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"trainer failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def measure(stage: str, steps: int, every: int, repeats: int, overrides: list[str]) -> dict:
    img_s: dict[bool, list[float]] = {True: [], False: []}
    shares: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for breakdown in (True, False):
                records = run_trainer(stage, steps, every, breakdown, Path(tmp) / f"{i}-{breakdown}", overrides)
                if len(records) < 2:
                    sys.exit(f"need at least 2 metric records per run; raise --steps above 2 x --every ({every})")
                img_s[breakdown].append(statistics.median(r["img_per_s"] for r in records[1:]))
                shares += [{k: v for k, v in r.items() if k.startswith("time/")} for r in records[1:]] if breakdown else []
                print(f"run {i} breakdown={breakdown}: {img_s[breakdown][-1]:.1f} img/s", file=sys.stderr)
    on, off = statistics.median(img_s[True]), statistics.median(img_s[False])
    keys = sorted({k for s in shares for k in s})
    mean_shares = {k: statistics.fmean(s.get(k, 0.0) for s in shares) for k in keys}
    return {"stage": stage, "steps": steps, "every": every, "repeats": repeats, "overrides": overrides,
            "img_per_s": {"breakdown_on": img_s[True], "breakdown_off": img_s[False]},
            "median_on": on, "median_off": off, "overhead": 1 - on / off, "mean_shares": mean_shares}


def markdown(result: dict) -> str:
    lines = [f"Breakdown overhead, `{result['stage']}` ({result['steps']} steps, log.every={result['every']}, "
             f"{result['repeats']} repeats; {' '.join(result['overrides']) or 'demo preset'}):", "",
             "| log.breakdown | img/s (median) | runs |", "|---|---:|---|"]
    for key, label in (("on", "true"), ("off", "false")):
        runs = ", ".join(f"{v:.1f}" for v in result["img_per_s"][f"breakdown_{key}"])
        lines.append(f"| {label} | {result[f'median_{key}']:.1f} | {runs} |")
    lines += ["", f"Overhead: {100 * result['overhead']:+.2f}% (1 - on/off).", "",
              "Mean shares with the breakdown on:", "", "| phase | share |", "|---|---:|"]
    for key, value in sorted(result["mean_shares"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {key} | {100 * value:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="pretrain")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("overrides", nargs="*", help="trainer overrides, e.g. model.depth=2")
    args = p.parse_args(argv)
    result = measure(args.stage, args.steps, args.every, args.repeats, args.overrides)
    table = markdown(result)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

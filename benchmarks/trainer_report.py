"""The device suite's trainer runs in numbers: the metrics.jsonl rows of each run folder
<work>/run_<name> into one JSON file, and a Markdown table of the last logging window (the
steady state; the first holds compilation and warm-up) with each run's profiler summary.

    python benchmarks/trainer_report.py WORK_DIR OUT.json > trainer.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = ("denoise", "pretrain")
KEYS = ("img_per_s", "tflops_per_gpu", "mfu", "gpu/max_mem_gb", "step_time_s", "data_wait_frac")


def main(work: Path, out: Path) -> None:
    runs = {}
    for name in RUNS:
        path = work / f"run_{name}" / "metrics.jsonl"
        runs[name] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    out.write_text(json.dumps(runs, indent=1) + "\n")
    print("The trainer's own metrics (metrics.jsonl), last logging window:\n")
    print("| run | step | " + " | ".join(KEYS) + " |")
    print("|---|---:|" + "---:|" * len(KEYS))
    for name, rows in runs.items():
        last = rows[-1] if rows else {}
        cells = [f"{last[k]:.4g}" if isinstance(last.get(k), (int, float)) else "-" for k in KEYS]
        print(f"| {name} | {last.get('step', 'no metrics')} | " + " | ".join(cells) + " |")
    for name in RUNS:
        summary = work / f"run_{name}" / "profile" / "summary.md"
        if summary.exists():
            text = summary.read_text().replace("\n# ", "\n#### ").replace("\n## ", "\n#### ")
            print(f"\n### Profiler summary, {name}\n\n{text}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

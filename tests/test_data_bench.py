"""benchmarks/data.py runs end to end on the demo data (a smoke test; no timing asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import data as data_bench  # noqa: E402


def test_data_bench_smoke(demo_root, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    data_bench.main(["--root", str(demo_root), "--image-size", "16", "--batch", "4", "--steps", "1", "--warmup", "1",
                     "--workers", "0", "--paths", "pil", "device", "raw-device", "--raw", str(tmp_path / "raw"),
                     "--device", "cpu", "--json", str(out), "--md", str(md)])
    payload = json.loads(out.read_text())
    kinds = {(r["kind"], r["mode"], r["path"]) for r in payload["rows"]}
    assert ("augment", "pretrain", "raw-device") in kinds and ("wait", "finetune", "pil") in kinds
    assert ("augment", "finetune", "pil") not in kinds  # the PIL path has no device work
    assert payload["command"].startswith("python benchmarks/data.py --root")
    table = md.read_text()
    assert table.count("| pretrain |") == 3 and "| 1.0x |" in table

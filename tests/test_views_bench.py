"""benchmarks/views_bench.py runs end to end on the demo data (a smoke test; no timing asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import views_bench  # noqa: E402


def test_views_bench_smoke(demo_root, tmp_path):
    out = tmp_path / "r.json"
    views_bench.main(["--root", str(demo_root), "--images", "8", "--batch", "4", "--image-size", "32",
                      "--raw", str(tmp_path / "raw"), "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    paths = {(r["mode"], r["path"]) for r in rows}
    assert ("pretrain", "device-crops+augment") in paths and ("finetune", "raw") in paths
    assert all(r["cpu_ms_per_image"] > 0 for r in rows)
    assert [r["speedup_vs_pil"] for r in rows if r["path"] == "pil"] == [1.0, 1.0]

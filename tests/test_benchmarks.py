"""The benchmark harnesses run (CPU smoke mode) and report every op."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernel_benchmark_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "timings meaningless" in proc.stdout
    report = json.loads(out.read_text())
    text = json.dumps(report)
    for op in ("ema", "patch_embed", "ln_enc", "gated_dec"):
        assert op in text, op
    assert "missing" not in text

"""The kernel benchmark harness runs (CPU smoke mode) and reports every op: each variant
timed, the Triton result checked against the eager reference, no target judged off a GPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPS = ("ema", "patch_embed", "ln_enc", "adaln_dec", "gated_dec")
MODES = {"ema": {"update"}} | {op: {"fwd", "fwd+bwd"} for op in OPS[1:]}


def test_kernel_benchmark_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "timings meaningless" in proc.stdout
    report = json.loads(out.read_text())
    assert report["meta"]["smoke"] is True
    assert "apex baseline skipped" in report["meta"]["apex"]  # never installed here
    assert report["ops"] == {op: "ok" for op in OPS}
    rows = report["results"]
    assert not [r for r in rows if "error" in r]
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in rows)
    for op in OPS:
        triton = {r["mode"]: r for r in rows if r["op"] == op and r["variant"] == "triton"}
        assert set(triton) == MODES[op], op
        assert {r["variant"] for r in rows if r["op"] == op} > {"triton"}, f"{op}: no baseline timed"
        for mode, r in triton.items():
            # bf16 operands in the smoke shapes: agreement to a few bf16 ulps
            assert isinstance(r["err"], float) and r["err"] < 3e-2, (op, mode, r["err"])
    assert report["targets"] and all(t["status"] == "n/a (not a GPU run)" for t in report["targets"])


def test_attention_benchmark_smoke(tmp_path):
    out = tmp_path / "attention.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {(r["backend"], r["mode"]) for r in rows} == {(b, m) for b in ("math", "sdpa") for m in ("fwd", "fwd+bwd")}
    assert not [r for r in rows if "error" in r] and all(r["ms"] > 0 for r in rows)
    assert {r["path"] for r in rows if r["backend"] == "math"} == {"sdpa-math"}
    assert all(r["err"] < 1e-5 for r in rows if r["mode"] == "fwd")  # fp32 against the fp32 math backend

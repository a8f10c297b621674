"""The training-throughput benchmark (benchmarks/throughput.py): its CPU smoke run reports
every workload x variant with the op paths it took, and its arithmetic helpers are right."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epg_fast.metrics import peak_tflops
from epg_fast.ops import Ops

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "throughput.py"
FUSED_OPS = ("layer_norm", "adaln_norm", "gated_adaln_norm", "patch_embed", "ema")
# The fused ops each workload's step goes through (DiT: at least these; its model is young).
USED_OPS = {
    "pretrain": {"layer_norm", "patch_embed", "ema"},
    "denoise": {"layer_norm", "adaln_norm", "gated_adaln_norm", "patch_embed", "ema"},
    "dit": {"patch_embed", "ema"},
}


def _load():
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


tp = _load()


# ----------------------------------------------------------------------------- the smoke run


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "throughput.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_smoke_is_labelled_cpu_and_judges_nothing(smoke_report):
    report, stdout = smoke_report
    assert "CPU" in report["meta"]["label"] and "meaningless" in report["meta"]["label"]
    assert "numbers meaningless" in stdout
    assert {"meta", "workloads", "runs", "targets"} <= set(report)
    assert all(t["status"].startswith("n/a") for t in report["targets"])  # judged on a GPU only


def test_smoke_reports_every_workload_and_variant(smoke_report):
    report, _ = smoke_report
    runs = {(r["workload"], r["variant"]): r for r in report["runs"]}
    assert set(runs) == {(w, v) for w in tp.WORKLOADS for v in tp.VARIANTS}
    for key, r in runs.items():
        assert r["status"], key  # a recorded reason when it did not run
        if r["status"] == "ok":
            assert r["images_per_s"] > 0 and r["step_ms"] > 0, key
            assert r["loss_finite"], key
    for w in ("pretrain", "denoise"):  # nothing optional in these: they must run
        for v in ("reference", "fast"):
            assert runs[w, v]["status"] == "ok", (w, v, runs[w, v]["status"])
    # DiT runs, or is reported missing when its model does not import.
    assert runs["dit", "fast"]["status"] == "ok" or runs["dit", "fast"]["status"].startswith("missing")


def test_smoke_records_the_op_paths_of_each_variant(smoke_report):
    report, _ = smoke_report
    for r in report["runs"]:
        if r["status"] != "ok" or r["variant"] == "compile":
            continue
        fused = {op: path for op, path in r["paths"].items() if op in FUSED_OPS}
        assert USED_OPS[r["workload"]] <= set(fused), (r["workload"], r["variant"], r["paths"])
        if r["variant"] == "fast":
            assert set(fused.values()) == {"triton"}, (r["workload"], r["paths"])
            assert r["setup"]["kernels"] == "triton" and r["setup"]["consistency_target"] == "no_grad"
        else:
            assert fused.pop("ema") == "python loop (per parameter)"
            assert set(fused.values()) == {"reference"}, (r["workload"], r["paths"])
            assert r["setup"]["consistency_target"] == "detach"
        assert r["paths"]["attention"] in ("sdpa", "flash-attn")


# ----------------------------------------------------------------------------- helpers


def test_tflops_and_mfu_arithmetic():
    # 1 G multiply-adds per image at 1000 images/s = 2 TFLOP/s of hardware work.
    assert tp.achieved_tflops(10**9, 1000.0) == pytest.approx(2.0)
    assert tp.achieved_tflops(None, 1000.0) is None and tp.achieved_tflops(10**9, None) is None
    assert tp.mfu(395.0, 790.0) == pytest.approx(0.5)
    assert tp.mfu(1.0, None) is None and tp.mfu(None, 790.0) is None


def test_ema_loop_equals_ops_ema_update():
    g = torch.Generator().manual_seed(0)
    shapes = [(7,), (33, 65), (4097,), (2, 3, 5)]
    onlines = [torch.randn(s, generator=g) for s in shapes]
    targets = [torch.randn(s, generator=g) for s in shapes]
    for mode in ("reference", "triton"):  # tests/conftest.py runs Triton through the interpreter
        ops = Ops(mode)
        a, b = [t.clone() for t in targets], [t.clone() for t in targets]
        tp.ema_loop(a, onlines, 0.99)
        ops.ema_update(b, onlines, 0.99)
        assert ops.paths()["ema"].startswith(mode)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_summarize_samples():
    samples = [{"gpu/power_w": 100.0, "gpu/util": 90.0}, {"gpu/power_w": 300.0, "gpu/util": 100.0}, {}]
    s = tp.summarize_samples(samples)
    assert s["power_w"] == {"mean": 200.0, "max": 300.0, "n": 2}
    assert s["util"]["mean"] == 95.0
    assert tp.summarize_samples([]) == {}


def test_skipped_steps_from_the_scale():
    assert tp.skipped_steps(1024.0, 1024.0) == 0
    assert tp.skipped_steps(1024.0, 2048.0) == 0  # grew: nothing skipped
    assert tp.skipped_steps(1024.0, 256.0) == 2


def test_sd_vae_encoder_macs():
    macs = tp.sd_vae_encoder_macs(256)
    assert 130e9 < macs < 140e9  # ~136 G multiply-adds per 256 px image
    # convolutions scale with the pixels; the middle block's attention with their square
    assert 4 * macs < tp.sd_vae_encoder_macs(512) < 4.2 * macs


def _run(workload, variant, ips=None, mfu=None):
    return dict(workload=workload, variant=variant, images_per_s=ips, mfu=mfu, status="ok" if ips else "OOM")


def test_speedups_and_targets():
    runs = [_run("pretrain", "reference", 100.0, 0.2), _run("pretrain", "fast", 160.0, 0.46),
            _run("pretrain", "compile", 170.0, 0.49), _run("denoise", "reference", 50.0, 0.3),
            _run("denoise", "fast", 80.0, 0.50), _run("denoise", "compile")]
    tp.add_speedups(runs)
    assert runs[1]["speedup_vs_reference"] == pytest.approx(1.6)
    assert runs[5]["speedup_vs_reference"] is None
    targets = {t["name"]: t for t in tp.evaluate_targets(runs, judged=True)}
    assert targets["pretrain_mfu"]["status"] == "PASS" and targets["pretrain_mfu"]["variant"] == "compile"
    assert targets["denoise_mfu"]["status"] == "FAIL" and targets["denoise_mfu"]["value"] == 0.50
    assert targets["pretrain_speedup"]["status"] == "PASS"
    assert all(t["status"].startswith("n/a") for t in tp.evaluate_targets(runs, judged=False))
    assert all(t["status"].startswith("n/a") for t in tp.evaluate_targets([], judged=True))


def test_parse_batches_and_first_line():
    assert tp.parse_batches([], {"a": 1, "b": 2}) == {"a": 1, "b": 2}
    assert tp.parse_batches(["8"], {"a": 1, "b": 2}) == {"a": 8, "b": 8}
    assert tp.parse_batches(["a=3,b=4"], {"a": 1, "b": 2}) == {"a": 3, "b": 4}
    with pytest.raises(ValueError, match="unknown workload"):
        tp.parse_batches(["c=3"], {"a": 1})
    assert tp.first_line("Error('first\\nsecond')") == "Error('first"
    assert tp.first_line("x" * 500, limit=10) == "x" * 10 + "..."


def test_datasheet_peak_is_the_trainers():
    """The benchmark's datasheet MFU and the trainer's logged MFU divide by the same H200 peak."""
    assert tp.DATASHEET_BF16_TFLOPS == peak_tflops("NVIDIA H200")


def _args():
    """The parsed arguments run_one reads, as main() completes them for a CPU smoke run."""
    args = tp.build_parser().parse_args(["--smoke"])
    args.warmup, args.steps, args.compile_backend = 1, 1, "aot_eager"
    return args


def test_run_one_records_oom_and_missing():
    def out_of_memory(setup, dev, ops):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    w = tp.Workload("denoise", "t", 2, out_of_memory, lambda *a: None, None, "")
    rec = tp.run_one(w, "fast", _args(), torch.device("cpu"), None, None)
    assert rec["status"] == "OOM" and rec["workload"] == "denoise" and rec["setup"]["kernels"] == "triton"

    def broken(setup, dev, ops):
        raise ValueError("bad\nsecond line")

    rec = tp.run_one(tp.Workload("dit", "t", 2, broken, None, None, ""), "reference", _args(),
                     torch.device("cpu"), None, None)
    assert rec["status"] == "error: ValueError: bad"
    missing = tp.Workload("dit", "t", 2, None, None, None, "", missing="ImportError: no dit")
    assert tp.run_one(missing, "fast", _args(), torch.device("cpu"), None, None)["status"] == "missing (ImportError: no dit)"

"""Throughput profiling (epg_fast/profiling.py): the step-time breakdown's shares add up and
need no host synchronisation off logging steps, a requested trace loads and names the
matmuls and LayerNorms, and the CUDA-only memory tools say so on CPU."""

import gzip
import importlib.util
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from epg_fast import profiling
from epg_fast.config import ConfigError
from epg_fast.stages import load_config
from epg_fast.profiling import (
    HOST_PHASES, PHASES, HostClock, MemorySnapshot, Profiling, StepTimer, categorise, format_breakdown,
    memory_report, parse_profile_spec,
)

CPU = torch.device("cpu")
STEP_PHASES = {"data_wait": 0.001, "h2d": 0.0, "forward": 0.02, "backward": 0.01, "optimizer": 0.002, "ema": 0.001}


def run_loop(timer: StepTimer, steps: int, checkpoint_at: int | None = None, sleep=time.sleep) -> list[dict]:
    """A toy training loop with sleeps for phases and 5 ms between them; returns the shares."""
    records = []
    for step in range(steps):
        timer.begin_step(step)
        for name, seconds in STEP_PHASES.items():
            with timer.phase(name):
                sleep(seconds)
        sleep(0.005)  # outside every phase: time/other
        if timer.is_log_step(step):
            with timer.phase("metrics"):
                records.append(timer.shares())
        if step == checkpoint_at:
            with timer.phase("checkpoint"):
                sleep(0.03)
    return records


def check_record(row: dict) -> None:
    assert set(row) == {f"time/{p}" for p in PHASES} | {"time/other"}
    assert all(v >= 0 for v in row.values())
    assert sum(row.values()) == pytest.approx(1.0, abs=1e-9)


def test_shares_sum_to_one_with_real_sleeps():
    timer = StepTimer(CPU, every=5, end=10, timed_steps=2)
    records = run_loop(timer, 10, checkpoint_at=6)
    assert len(records) == 2
    for row in records:
        check_record(row)
    assert records[0]["time/checkpoint"] == 0 and records[1]["time/checkpoint"] > 0


def test_shares_are_exact_on_a_fake_clock(monkeypatch):
    # Time advances only by the toy loop's sleeps: every share is known exactly.
    now = [0.0]
    monkeypatch.setattr(profiling, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    sleep = lambda seconds: now.__setitem__(0, now[0] + seconds)
    # Two timed steps per window of 5: the checkpoint at step 6 is outside them (host-timed).
    timer = StepTimer(CPU, every=5, end=10, timed_steps=2)
    first, second = run_loop(timer, 10, checkpoint_at=6, sleep=sleep)
    step_s = sum(STEP_PHASES.values()) + 0.005
    for row, checkpoint in ((first, 0.0), (second, 0.03)):
        check_record(row)
        rest = 5 * step_s / (5 * step_s + checkpoint)
        assert row["time/checkpoint"] == pytest.approx(1 - rest)
        assert row["time/other"] == pytest.approx(rest * 0.005 / step_s)
        for name, seconds in STEP_PHASES.items():
            assert row[f"time/{name}"] == pytest.approx(rest * seconds / step_s)
    assert format_breakdown(second).startswith("forward 44% backward 22%")


def test_disabled_timer_records_nothing():
    timer = StepTimer(CPU, every=2, end=4, enabled=False)
    records = run_loop(timer, 4)
    assert records == [{}, {}]
    assert timer._spans == [] and timer._host == dict.fromkeys(HOST_PHASES, 0.0)


def test_phases_do_not_nest_and_names_are_checked():
    timer = StepTimer(CPU, every=1, end=2)
    timer.begin_step(0)
    with pytest.raises(KeyError):
        timer.phase("fwd")
    with pytest.raises(RuntimeError, match="do not nest"):
        with timer.phase("forward"):
            with timer.phase("backward"):
                pass


class CountingClock(HostClock):
    """The CUDA clock's contract on the host: counts stamps (event records) and waits (syncs)."""

    def __init__(self):
        self.stamps = self.waits = 0

    def stamp(self):
        self.stamps += 1
        return super().stamp()

    def wait(self, stamp):
        self.waits += 1


def test_device_clock_waits_only_at_logging_steps():
    clock = CountingClock()
    timer = StepTimer(CPU, every=5, end=10, timed_steps=2, clock=clock)
    stamps_per_step, waits_per_step = [], []
    for step in range(10):
        before = (clock.stamps, clock.waits)
        timer.begin_step(step)
        for name in STEP_PHASES:
            with timer.phase(name):
                pass
        if timer.is_log_step(step):
            timer.shares()
        stamps_per_step.append(clock.stamps - before[0])
        waits_per_step.append(clock.waits - before[1])
    assert waits_per_step == [0, 0, 0, 0, 1] * 2
    # Events only on the last two steps of each window (2 per phase; +1 at the read).
    n = 2 * len(STEP_PHASES)
    assert stamps_per_step == [0, 0, 0, n, n + 1] * 2


class SyncCounter(TorchDispatchMode):
    """Counts device-to-host reads (`.item()`, `float(t)`, `if t:`)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_breakdown_adds_no_sync_on_non_logging_steps():
    model = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    timer = StepTimer(CPU, every=4, end=8)
    counter = SyncCounter()
    for step in range(8):
        timer.begin_step(step)
        log_now = timer.is_log_step(step)
        with SyncCounter() if log_now else counter:
            with timer.phase("forward"):
                loss = model(x).square().mean()
            with timer.phase("backward"):
                loss.backward()
        if log_now:
            timer.shares()
    assert counter.syncs == 0


def test_profile_spec():
    assert parse_profile_spec(None) is None
    assert parse_profile_spec("10:5") == (10, 5) and parse_profile_spec(" 0 : 1 ") == (0, 1)
    for bad in ("10", "10:0", "a:b", "1:2:3", "-1:2"):
        with pytest.raises(ValueError, match="is not STEP:N"):
            parse_profile_spec(bad)


def test_profile_config_keys():
    cfg = load_config(None, ["log.profile=10:5", "log.memory_snapshot=3", "log.breakdown=false"])
    assert (cfg.log.profile, cfg.log.memory_snapshot, cfg.log.breakdown, cfg.log.profile_stack) == ("10:5", 3, False, False)
    for override, message in (("log.profile=x:1", "log.profile='x:1' is not STEP:N"),
                              ("log.memory_snapshot=-1", "log.memory_snapshot must be a step >= 0")):
        with pytest.raises(ConfigError, match=message) as err:
            load_config(None, [override])
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name,category", [
    ("aten::addmm", "gemm"), ("aten::mm", "gemm"), ("sm90_xmma_gemm_bf16bf16_bf16f32", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm>", "gemm"), ("nvjet_tst_128x256", "gemm"),
    ("aten::native_layer_norm", "layernorm"), ("_ln_fwd_kernel", "triton (ours)"), ("_ema_kernel", "triton (ours)"),
    ("_LayerNormFnBackward", "triton (ours)"), ("triton_poi_fused_add_0", "triton (compiled)"),
    ("aten::_scaled_dot_product_flash_attention", "attention"), ("void flash::flash_fwd_kernel<Flash_fwd>", "attention"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"), ("c10d::allreduce_", "communication"),
    ("Optimizer.step#AdamW.step", "optimizer"), ("aten::_foreach_mul_", "optimizer"), ("aten::gelu", "other"),
])
def test_categories(name, category):
    assert categorise(name) == category


def log_cfg(**kw):
    values = dict(every=2, breakdown=True, profile=None, profile_stack=False, memory_snapshot=None)
    return SimpleNamespace(**{**values, **kw})


def test_trace_of_requested_steps_loads_and_names_matmuls_and_layernorm(tmp_path):
    model = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(16, 32)
    prof = Profiling(log_cfg(profile="1:2"), tmp_path, CPU, 0, 4, model, None, optimizer)
    profile_dir = tmp_path / "profile"
    for step in range(4):
        prof.begin_step(step)
        with prof.phase("forward"):
            loss = model(x).square().mean()
        with prof.phase("backward"):
            loss.backward()
        with prof.phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad()
        if prof.is_log_step(step):
            assert sum(prof.shares().values()) == pytest.approx(1.0)
        prof.end_step(step)
        assert (profile_dir / "summary.json").exists() == (step >= 2)  # written after step 2
    prof.close()
    with gzip.open(profile_dir / "trace_rank0.json.gz", "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"aten::addmm", "aten::native_layer_norm"} <= names
    summary = json.loads((profile_dir / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["aten::addmm"]["category"] == "gemm" and rows["aten::addmm"]["calls"] == 2 * 2  # 2 Linears x 2 steps
    assert any("layer_norm" in name for name in rows)
    assert {"gemm", "layernorm", "optimizer"} <= set(summary["categories"])
    # AdamW's per-tensor ops on CPU are named like any arithmetic; their caller says optimiser.
    assert rows["aten::addcdiv_"]["category"] == "optimizer"
    assert categorise("phase:ema") == "ema" and categorise("phase:h2d") == "data"
    assert "aten::addmm" in (profile_dir / "summary.md").read_text()


def test_trace_cut_short_by_the_end_of_the_run_is_still_written(tmp_path):
    model = torch.nn.Linear(4, 4)
    prof = Profiling(log_cfg(profile="1:10"), tmp_path, CPU, 0, 3, model, None, torch.optim.SGD(model.parameters()))
    for step in range(3):
        prof.begin_step(step)
        model(torch.randn(2, 4)).sum().backward()
        prof.end_step(step)
    assert not (tmp_path / "profile").exists()
    prof.close()
    assert (tmp_path / "profile" / "trace_rank0.json.gz").is_file()


def test_memory_tools_say_cuda_only_on_cpu(tmp_path, caplog):
    model = torch.nn.Linear(4, 4)
    with caplog.at_level(logging.INFO, logger="epg_fast"):
        prof = Profiling(log_cfg(memory_snapshot=0), tmp_path, CPU, 0, 2, model, None, torch.optim.SGD(model.parameters()))
        for step in range(2):
            prof.begin_step(step)
            prof.end_step(step)
        prof.close()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("log.memory_snapshot: CUDA only; nothing recorded on cpu") == 1
    assert messages.count("memory per component: CUDA only") == 1
    assert not (tmp_path / "profile").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_memory_report_and_snapshot_on_cuda(tmp_path):
    dev = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)).to(dev)
    shadow = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)).to(dev)
    optimizer = torch.optim.AdamW(model.parameters())
    snapshot = MemorySnapshot(0, tmp_path, dev)
    snapshot.begin_step(0)
    model(torch.randn(64, 256, device=dev)).square().mean().backward()
    optimizer.step()
    snapshot.end_step(0)
    report = memory_report(model, shadow, optimizer, dev)
    param_gib = sum(p.numel() * 4 for p in model.parameters()) / 2**30
    assert report["parameters"] == pytest.approx(param_gib)
    assert report["shadow"] == pytest.approx(param_gib)
    assert report["optimizer state"] == pytest.approx(2 * param_gib)  # exp_avg, exp_avg_sq
    assert report["master weights"] == 0
    assert (tmp_path / "profile" / "memory_step_0.pickle").stat().st_size > 0


def test_overhead_benchmark_compares_medians_without_the_first_record(monkeypatch):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_overhead.py"
    spec = importlib.util.spec_from_file_location("profile_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def fake_run(stage, steps, every, breakdown, run_dir, overrides):
        first = {"img_per_s": 1.0}  # start-up record: left out
        if breakdown:
            return [first, {"img_per_s": 90.0, "time/forward": 0.6, "time/other": 0.4},
                    {"img_per_s": 90.0, "time/forward": 0.4, "time/other": 0.6}]
        return [first, {"img_per_s": 100.0}, {"img_per_s": 100.0}]

    monkeypatch.setattr(bench, "run_trainer", fake_run)
    result = bench.measure("pretrain", 30, 10, 2, [])
    assert result["median_on"] == 90.0 and result["median_off"] == 100.0
    assert result["overhead"] == pytest.approx(0.1)
    assert result["mean_shares"] == pytest.approx({"time/forward": 0.5, "time/other": 0.5})
    assert "+10.00%" in bench.markdown(result)

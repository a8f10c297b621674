"""Throughput profiling from the trainer itself: where each step's time goes, a torch.profiler
trace on request, and where the memory goes.

- `StepTimer` (log.breakdown): the loop wraps its phases in `timer.phase(name)`; every
  metrics record gets `time/<phase>` shares of the logging window's wall time (summing to 1
  with `time/other`). Rare, synchronising phases (metrics, sampling, checkpoint) are timed
  on the host on every step; the per-step phases are timed on the device timeline (CUDA
  events; perf_counter on CPU) over the last few steps of each window only, and read at the
  logging step, which synchronises anyway: no host synchronisation on other steps.
- `TraceRecorder` (log.profile=STEP:N, log.profile_stack): a torch.profiler trace of N steps
  from STEP into <run_dir>/profile/, with a table of the top operators/kernels by self time,
  by category (our Triton kernels, attention, GEMMs, LayerNorm, optimiser, communication).
- `memory_report` (start-up, CUDA) and `MemorySnapshot` (log.memory_snapshot=STEP, CUDA):
  bytes per component, and the allocator's history of one step for the memory viewer.
`Profiling` bundles the three for the training loop.
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterable

import torch

from epg_fast.config import parse_profile_spec

log = logging.getLogger("epg_fast")

# The loop's phases, in step order. "comm" is the trainer's own collectives; DeepSpeed's
# gradient all-reduce / reduce-scatter runs inside engine.backward (and ZeRO's parameter
# all-gathers inside forward and the optimiser step), where it cannot be separated without
# synchronising: the profiler summary's "communication" category shows it.
PHASES = ("data_wait", "h2d", "comm", "forward", "backward", "optimizer", "ema", "metrics", "sampling", "checkpoint")
# Rare and synchronising (they copy to the host or write files): timed on the host on
# every step they happen, so a checkpoint outside the timed steps is still counted.
HOST_PHASES = frozenset({"metrics", "sampling", "checkpoint"})
_NO_TIMING = nullcontext()


# ---------------------------------------------------------------------------------------
# Step-time breakdown


class HostClock:
    """perf_counter stamps: the timeline of the CPU (where a CPU run's device work runs)."""

    def stamp(self) -> float:
        return time.perf_counter()

    def wait(self, stamp: float) -> None:
        pass

    def seconds(self, begin: float, end: float) -> float:
        return end - begin

    def release(self) -> None:
        pass


class CudaClock:
    """CUDA events on the current stream: the device's timeline. Recording does not block;
    `wait` (one event synchronise) is called at logging steps only. Events are reused."""

    def __init__(self) -> None:
        self.free: list[torch.cuda.Event] = []
        self.taken: list[torch.cuda.Event] = []

    def stamp(self) -> torch.cuda.Event:
        event = self.free.pop() if self.free else torch.cuda.Event(enable_timing=True)
        event.record()
        self.taken.append(event)
        return event

    def wait(self, stamp: torch.cuda.Event) -> None:
        stamp.synchronize()

    def seconds(self, begin: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return begin.elapsed_time(end) / 1e3

    def release(self) -> None:
        self.free.extend(self.taken)
        self.taken.clear()


class _Phase:
    """Context manager for one phase name (reused: phases do not nest)."""

    __slots__ = ("timer", "name")

    def __init__(self, timer: StepTimer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.timer._enter(self.name)

    def __exit__(self, *exc: Any) -> None:
        self.timer._exit(self.name)


class StepTimer:
    """Shares of a logging window's wall time per phase of the step.

    Window wall time W (host) = host phases H_p (exact, every step) + the rest R = W - sum H_p.
    R is split in the proportions of the device timeline of the window's last `timed_steps`
    steps: a phase's share is R/W x (its device time / the timed span less its host
    phases), and the gaps between phases are `time/other`. On CUDA a device interval is how
    far the GPU timeline advanced during the phase: a data wait costs only the time the GPU
    sat idle waiting for it, and a launch-bound phase shows its launch time.
    """

    def __init__(self, device: torch.device, every: int, end: int, enabled: bool = True,
                 timed_steps: int | None = None, clock: HostClock | CudaClock | None = None) -> None:
        self.enabled, self.every, self.end = enabled, every, end
        self.clock = clock or (CudaClock() if device.type == "cuda" else HostClock())
        # perf_counter costs nothing: time every step of the window on the host clock.
        self.timed_steps = timed_steps or (every if isinstance(self.clock, HostClock) else min(every, 4))
        self._phases = {name: _Phase(self, name) for name in PHASES}
        self._timed = False
        self._current: tuple[str, float | None, Any] | None = None  # (name, host start, device begin)
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._window_start = now
        self._host = dict.fromkeys(HOST_PHASES, 0.0)
        self._spans: list[tuple[str, Any, Any]] = []  # (phase, begin, end) on the device timeline
        self._first: Any = None
        self.clock.release()

    def is_log_step(self, step: int) -> bool:
        """The loop's logging rule (0-based step index, before it is incremented)."""
        return (step + 1) % self.every == 0 or step + 1 == self.end

    def begin_step(self, step: int) -> None:
        if self.enabled:
            next_log = min(step + self.every - 1 - step % self.every, self.end - 1)
            self._timed = next_log - step < self.timed_steps

    def phase(self, name: str):
        """`with timer.phase("forward"): ...`; a no-op when disabled or nothing to time."""
        context = self._phases[name]  # KeyError on a misspelt phase
        if not self.enabled or (not self._timed and name not in HOST_PHASES):
            return _NO_TIMING
        return context

    def _enter(self, name: str) -> None:
        if self._current is not None:
            raise RuntimeError(f"phase '{name}' entered inside phase '{self._current[0]}' (phases do not nest)")
        begin = self.clock.stamp() if self._timed else None
        if self._first is None:
            self._first = begin
        self._current = (name, time.perf_counter() if name in HOST_PHASES else None, begin)

    def _exit(self, name: str) -> None:
        _, host_start, begin = self._current
        self._current = None
        if host_start is not None:
            self._host[name] += time.perf_counter() - host_start
        if begin is not None:
            self._spans.append((name, begin, self.clock.stamp()))

    def shares(self) -> dict[str, float]:
        """`time/<phase>` shares of the window since the last call; call at logging steps
        only (it waits for the device to reach the last event). A phase in progress is
        split: its part so far counts here, the rest in the next window."""
        if not self.enabled:
            return {}
        now = time.perf_counter()
        end = self.clock.stamp() if self._first is not None else None
        if self._current is not None:
            name, host_start, begin = self._current
            if host_start is not None:
                self._host[name] += now - host_start
            if begin is not None:
                self._spans.append((name, begin, end))
            self._current = (name, now if host_start is not None else None, None)
        device = dict.fromkeys(PHASES, 0.0)
        span = 0.0
        if end is not None:
            self.clock.wait(end)
            span = self.clock.seconds(self._first, end)
            for name, begin, stop in self._spans:
                device[name] += self.clock.seconds(begin, stop)
        wall = max(now - self._window_start, 1e-12)
        out = {f"time/{name}": self._host.get(name, 0.0) / wall for name in PHASES}
        rest = max(0.0, 1.0 - sum(self._host.values()) / wall)
        regular_span = span - sum(device[name] for name in HOST_PHASES)
        if regular_span > 0:
            for name in PHASES:
                if name not in HOST_PHASES:
                    out[f"time/{name}"] = rest * device[name] / regular_span
            measured = sum(device[name] for name in PHASES if name not in HOST_PHASES)
            out["time/other"] = rest * max(0.0, regular_span - measured) / regular_span
        else:  # no timed step in this window
            out["time/other"] = rest
        self._timed = False  # what is left of this step belongs to the next window
        self._reset(now)
        return out


def format_breakdown(row: dict[str, Any], top: int = 5) -> str:
    """'forward 41% backward 33% data_wait 10% ...' from a record's time/* shares."""
    shares = sorted(((v, k[5:]) for k, v in row.items() if k.startswith("time/") and v > 0), reverse=True)
    return " ".join(f"{name} {100 * v:.0f}%" for v, name in shares[:top])


# ---------------------------------------------------------------------------------------
# torch.profiler traces


# First match wins. Names as torch.profiler reports them: aten ops on CPU, kernel names on
# CUDA, `phase:<name>` for the loop's phases. Our Triton kernels are `_<op>_kernel`
# functions (kernels/*.py).
CATEGORIES = (
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|broadcast|c10d|gloo"),
    ("triton (ours)", r"^_\w+_kernel$|^_\w+Fn(Backward)?$"),
    ("triton (compiled)", r"^triton_"),
    ("attention", r"scaled_dot_product|flash|fmha|attention|attn"),
    ("gemm", r"aten::(mm|addmm|bmm|baddbmm|matmul|linear|_addmm_activation)$|gemm|cutlass|xmma|cublas|nvjet"),
    ("layernorm", r"layer_norm|layernorm"),
    ("optimizer", r"optimizer|adam|_foreach_|multi_tensor"),
    ("memory copy", r"memcpy|memset|aten::copy_|aten::_to_copy"),
    ("ema", r"^phase:ema$"),
    ("data", r"^phase:(data_wait|h2d)$"),
)
_CATEGORY_RES = [(name, re.compile(rx, re.IGNORECASE)) for name, rx in CATEGORIES]


def categorise(name: str) -> str:
    for category, rx in _CATEGORY_RES:
        if rx.search(name):
            return category
    return "other"


def summarise(events: Iterable[Any], wall_s: float, on_device: bool) -> dict[str, Any]:
    """Operators (CPU) or kernels (CUDA) by self time, with categories and shares of the
    profiled wall time. `events`: `prof.events()`. A CPU operator whose own name says
    nothing (aten::mul_, aten::add) takes the category of its nearest caller that does
    (Optimizer.step#AdamW.step, aten::linear, phase:ema)."""
    from torch.autograd import DeviceType

    totals: dict[tuple[str, str], list[float]] = {}
    for evt in events:
        # On CUDA: kernels, memcpy and memset; not the GPU-side spans of record_function
        # ranges (ProfilerStep#k), which would count their kernels twice.
        if on_device and (evt.device_type != DeviceType.CUDA or evt.is_user_annotation):
            continue
        if not on_device and evt.device_type != DeviceType.CPU:
            continue
        us = evt.self_device_time_total if on_device else evt.self_cpu_time_total
        if us <= 0:
            continue
        category, caller = categorise(evt.name), evt.cpu_parent
        while category == "other" and caller is not None:
            category, caller = categorise(caller.name), caller.cpu_parent
        total = totals.setdefault((evt.name, category), [0.0, 0])
        total[0] += us
        total[1] += 1
    rows = [{"name": name, "category": category, "calls": calls, "self_ms": us / 1e3, "share": us / 1e6 / wall_s}
            for (name, category), (us, calls) in totals.items()]
    rows.sort(key=lambda r: -r["self_ms"])
    categories: dict[str, float] = {}
    for r in rows:
        categories[r["category"]] = categories.get(r["category"], 0.0) + r["share"]
    return {"clock": "cuda kernels" if on_device else "cpu operators", "wall_s": wall_s, "rows": rows,
            "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1]))}


def summary_markdown(summary: dict[str, Any], top: int = 20) -> str:
    lines = [f"Top {summary['clock']} by self time, share of the profiled wall time "
             f"({summary['wall_s']:.3f} s):", "",
             "| category | share |", "|---|---:|"]
    lines += [f"| {c} | {100 * s:.1f}% |" for c, s in summary["categories"].items()]
    lines += ["", "| name | category | calls | self ms | share |", "|---|---|---:|---:|---:|"]
    for r in summary["rows"][:top]:
        name = r["name"] if len(r["name"]) <= 70 else r["name"][:67] + "..."
        lines.append(f"| `{name}` | {r['category']} | {r['calls']} | {r['self_ms']:.2f} | {100 * r['share']:.1f}% |")
    return "\n".join(lines) + "\n"


class TraceRecorder:
    """log.profile=STEP:N: torch.profiler over steps STEP..STEP+N-1 (CPU, and CUDA activities
    on CUDA; shapes, memory, Python stacks with log.profile_stack). Writes
    profile/trace_rank<r>.json.gz (chrome://tracing, ui.perfetto.dev) on every rank, and on
    rank 0 profile/summary.{md,json}, also logged."""

    def __init__(self, spec: str | None, run_dir: str | Path, device: torch.device, rank: int = 0,
                 with_stack: bool = False) -> None:
        self.window = parse_profile_spec(spec)
        self.dir = Path(run_dir) / "profile"
        self.device, self.rank, self.with_stack = device, rank, with_stack
        self.prof: torch.profiler.profile | None = None
        self.started_at = 0.0
        self.pending = self.window is not None

    def begin_step(self, step: int) -> None:
        if not self.pending:
            return
        start, n = self.window
        if step > start:
            log.warning("log.profile=%d:%d: this run starts at step %d, after %d; no trace", start, n, step, start)
            self.pending = False
        elif step == start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True,
                                               with_stack=self.with_stack)
            self.prof.__enter__()
            self.started_at = time.perf_counter()
            self.pending = False
            log.info("profiling steps %d-%d (%s)", start, start + n - 1, ", ".join(a.name for a in activities))

    def end_step(self, step: int) -> None:
        if self.prof is None:
            return
        self.prof.step()  # ProfilerStep#k markers in the trace
        if step + 1 == sum(self.window):
            self.close()

    def close(self) -> dict[str, Any] | None:
        """Stop (also when the run ended inside the window) and write the trace and summary."""
        if self.prof is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.started_at
        self.prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"trace_rank{self.rank}.json.gz"
        self.prof.export_chrome_trace(str(trace))
        summary = None
        if self.rank == 0:
            summary = summarise(self.prof.events(), wall, on_device=self.device.type == "cuda")
            table = summary_markdown(summary)
            (self.dir / "summary.md").write_text(table)
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=1))
            log.info("profile trace %s (open in ui.perfetto.dev)\n%s", trace, table)
        self.prof = None
        return summary


# ---------------------------------------------------------------------------------------
# Memory


def _storage_bytes(tensors: Iterable[Any], exclude: dict[int, int] | None = None) -> dict[int, int]:
    """Bytes per distinct storage (views of one flat buffer count once), skipping `exclude`."""
    found: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t) and t.device.type == "cuda":
            storage = t.untyped_storage()
            if storage.data_ptr() not in (exclude or {}):
                found[storage.data_ptr()] = storage.nbytes()
    return found


def memory_report(model: torch.nn.Module, shadow: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
                  device: torch.device, grad_partitions: int = 1) -> dict[str, float]:
    """GiB per component, measured from the tensors after the first step (optimiser state is
    allocated by it); gradients are an estimate (one per trainable parameter, /partitions
    under ZeRO 2-3: DeepSpeed frees or flattens them by the end of the step); activations =
    the peak so far less everything else."""
    weights = lambda m: [getattr(p, "ds_tensor", p) for p in m.parameters()]  # ZeRO-3: the shard
    params = _storage_bytes(weights(model))
    master = _storage_bytes((p for g in optimizer.param_groups for p in g["params"]), exclude=params)
    state = _storage_bytes((t for s in optimizer.state.values() for t in s.values()), exclude={**params, **master})
    shadow_bytes = _storage_bytes([*weights(shadow), *shadow.buffers()]) if shadow is not None else {}
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / grad_partitions
    parts = {"parameters": sum(params.values()), "gradients (estimate)": grads,
             "optimizer state": sum(state.values()), "master weights": sum(master.values()),
             "shadow": sum(shadow_bytes.values())}
    peak = torch.cuda.max_memory_allocated(device)
    parts["activations and workspace (peak - rest)"] = max(0.0, peak - sum(parts.values()))
    parts["peak allocated"] = peak
    parts["reserved"] = torch.cuda.memory_reserved(device)
    return {k: v / 2**30 for k, v in parts.items()}


class MemorySnapshot:
    """log.memory_snapshot=STEP (CUDA): the allocator's history of step STEP (every alloc and
    free with its stack) and the live blocks at its end, in
    profile/memory_step_STEP[_rank<r>].pickle for https://pytorch.org/memory_viz."""

    def __init__(self, step: int | None, run_dir: str | Path, device: torch.device, rank: int = 0) -> None:
        self.step = step if device.type == "cuda" else None
        if step is not None and device.type != "cuda":
            log.info("log.memory_snapshot: CUDA only; nothing recorded on %s", device.type)
        suffix = f"_rank{rank}" if rank else ""
        self.path = Path(run_dir) / "profile" / f"memory_step_{step}{suffix}.pickle"

    def begin_step(self, step: int) -> None:
        if step == self.step:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)

    def end_step(self, step: int) -> None:
        if step == self.step:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(self.path))
            torch.cuda.memory._record_memory_history(enabled=None)
            log.info("memory snapshot of step %d: %s (drop it on pytorch.org/memory_viz)", step, self.path)


# ---------------------------------------------------------------------------------------
# The loop's handle


class Profiling:
    """Everything above, driven by the loop:

        prof = Profiling(cfg.log, run_dir, device, rank, end, model, shadow, optimizer)
        while step < end:
            prof.begin_step(step)
            with prof.phase("data_wait"): ...
            ...
            if prof.is_log_step(step): row.update(prof.shares())
            prof.end_step(step)
        prof.close()
    """

    def __init__(self, log_cfg: Any, run_dir: str | Path, device: torch.device, rank: int, end: int,
                 model: torch.nn.Module, shadow: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
                 grad_partitions: int = 1) -> None:
        self.timer = StepTimer(device, log_cfg.every, end, enabled=log_cfg.breakdown)
        self.trace = TraceRecorder(log_cfg.profile, run_dir, device, rank, log_cfg.profile_stack)
        self.snapshot = MemorySnapshot(log_cfg.memory_snapshot, run_dir, device, rank)
        self.device, self.rank = device, rank
        self.memory_parts = (model, shadow, optimizer, grad_partitions)
        self.first_step = True
        self.is_log_step = self.timer.is_log_step
        self.shares = self.timer.shares

    def phase(self, name: str):
        """The timer's phase; while a trace records, also a `phase:<name>` range in it."""
        return self.timer.phase(name) if self.trace.prof is None else self._traced_phase(name)

    @contextmanager
    def _traced_phase(self, name: str):
        with self.timer.phase(name), torch.profiler.record_function(f"phase:{name}"):
            yield

    def begin_step(self, step: int) -> None:
        self.timer.begin_step(step)
        self.trace.begin_step(step)
        self.snapshot.begin_step(step)

    def end_step(self, step: int) -> None:
        self.trace.end_step(step)
        self.snapshot.end_step(step)
        if self.first_step:
            self.first_step = False
            self.log_memory()

    def log_memory(self) -> None:
        if self.rank != 0:
            return
        if self.device.type != "cuda":
            log.info("memory per component: CUDA only")
            return
        model, shadow, optimizer, partitions = self.memory_parts
        report = memory_report(model, shadow, optimizer, self.device, partitions)
        log.info("memory after the first step (GiB):\n%s", "\n".join(f"  {k:42s} {v:8.3f}" for k, v in report.items()))

    def close(self) -> None:
        self.trace.close()

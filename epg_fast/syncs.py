"""Counting host-device synchronisation points in a region of code, on CPU or on a GPU.

A training step should queue GPU work and return: every point where the host waits for the
device stalls the pipeline. `SyncCounter` records those points while the region runs:

- `scalar_read`: aten._local_scalar_dense, what `.item()`, `int(t)`, `float(t)`, `bool(t)` and
  `if t:` call; the host waits for the value;
- `upload`: a tensor made from Python data with an explicit device (`torch.tensor(list,
  device=...)`, `torch.as_tensor`, `torch.asarray`): a blocking copy from pageable memory;
- `device_copy`: a blocking copy between devices (`.to(device)`, `.cpu()`, `copy_` without
  `non_blocking=True`).

On a GPU only tensors on the device count. On CPU nothing can really synchronise, so with
`cpu_as_device=True` (the default) every CPU tensor stands in for a device tensor: every scalar
read and every upload with an explicit `device=` counts, which is what the same code does on
CUDA when it runs there with device=cuda. Host-side decisions should therefore be plain Python
numbers (or tensors made without a device argument that are never read as scalars inside the
region). Device copies cannot be seen on CPU (source and destination are the same device).

Tensors that live on the host in a GPU run too (an optimiser's step counters: torch's AdamW
keeps them on the CPU unless fused or capturable) are exempted with `treat_as_host(tensors)`;
code whose tensors are on the host by construction (draws from a CPU torch.Generator, made
without a device argument) runs inside `on_host()`, which a counter does not count on CPU
either (on a GPU run such tensors are CPU tensors, which never count).

Each event keeps its stack; `where` is the innermost frame in this project's code.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_PROJECT = str(Path(__file__).resolve().parent.parent)  # the repository root (epg_fast/, kernels/, ...)
_THIS = str(Path(__file__).resolve())
_UPLOADS = {torch.tensor, torch.as_tensor, torch.asarray}


@dataclass
class SyncEvent:
    kind: str  # scalar_read | upload | device_copy
    op: str
    stack: list[traceback.FrameSummary] = field(repr=False)

    @property
    def where(self) -> str:
        """The innermost frame in this project, then (when the sync is deeper, in a library
        such as DeepSpeed) the innermost frame outside torch."""
        ours = [f for f in self.stack if f.filename.startswith(_PROJECT) and "/.venv/" not in f.filename]
        outside_torch = [f for f in self.stack if "/torch/" not in f.filename]
        show = lambda f: f"{Path(f.filename).name}:{f.lineno} {f.name}: {(f.line or '').strip()}"
        if not ours:
            return show((outside_torch or self.stack)[-1])
        deeper = outside_torch[-1] if outside_torch and outside_torch[-1] is not ours[-1] else None
        return show(ours[-1]) + (f" <- {show(deeper)}" if deeper else "")


_on_host_depth = 0


class on_host:
    """`with on_host(): ...` marks a region whose tensors live on the host by construction (no
    device argument, CPU generators): its scalar reads of CPU tensors and its tensors made on
    the CPU are host operations, not counted even with `cpu_as_device`. Keep it small: on a
    CPU run a stand-in device tensor read inside it would go unseen (on a GPU run a CUDA
    tensor read still counts). Reusable and reentrant."""

    def __enter__(self) -> None:
        global _on_host_depth
        _on_host_depth += 1

    def __exit__(self, *exc) -> None:
        global _on_host_depth
        _on_host_depth -= 1


class _Uploads(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _UPLOADS and kwargs.get("device") is not None:
            device = torch.device(kwargs["device"])
            if self.counter.counts_device(device) and not (_on_host_depth and device.type == "cpu"):
                self.counter.record("upload", f"torch.{func.__name__}")
        return func(*args, **kwargs)


class _DeviceOps(TorchDispatchMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        if func is aten._local_scalar_dense.default:
            t = args[0]
            if c.counts_device(t.device) and not c.is_host(t) and not (_on_host_depth and t.device.type == "cpu"):
                c.record("scalar_read", "item")
        elif func is aten._to_copy.default and kwargs.get("device") is not None:
            src, dst = args[0].device, torch.device(kwargs["device"])
            if src != dst and not kwargs.get("non_blocking", False):
                c.record("device_copy", f"to({src.type}->{dst.type})")
        elif func is aten.copy_.default:
            dst, src = args[0].device, args[1].device
            if src != dst and not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
                c.record("device_copy", f"copy_({src.type}->{dst.type})")
        return func(*args, **kwargs)


class SyncCounter:
    """`with SyncCounter() as syncs: step()`, then `syncs.counts()` / `syncs.report()`.
    `paused()` excludes a part of the region (e.g. the logging of a logging step)."""

    def __init__(self, cpu_as_device: bool = True) -> None:
        self.cpu_as_device = cpu_as_device
        self.events: list[SyncEvent] = []
        self.active = True
        self._host: set[int] = set()  # storages of host-side tensors (treat_as_host)
        self._modes = (_Uploads(self), _DeviceOps(self))

    def counts_device(self, device: torch.device) -> bool:
        return device.type != "cpu" or self.cpu_as_device

    def treat_as_host(self, tensors) -> None:
        """Scalar reads of these tensors (their storage) are host reads, also on a GPU run."""
        self._host.update(t.untyped_storage().data_ptr() for t in tensors)

    def is_host(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self._host

    def record(self, kind: str, op: str) -> None:
        if self.active:
            stack = traceback.extract_stack()
            first_here = next(i for i, f in enumerate(stack) if f.filename == _THIS)  # the modes' frames on
            self.events.append(SyncEvent(kind, op, stack[:first_here]))

    def __enter__(self) -> SyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def paused(self) -> _Paused:
        return _Paused(self)

    def counts(self) -> Counter:
        return Counter(e.kind for e in self.events)

    def by_source(self) -> Counter:
        """(kind, where) -> number of events."""
        return Counter((e.kind, e.where) for e in self.events)

    def report(self) -> str:
        return "\n".join(f"{n:4d} x {kind:<11} {where}" for (kind, where), n in sorted(self.by_source().items()))


class _Paused:
    def __init__(self, counter: SyncCounter) -> None:
        self.counter = counter

    def __enter__(self) -> None:
        self.was, self.counter.active = self.counter.active, False

    def __exit__(self, *exc) -> None:
        self.counter.active = self.was

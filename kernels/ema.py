"""Multi-tensor EMA: target = rate * target + (1 - rate) * online, for every tensor pair.

The update is purely memory-bound: per element it reads the target and the online value and
writes the target, with the arithmetic in fp32 whatever the storage dtype (fp32, bf16 and
fp16 for either side, mixed too: an fp32 target may follow a bf16 online tensor). Other
dtypes (integer buffers such as BatchNorm's num_batches_tracked) raise ValueError: route
them to the reference.
`ema_reference` is PyTorch's multi-tensor `_foreach_lerp_` (a few launches for the whole
model); `ema_triton` is the fused kernel that replaces it.

Launch design (multi-tensor apply). The pairs are grouped by (target dtype, online dtype);
each group is one kernel launch over all of its chunks, whatever the number of tensors.
For a group the host builds, once, a device table of int64 rows
`[target address, online address, numel, first chunk]` (one row per tensor) and an int32
chunk -> row map (one entry per BLOCK-sized chunk of every tensor). Program `pid` reads its
row, turns the two addresses into typed pointers (`int64.to(tl.pointer_type(...))`, which
also works under the Triton interpreter), and updates chunk `pid - first` of that tensor
with fp32 math: a full chunk without a mask, the tail chunk with one. When every address
of the group is 16-byte aligned (the host checks; PyTorch allocations are) a constexpr flag
puts `tl.multiple_of(pointer, 16)` on the typed pointers, and the full chunks compile to
128-bit loads and stores (checked in the sm_90 PTX from triton 3.6 and 3.9: the hint must
sit on the pointer, not on the integer, and in the kernel body, not in a helper function);
unaligned groups (views at odd offsets) run the same kernel with scalar accesses. The tables are cached by the tuple of (data_ptr, numel, dtype) of every pair, so
a training loop that updates the same parameters every step rebuilds nothing: the per-step
host cost is building that key and one launch per group. The rate is a runtime scalar
argument, so a changing rate (an EMA warmup schedule) never recompiles the kernel. Only
addresses are cached, never tensors: the caller must keep the tensors alive during the
call, as with any in-place op. Every tensor must be contiguous (ValueError otherwise).

DeepSpeed ZeRO. At stages 0, 1 and 2 every rank holds the full parameters (ZeRO partitions
optimiser states and gradients only), so the update simply runs on the tensors each rank
holds, identically on every rank. At stage 3 the parameters themselves are partitioned:
`p.data` is an empty placeholder outside a gather and `p.ds_tensor` holds this rank's
flat shard. Our trainer keeps the EMA target as a full (unpartitioned) replica on every
rank and gathers the online shards with `deepspeed.zero.GatheredParameters(online_params)`
around the update, so inside that context both lists are full, contiguous tensors and this
op runs unchanged (the gathered addresses may differ between steps; the cache then simply
rebuilds the small table).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from contextlib import nullcontext
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 4096  # elements per chunk (one program): 16 KB of fp32 per tensor side
NUM_WARPS = 8
_ALIGN = 16  # bytes: addresses divisible by this allow 128-bit vector loads
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CACHE_SIZE = 8


@torch.no_grad()
def ema_reference(targets: list[Tensor], onlines: list[Tensor], rate: float) -> None:
    if not targets:
        return
    # lerp(t, o, w) = t + w (o - t) = (1 - w) t + w o, with w = 1 - rate.
    online = [o.to(t.dtype) for t, o in zip(targets, onlines)]
    torch._foreach_lerp_(targets, online, 1.0 - rate)


@triton.jit
def _ema_kernel(
    table_ptr,  # int64 [n_tensors, 4]: target addr, online addr, numel, first chunk
    chunk_ptr,  # int32 [n_chunks]: row of the table each chunk belongs to
    weight,  # 1 - rate, fp32 runtime scalar
    T_CODE: tl.constexpr,
    O_CODE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table_ptr + tl.load(chunk_ptr + pid).to(tl.int64) * 4
    t_addr = tl.load(row)
    o_addr = tl.load(row + 1)
    numel = tl.load(row + 2)
    first = tl.load(row + 3)
    # Typed pointers from the addresses (CODE: 0 fp32, 1 bf16, 2 fp16). Written inline:
    # through a helper function triton 3.6 drops the alignment hint below.
    if T_CODE == 0:
        t_base = t_addr.to(tl.pointer_type(tl.float32))
    elif T_CODE == 1:
        t_base = t_addr.to(tl.pointer_type(tl.bfloat16))
    else:
        t_base = t_addr.to(tl.pointer_type(tl.float16))
    if O_CODE == 0:
        o_base = o_addr.to(tl.pointer_type(tl.float32))
    elif O_CODE == 1:
        o_base = o_addr.to(tl.pointer_type(tl.bfloat16))
    else:
        o_base = o_addr.to(tl.pointer_type(tl.float16))
    if ALIGNED:  # the hint goes on the pointer: on the integer it does not reach the loads
        t_base = tl.multiple_of(t_base, 16)
        o_base = tl.multiple_of(o_base, 16)
    start = (pid - first) * BLOCK  # int64: tensors may exceed 2**31 elements
    t_ptrs = t_base + start + tl.arange(0, BLOCK)
    o_ptrs = o_base + start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:  # full chunk: no mask, so loads vectorise
        t = tl.load(t_ptrs).to(tl.float32)
        o = tl.load(o_ptrs).to(tl.float32)
        new = t + weight * (o - t)
        tl.store(t_ptrs, new.to(t_ptrs.dtype.element_ty))
    else:
        mask = tl.arange(0, BLOCK) < numel - start
        t = tl.load(t_ptrs, mask=mask).to(tl.float32)
        o = tl.load(o_ptrs, mask=mask).to(tl.float32)
        new = t + weight * (o - t)
        tl.store(t_ptrs, new.to(t_ptrs.dtype.element_ty), mask=mask)


class _Group(NamedTuple):
    """One launch: the device tables of all pairs with one (target, online) dtype pair."""

    table: Tensor  # int64 [n_tensors, 4]: target address, online address, numel, first chunk
    chunks: Tensor  # int32 [n_chunks]: the table row of each chunk
    n_chunks: int
    t_code: int  # _DTYPE_CODE of the targets
    o_code: int  # _DTYPE_CODE of the online tensors
    aligned: bool  # every address 16-byte aligned: vector loads
    n_tensors: int


_plans: OrderedDict[tuple, list[_Group]] = OrderedDict()


def _build_plan(targets: list[Tensor], onlines: list[Tensor], block: int) -> list[_Group]:
    """Validate the pairs and build one device table per dtype group (cache miss only)."""
    device = targets[0].device
    groups: dict[tuple[torch.dtype, torch.dtype], list[tuple[Tensor, Tensor]]] = {}
    for i, (t, o) in enumerate(zip(targets, onlines)):
        for name, x in (("target", t), ("online", o)):
            if x.dtype not in _DTYPE_CODE:
                raise ValueError(f"ema_triton: {name} {i} has dtype {x.dtype}; supported: fp32, bf16, fp16")
            if x.device != device:
                raise ValueError(f"ema_triton: {name} {i} is on {x.device}, the first target on {device}")
        if t.numel() != o.numel():
            raise ValueError(f"ema_triton: pair {i} has {t.numel()} target and {o.numel()} online elements")
        if t.numel():
            groups.setdefault((t.dtype, o.dtype), []).append((t, o))
    plan = []
    for (t_dtype, o_dtype), pairs in groups.items():
        rows, counts, first = [], [], 0
        aligned = True
        for t, o in pairs:
            n = t.numel()
            chunks = -(-n // block)
            rows.append([t.data_ptr(), o.data_ptr(), n, first])
            counts.append(chunks)
            first += chunks
            aligned &= t.data_ptr() % _ALIGN == 0 and o.data_ptr() % _ALIGN == 0
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        chunk_map = torch.repeat_interleave(
            torch.arange(len(pairs), dtype=torch.int32), torch.tensor(counts, dtype=torch.int64)
        ).to(device)
        plan.append(_Group(table, chunk_map, first, _DTYPE_CODE[t_dtype], _DTYPE_CODE[o_dtype], aligned, len(pairs)))
    return plan


def _plan_for(targets: list[Tensor], onlines: list[Tensor], block: int) -> list[_Group]:
    key = (
        block,
        targets[0].device,
        tuple(map(Tensor.data_ptr, targets)),
        tuple(map(Tensor.data_ptr, onlines)),
        tuple(map(Tensor.numel, targets)),
        tuple(map(Tensor.numel, onlines)),
        tuple(t.dtype for t in targets),
        tuple(o.dtype for o in onlines),
    )
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _build_plan(targets, onlines, block)
        while len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def ema_plan_info(targets: list[Tensor], onlines: list[Tensor], block: int = BLOCK) -> list[dict]:
    """The launches `ema_triton` makes for these lists: one dict per dtype group."""
    names = {v: k for k, v in _DTYPE_CODE.items()}
    return [
        {
            "target_dtype": names[g.t_code],
            "online_dtype": names[g.o_code],
            "tensors": g.n_tensors,
            "chunks": g.n_chunks,
            "aligned": g.aligned,
        }
        for g in _plan_for(targets, onlines, block)
    ]


@torch.no_grad()
def ema_triton(
    targets: list[Tensor],
    onlines: list[Tensor],
    rate: float,
    *,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> None:
    """In place, for every pair: target = rate * target + (1 - rate) * online (fp32 math).

    One kernel launch per (target dtype, online dtype) group. `block` (a power of two) and
    `num_warps` are tuning knobs for the benchmarks; the defaults are the tuned ones.
    """
    if len(targets) != len(onlines):
        raise ValueError(f"ema_triton: {len(targets)} targets but {len(onlines)} online tensors")
    if not targets:
        return
    if not all(map(Tensor.is_contiguous, targets)) or not all(map(Tensor.is_contiguous, onlines)):
        bad = [i for i, (t, o) in enumerate(zip(targets, onlines)) if not (t.is_contiguous() and o.is_contiguous())]
        raise ValueError(f"ema_triton: tensors must be contiguous; pairs {bad[:8]} are not")
    device = targets[0].device
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("ema_triton on CPU tensors needs TRITON_INTERPRET=1 set before importing this module")
    weight = float(1.0 - rate)
    plan = _plan_for(targets, onlines, block)
    ctx = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
    with ctx:
        for g in plan:
            _ema_kernel[(g.n_chunks,)](
                g.table,
                g.chunks,
                weight,
                T_CODE=g.t_code,
                O_CODE=g.o_code,
                ALIGNED=g.aligned,
                BLOCK=block,
                num_warps=num_warps,
            )


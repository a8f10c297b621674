"""LayerNorm with optional AdaLN modulation, and its gated-residual variant, as fused Triton kernels.

The ops
-------
- ``layer_norm``: ``y = LN(x) * (1 + scale) + shift``, where ``LN(x) = (x - mean) * rstd * weight + bias``.
  Without shift/scale this is the encoder's plain LayerNorm and x may be any ``[..., D]``;
  with shift and/or scale (the decoder's adaLN modulation) x is ``[B, T, D]`` and shift/scale
  are ``[B, D]``, broadcast over the T tokens of each sample.
- ``gated_layer_norm``: ``r = x + gate * h`` and ``y = LN(r) * (1 + scale) + shift``, returning
  ``(r, y)``: the decoder's gated residual update followed by the next block's modulated
  LayerNorm. x, h: ``[B, T, D]``; gate, shift, scale: ``[B, D]``. With gate None it is the
  encoder's plain residual ``r = x + h`` followed by the next LayerNorm (then the rows are
  one sample of B*T, chunked as the plain op).

weight and bias are ``[D]`` or None. Inputs may be fp32, bf16 or fp16, and the operands may mix
float dtypes (e.g. fp32 modulation with bf16 activations): everything is computed in fp32 and
the mean/variance are fp32 whatever the input dtype (spec section 2). r has x's dtype; y has
x's dtype or ``out_dtype`` when given (under autocast, the dtype of the matmul that reads y:
the fp32 encoder stream is then read in fp32 and y written in bf16, the same values autocast
would have produced by casting an fp32 y).
In the gated op r is rounded to x's dtype *before* it is normalised, so the fused op equals
the unfused ``r = x + gate * h; LN(r)`` on the stored residual. Each gradient has the dtype of
its input.

Kernels
-------
Forward (one kernel for both ops): a program normalises a tile of ``BLOCK_M`` consecutive
tokens of one sample, the whole row in registers (``BLOCK_D = next_power_of_2(D)``, padded
columns masked), so x (and h) are read once and y (and r) written once; the per-sample
shift/scale/gate vectors and the weights are loaded once per program, all issued before the
row reductions. The grid is ``(token tiles, B)``; the
plain op is the case B = 1, T = rows. It saves the fp32 mean and rstd of each row.

Backward (one kernel for both ops): with ``xhat = (x - mean) * rstd`` and
``g = dy * (1 + scale) * weight``, the row gradient is
``dLN = rstd * (g - mean(g) - xhat * mean(g * xhat))`` (means over the D columns). For the
gated op ``dx = dr + dLN``, ``dh = gate * (dr + dLN)``. The column gradients are sums over
rows: ``dweight = sum dy (1 + scale) xhat`` and ``dbias = sum dy (1 + scale)`` over all
B*T rows; ``dscale_b = sum_t dy * (xhat * weight + bias)``, ``dshift_b = sum_t dy`` and
``dgate_b = sum_t (dr + dLN) * h`` over the T rows of sample b.

Reduction strategy (two-stage, deterministic, no atomics): the backward grid is
``(n_chunks, B)``; program (c, b) walks the tokens of chunk c of sample b tile by tile,
accumulating its column partial sums in fp32 registers (a software-pipelined loop,
``tl.range(num_stages=BWD_STAGES)``: every load of a tile, dr and h included, is issued
before its row reductions, so the next tiles' loads overlap them), and writes them once to an fp32
buffer ``[B * n_chunks, D]``. A torch ``.sum`` then finishes: over all rows of the buffer for
dweight/dbias, over the n_chunks rows of each sample for dshift/dscale/dgate. Because no
chunk straddles two samples, the per-sample sums need no segmented reduction. ``n_chunks``
is picked so that the grid is one wave of resident programs (the SM count times the
programs an SM's registers hold, ``_resident_programs``), and one chunk per sample when B
alone fills the device: the partial buffers stay at B to a few hundred rows of D,
negligible traffic next to the B*T*D activations. Atomic adds on one address per column would serialise thousands of
programs on the same D addresses and make the result order-dependent; the two-stage sum is
both faster at these sizes and bitwise reproducible.

Tile sizes (a heuristic on D rather than autotuning, which the interpreter cannot run with
several configs): the forward tile holds about 4096 elements (BLOCK_M = 4096 // BLOCK_D rows,
e.g. 4 rows at D = 768, 2 at D = 1152..2048, 1 at D = 2688), the backward tile about 2048
(it keeps up to five fp32 accumulators live), with 4 to 16 warps so each thread holds 8 to
16 elements of a row. The kernels use only plain pointer arithmetic (no block pointers, no
libdevice) so they run on triton 3.6 and 3.9 and under the interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

MAX_D = 16384  # the whole row lives in registers; beyond this the kernel would spill badly


# ----------------------------------------------------------------------------- references


def layer_norm_reference(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """y = LN(x) * (1 + scale) + shift in fp32, stored in out_dtype (default: x's dtype)."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), x.shape[-1:], w, b, eps)
    if scale is not None:
        y = y * (1 + scale.float().unsqueeze(1))
    if shift is not None:
        y = y + shift.float().unsqueeze(1)
    return y.to(out_dtype or x.dtype)


def gated_layer_norm_reference(
    x: Tensor,
    gate: Tensor | None,
    h: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """r = x + gate * h (gate None: x + h; computed in fp32, stored in x's dtype);
    y = LN(r) * (1 + scale) + shift, stored in out_dtype (default: x's dtype)."""
    branch = h.float() if gate is None else gate.float().unsqueeze(1) * h.float()
    r = (x.float() + branch).to(x.dtype)
    return r, layer_norm_reference(r, weight, bias, eps, shift, scale, out_dtype)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _ln_fwd_kernel(
    X, H, GATE, R, Y, W, Bias, SHIFT, SCALE, MEAN, RSTD,
    T, D, eps,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    t = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = t < T
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    rows = b.to(tl.int64) * T + t  # global row index, int64 so rows * D cannot overflow
    offs = rows[:, None] * D + cols[None, :]
    vec_offs = b.to(tl.int64) * D + cols  # into the per-sample [B, D] vectors

    # Every load is issued before the first reduction, so the small vectors' latency hides
    # behind the row loads instead of following the mean/variance.
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate = tl.load(GATE + vec_offs, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_B:
        bb = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        sc = tl.load(SCALE + vec_offs, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        sh = tl.load(SHIFT + vec_offs, mask=col_ok, other=0.0).to(tl.float32)

    if HAS_RES:
        if HAS_GATE:
            h = gate[None, :] * h
        x = x + h
        # The residual stream is stored in x's dtype; normalise exactly what is stored.
        x_st = x.to(R.dtype.element_ty)
        tl.store(R + offs, x_st, mask=mask)
        x = x_st.to(tl.float32)

    mean = tl.sum(x, axis=1) / D
    diff = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / D
    rstd = tl.rsqrt(var + eps)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)

    y = diff * rstd[:, None]
    if HAS_W:
        y = y * w[None, :]
    if HAS_B:
        y = y + bb[None, :]
    if HAS_SCALE:
        y = y * (1.0 + sc[None, :])
    if HAS_SHIFT:
        y = y + sh[None, :]
    # Y may be narrower than X (the autocast dtype of the matmul that reads y).
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_kernel(
    X, DY, DR, H, GATE, W, Bias, SCALE, MEAN, RSTD,
    DX, DH, PART_DW, PART_DB, PART_DSHIFT, PART_DSCALE, PART_DGATE,
    T, D, chunk_rows,
    HAS_DY: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_DR: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NEED_DSHIFT: tl.constexpr,
    NEED_DSCALE: tl.constexpr, NEED_DGATE: tl.constexpr, NEED_DH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # X is the LayerNorm input (x for the plain op, r for the gated one).
    c = tl.program_id(0)
    b = tl.program_id(1)
    n_chunks = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    vec_offs = b.to(tl.int64) * D + cols
    part_offs = (b.to(tl.int64) * n_chunks + c) * D + cols  # this program's row of the partial buffers

    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        w = tl.where(col_ok, 1.0, 0.0)
    if HAS_SCALE:
        s1 = 1.0 + tl.load(SCALE + vec_offs, mask=col_ok, other=0.0).to(tl.float32)
    else:
        s1 = tl.where(col_ok, 1.0, 0.0)
    if NEED_DSCALE:
        if HAS_B:
            bias = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_GATE:
        gate = tl.load(GATE + vec_offs, mask=col_ok, other=0.0).to(tl.float32)

    acc_dw = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_dshift = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_dscale = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_dgate = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    t_start = c * chunk_rows
    # Software-pipelined: the next tiles' loads are issued while this tile is reduced.
    for i in tl.range(0, chunk_rows, BLOCK_M, num_stages=NUM_STAGES):
        t = t_start + i + tl.arange(0, BLOCK_M)
        row_ok = t < T
        mask = row_ok[:, None] & col_ok[None, :]
        rows = b.to(tl.int64) * T + t
        offs = rows[:, None] * D + cols[None, :]

        # Every load of the tile first (dr and h included), then the row reductions.
        if HAS_DY:
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if HAS_DR:
            dr = tl.load(DR + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_DGATE:
            h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)

        dtot = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if HAS_DY:
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            dys = dy * s1[None, :]  # gradient w.r.t. the affine LN output
            g = dys * w[None, :]  # gradient w.r.t. xhat
            c1 = tl.sum(g * xhat, axis=1) / D
            c2 = tl.sum(g, axis=1) / D
            dln = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            dtot = tl.where(mask, dln, 0.0)
            if NEED_DW:
                acc_dw += dys * xhat
            if NEED_DB:
                acc_db += dys
            if NEED_DSHIFT:
                acc_dshift += dy
            if NEED_DSCALE:
                acc_dscale += dy * (xhat * w[None, :] + bias[None, :])
        if HAS_DR:
            dtot += dr
        tl.store(DX + offs, dtot.to(DX.dtype.element_ty), mask=mask)
        if NEED_DH:
            dh = dtot
            if HAS_GATE:
                dh = dh * gate[None, :]
            tl.store(DH + offs, dh.to(DH.dtype.element_ty), mask=mask)
        if NEED_DGATE:
            acc_dgate += dtot * h

    if NEED_DW:
        tl.store(PART_DW + part_offs, tl.sum(acc_dw, axis=0), mask=col_ok)
    if NEED_DB:
        tl.store(PART_DB + part_offs, tl.sum(acc_db, axis=0), mask=col_ok)
    if NEED_DSHIFT:
        tl.store(PART_DSHIFT + part_offs, tl.sum(acc_dshift, axis=0), mask=col_ok)
    if NEED_DSCALE:
        tl.store(PART_DSCALE + part_offs, tl.sum(acc_dscale, axis=0), mask=col_ok)
    if NEED_DGATE:
        tl.store(PART_DGATE + part_offs, tl.sum(acc_dgate, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------- launch helpers


def _fwd_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_M, num_warps) for the forward: ~4096-element tiles."""
    block_d = triton.next_power_of_2(D)
    block_m = max(1, min(64, 4096 // block_d))
    tile = block_m * block_d
    return block_d, block_m, max(4, min(16, tile // 512))


def _bwd_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_M, num_warps) for the backward: ~2048-element tiles (up to five fp32
    column accumulators stay live), 8 to 16 elements per thread."""
    block_d = triton.next_power_of_2(D)
    block_m = max(1, min(64, 2048 // block_d))
    tile = block_m * block_d
    return block_d, block_m, max(4, min(16, tile // 256))


BWD_STAGES = 2  # depth of the backward's software pipeline over its row tiles


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _resident_programs(device: torch.device, num_warps: int) -> int:
    """How many backward programs the device holds at once: one full wave of the grid."""
    if device.type != "cuda":
        return 8  # the interpreter: few programs, but still several chunks per sample in tests
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    # Register-bound: sm_90 builds (triton 3.9, ptxas) use 123-174 registers per thread (up
    # to five accumulators and the pipelined tiles); at 192 an SM's 64K registers hold
    # 65536 // (num_warps * 32 * 192) programs: 1 at 8 or 16 warps, 2 at 4.
    return sms * max(1, 65536 // (num_warps * 32 * 192))


def _chunking(B: int, T: int, block_m: int, num_warps: int, device: torch.device) -> tuple[int, int]:
    """(n_chunks, chunk_rows): split each sample's T rows into chunks of whole tiles so that
    the B * n_chunks programs fill the resident slots once (never more than one wave when B
    is small; one chunk per sample when B alone fills the device). Fewer chunks also mean
    fewer rows of partial column sums to write and reduce."""
    tiles = triton.cdiv(T, block_m)
    n_chunks = max(1, min(tiles, _resident_programs(device, num_warps) // B))
    chunk_rows = triton.cdiv(tiles, n_chunks) * block_m
    return triton.cdiv(T, chunk_rows), chunk_rows


def _check_vec(name: str, v: Tensor | None, D: int) -> None:
    if v is not None and tuple(v.shape) != (D,):
        raise ValueError(f"{name} must have shape [D] = [{D}], got {list(v.shape)}")


def _check_per_sample(name: str, v: Tensor | None, B: int, D: int) -> None:
    if v is not None and tuple(v.shape) != (B, D):
        raise ValueError(f"{name} must have shape [B, D] = [{B}, {D}] (one vector per sample), got {list(v.shape)}")


def _contig(v: Tensor | None) -> Tensor | None:
    return None if v is None else v.contiguous()


def _fwd(x3: Tensor, h3: Tensor | None, gate, weight, bias, shift, scale, eps: float, out_dtype: torch.dtype | None):
    """x3 (and h3): contiguous [B, T, D]. Returns (r or None, y, mean, rstd); y in out_dtype
    (default: x3's dtype)."""
    B, T, D = x3.shape
    y = torch.empty_like(x3, dtype=out_dtype or x3.dtype)
    r = torch.empty_like(x3) if h3 is not None else None
    mean = torch.empty(B * T, dtype=torch.float32, device=x3.device)
    rstd = torch.empty(B * T, dtype=torch.float32, device=x3.device)
    if B * T == 0:
        return r, y, mean, rstd
    block_d, block_m, warps = _fwd_config(D)
    grid = (triton.cdiv(T, block_m), B)
    dummy = mean  # stands in for absent pointers; never dereferenced (the constexpr flag is off)
    _ln_fwd_kernel[grid](
        x3, h3 if h3 is not None else dummy, gate if gate is not None else dummy,
        r if r is not None else dummy, y,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        shift if shift is not None else dummy, scale if scale is not None else dummy,
        mean, rstd, T, D, float(eps),
        HAS_RES=h3 is not None, HAS_GATE=gate is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return r, y, mean, rstd


def _bwd(xin: Tensor, dy: Tensor | None, dr: Tensor | None, h: Tensor | None, gate, weight, bias, scale,
         mean: Tensor, rstd: Tensor, x_dtype: torch.dtype, need: dict[str, bool]):
    """xin: the LN input, contiguous [B, T, D]. Returns dict of gradients (None where not needed)."""
    B, T, D = xin.shape
    dev = xin.device
    out: dict[str, Tensor | None] = dict.fromkeys(("dx", "dh", "dw", "db", "dshift", "dscale", "dgate"))
    has_dy = dy is not None
    if B * T == 0:
        return out
    block_d, block_m, warps = _bwd_config(D)
    n_chunks, chunk_rows = _chunking(B, T, block_m, warps, dev)
    P = B * n_chunks

    def part(flag: bool) -> Tensor | None:
        return torch.empty((P, D), dtype=torch.float32, device=dev) if flag else None

    need_dw = need["dw"] and has_dy
    need_db = need["db"] and has_dy
    need_dshift = need["dshift"] and has_dy
    need_dscale = need["dscale"] and has_dy
    need_dgate = need["dgate"] and gate is not None
    need_dh = need["dh"] and h is not None
    p_dw, p_db, p_dshift, p_dscale, p_dgate = map(part, (need_dw, need_db, need_dshift, need_dscale, need_dgate))
    dx = torch.empty(xin.shape, dtype=x_dtype, device=dev)
    dh = torch.empty_like(h) if need_dh else None
    dummy = mean
    a = lambda v: dummy if v is None else v  # noqa: E731
    _ln_bwd_kernel[(n_chunks, B)](
        xin, a(dy), a(dr), a(h), a(gate), a(weight), a(bias), a(scale), mean, rstd,
        dx, a(dh), a(p_dw), a(p_db), a(p_dshift), a(p_dscale), a(p_dgate),
        T, D, chunk_rows,
        HAS_DY=has_dy, HAS_RES=h is not None, HAS_GATE=gate is not None, HAS_DR=dr is not None,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
        NEED_DW=need_dw, NEED_DB=need_db, NEED_DSHIFT=need_dshift,
        NEED_DSCALE=need_dscale, NEED_DGATE=need_dgate, NEED_DH=need_dh,
        BLOCK_M=block_m, BLOCK_D=block_d, NUM_STAGES=BWD_STAGES, num_warps=warps,
    )
    out["dx"], out["dh"] = dx, dh
    # Second stage of the two-stage reductions (deterministic; the buffers have P = B * n_chunks rows).
    if p_dw is not None:
        out["dw"] = p_dw.sum(0)
    if p_db is not None:
        out["db"] = p_db.sum(0)
    for key, p in (("dshift", p_dshift), ("dscale", p_dscale), ("dgate", p_dgate)):
        if p is not None:
            out[key] = p.view(B, n_chunks, D).sum(1)
    # Gradients for inputs that got no upstream gradient (dy absent) are zeros, not None,
    # when autograd asked for them.
    for key, flag in (("dw", need["dw"]), ("db", need["db"]), ("dshift", need["dshift"]), ("dscale", need["dscale"])):
        if flag and out[key] is None:
            out[key] = torch.zeros((B, D) if key in ("dshift", "dscale") else (D,), dtype=torch.float32, device=dev)
    return out


# ----------------------------------------------------------------------------- autograd


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3, weight, bias, shift, scale, eps, out_dtype):
        _, y, mean, rstd = _fwd(x3, None, None, weight, bias, shift, scale, eps, out_dtype)
        ctx.save_for_backward(x3, weight, bias, shift, scale, mean, rstd)
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        x3, weight, bias, shift, scale, mean, rstd = ctx.saved_tensors
        if dy is None:
            return (None,) * 7
        nx, nw, nb, nsh, nsc, _, _ = ctx.needs_input_grad
        need = {"dw": nw, "db": nb, "dshift": nsh, "dscale": nsc, "dgate": False, "dh": False}
        g = _bwd(x3, dy.contiguous(), None, None, None, weight, bias, scale, mean, rstd, x3.dtype, need)
        return (
            g["dx"] if nx else None,
            _cast(g["dw"], weight),
            _cast(g["db"], bias),
            _cast(g["dshift"], shift),
            _cast(g["dscale"], scale),
            None,
            None,
        )


class _GatedLayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3, gate, h3, weight, bias, shift, scale, eps, out_dtype):
        r, y, mean, rstd = _fwd(x3, h3, gate, weight, bias, shift, scale, eps, out_dtype)
        ctx.save_for_backward(r, gate, h3, weight, bias, shift, scale, mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.x_dtype = x3.dtype
        return r, y

    @staticmethod
    def backward(ctx, dr, dy):
        r, gate, h3, weight, bias, shift, scale, mean, rstd = ctx.saved_tensors
        if dr is None and dy is None:
            return (None,) * 9
        nx, ngate, nh, nw, nb, nsh, nsc, _, _ = ctx.needs_input_grad
        need = {"dw": nw, "db": nb, "dshift": nsh, "dscale": nsc, "dgate": ngate, "dh": nh}
        g = _bwd(r, _contig(dy), _contig(dr), h3, gate, weight, bias, scale, mean, rstd, ctx.x_dtype, need)
        return (
            g["dx"] if nx else None,
            _cast(g["dgate"], gate),
            g["dh"],
            _cast(g["dw"], weight),
            _cast(g["db"], bias),
            _cast(g["dshift"], shift),
            _cast(g["dscale"], scale),
            None,
            None,
        )


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    if grad is None or like is None:
        return None
    return grad.to(like.dtype)


# ----------------------------------------------------------------------------- public API


def layer_norm_triton(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """y = LN(x) * (1 + scale) + shift (fused Triton kernels; same contract as the reference).

    x: [..., D] without shift/scale, [B, T, D] with them; shift, scale: [B, D]; weight, bias: [D].
    y is written in out_dtype (default: x's dtype); dx has x's dtype whatever y's.
    Differentiable in every tensor argument.
    """
    D = x.shape[-1]
    if D > MAX_D:
        raise ValueError(f"layer_norm_triton supports D <= {MAX_D}, got D = {D}")
    _check_vec("weight", weight, D)
    _check_vec("bias", bias, D)
    if shift is None and scale is None:
        x3 = x.contiguous().view(1, -1, D)
    else:
        if x.dim() != 3:
            raise ValueError(f"with shift/scale x must be [B, T, D], got shape {list(x.shape)}")
        B = x.shape[0]
        _check_per_sample("shift", shift, B, D)
        _check_per_sample("scale", scale, B, D)
        x3 = x.contiguous()
    y = _LayerNormFn.apply(x3, _contig(weight), _contig(bias), _contig(shift), _contig(scale), eps, out_dtype)
    return y.view(x.shape)


def gated_layer_norm_triton(
    x: Tensor,
    gate: Tensor | None,
    h: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """r = x + gate * h, y = LN(r) * (1 + scale) + shift, in one pass; returns (r, y).

    x, h: [B, T, D]; gate, shift, scale: [B, D] (gate None: the plain residual r = x + h);
    weight, bias: [D]. r has x's dtype, y out_dtype (default: x's dtype).
    Differentiable in every tensor argument; the backward accepts gradients for r, y or both.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got shape {list(x.shape)}")
    B, T, D = x.shape
    if D > MAX_D:
        raise ValueError(f"gated_layer_norm_triton supports D <= {MAX_D}, got D = {D}")
    if tuple(h.shape) != (B, T, D):
        raise ValueError(f"h must have x's shape {list(x.shape)}, got {list(h.shape)}")
    _check_per_sample("gate", gate, B, D)
    _check_vec("weight", weight, D)
    _check_vec("bias", bias, D)
    _check_per_sample("shift", shift, B, D)
    _check_per_sample("scale", scale, B, D)
    if gate is None and shift is None and scale is None:
        # No per-sample vector: one sample of B * T rows, chunked exactly as the plain op.
        x3, h3 = x.contiguous().view(1, B * T, D), h.contiguous().view(1, B * T, D)
    else:
        x3, h3 = x.contiguous(), h.contiguous()
    r, y = _GatedLayerNormFn.apply(
        x3, _contig(gate), h3, _contig(weight), _contig(bias), _contig(shift), _contig(scale), eps, out_dtype
    )
    return r.view(x.shape), y.view(x.shape)

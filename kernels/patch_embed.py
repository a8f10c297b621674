"""Patch embedding: patchify + linear (+ bias), optionally with the per-sample
preconditioning scale `c_in` on the input and the position embedding added to the output.

x: [B, C, H, W]; weight: [D, C, p, p] (the layout of a Conv2d with kernel = stride = p, so
checkpoints of the reference load as they are); bias: [D]; c_in: [B] or None;
pos: [1, L, D] or None. Returns [B, L, D] with patches in row-major order.

As a matrix multiply: M = B * L rows (one per (sample, patch), patch index l = ph * (W/p) + pw),
K = C * p * p columns ordered (c, i, j) like the flattened Conv2d weight, N = D outputs:
y[m, n] = sum_k c_in[b] * x[b, c, ph p + i, pw p + j] * W[n, k] + bias[n] + pos[l, n].

The Triton path (`patch_embed_triton`) does the im2col inside the kernel: each program owns a
[BLOCK_M rows x BLOCK_N outputs] tile and, for every K block, gathers the patch elements
straight from the image with pointer arithmetic (row offset from (b, ph, pw), column offset
from (c, i, j)); no patch matrix is materialised. c_in[b] is applied to the gathered tile in
fp32 before the cast to the compute dtype, the product accumulates in fp32 through `tl.dot`,
and the epilogue adds the bias and pos[l] before the single store of the output. Against
the reference this saves the scaled copy of the image (`x * c_in`, one read + one write of
the image), the patch copy / layout change of the conv, and the separate `+ pos` pass over
the [B, L, D] output (one read + one write). Backward: dweight = sum_m dy[m]^T patches[m] is
a second Triton kernel that gathers the (c_in-scaled) patches from the saved image again,
with the M reduction split over programs when there are few output tiles; dpos = dy summed
over the batch and dbias = dpos summed over patches (torch reductions in fp32); dx (only
when the image needs a gradient, which training images do not) = col2im(dy @ W) * c_in, a
plain matmul plus a reshape, since kernel = stride means the patches do not overlap.

Dtype rule (one rule, both paths of `patch_embed_triton`):
  compute dtype  = the autocast dtype when autocast is on for x's device; otherwise
                   weight.dtype if x is fp32 and the weight is fp16/bf16; otherwise x.dtype.
                   The image (after the c_in scale, done in fp32) and the weight are rounded
                   to it; products accumulate in fp32; bias and pos are added in fp32.
  output dtype   = the compute dtype, promoted with pos.dtype when pos is given.
This reproduces the reference under autocast (conv in the autocast dtype, then `+ pos` with
an fp32 pos promotes the tokens to fp32) and without it when all dtypes agree. Gradients
have the dtype of their input (weight, bias, pos, x).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

import triton
import triton.language as tl

# Read once at import: the interpreter's tl.dot multiplies bf16 operands wrongly (raw bits),
# so under the interpreter the operands are widened to fp32 after the rounding to the
# compute dtype (same rounding, exact products).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Tile sizes. The H200 ones: 128 x 128 output tiles with 64-deep K steps, 8 warps, 3 stages
# (bf16 operands: (128 x 64 + 64 x 128) x 2 B x 3 stages = 96 KiB of shared memory; twice that
# if the pipeliner stages the fp32 image/weight before the in-register cast under autocast,
# still under Hopper's 227 KiB). Under the interpreter smaller tiles keep several tiles per dimension in
# the small test shapes, so the masks and the tile loops are exercised.
FWD_CONFIG_H200 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
DW_CONFIG_H200 = dict(BLOCK_N=128, BLOCK_K=128, BLOCK_M=64, num_warps=8, num_stages=3)
FWD_CONFIG_INTERPRET = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
DW_CONFIG_INTERPRET = dict(BLOCK_N=32, BLOCK_K=32, BLOCK_M=16, num_warps=4, num_stages=1)
# The configs in use (module globals, read at each call).
FWD_CONFIG = dict(FWD_CONFIG_INTERPRET if _INTERPRET else FWD_CONFIG_H200)
DW_CONFIG = dict(DW_CONFIG_INTERPRET if _INTERPRET else DW_CONFIG_H200)
# dweight has only ceil(D / BLOCK_N) * ceil(K / BLOCK_K) output tiles (36 for D = K = 768), so
# the M reduction is split into up to DW_MAX_SPLITS chunks (fp32 partials summed afterwards)
# until there are about DW_WAVES programs per SM; each chunk keeps >= DW_MIN_BLOCKS M blocks.
DW_WAVES = 2
DW_MAX_SPLITS = 32
DW_MIN_BLOCKS = 4 if not _INTERPRET else 1

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def patch_embed_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    c_in: Tensor | None = None,
    pos: Tensor | None = None,
) -> Tensor:
    if c_in is not None:
        x = x * c_in.view(-1, 1, 1, 1).to(x.dtype)
    y = F.conv2d(x, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    return y if pos is None else y + pos


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _patch_rows(rm, L, WP, sxb, sxh, sxw, P: tl.constexpr):
    """Row m = b * L + ph * WP + pw -> (b, l, offset of the patch's top-left element)."""
    b = rm // L
    l = rm % L
    ph = l // WP
    pw = l % WP
    row_off = b.to(tl.int64) * sxb + (ph * P).to(tl.int64) * sxh + (pw * P).to(tl.int64) * sxw
    return b, l, row_off


@triton.jit
def _patch_cols(rk, sxc, sxh, sxw, P: tl.constexpr):
    """Column k = c * p * p + i * p + j -> offset of element (c, i, j) inside a patch."""
    ch = rk // (P * P)
    r = rk % (P * P)
    i = r // P
    j = r % P
    return ch.to(tl.int64) * sxc + i.to(tl.int64) * sxh + j.to(tl.int64) * sxw


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, c_ptr, pos_ptr, y_ptr,
    M, L, WP, N, K,
    sxb, sxc, sxh, sxw,
    swn, swk,
    spl, spn,
    P: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr, HAS_POS: tl.constexpr,
    CDT: tl.constexpr, DOT_F32: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # N tiles vary fastest: the programs running together share the same image rows (L2).
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    b, l, row_off = _patch_rows(rm, L, WP, sxb, sxh, sxw, P)
    if HAS_C:
        scale = tl.load(c_ptr + b, mask=m_ok, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        col_off = _patch_cols(rk, sxc, sxh, sxw, P)
        a = tl.load(x_ptr + row_off[:, None] + col_off[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_C:
            a = a.to(tl.float32) * scale[:, None]
        a = a.to(CDT)
        w = tl.load(w_ptr + rk[:, None] * swk + rn[None, :] * swn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        w = w.to(CDT)
        if DOT_F32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if DOT_IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_POS:
        pos_off = l.to(tl.int64)[:, None] * spl + rn[None, :] * spn
        acc += tl.load(pos_ptr + pos_off, mask=mask, other=0.0).to(tl.float32)
    y_off = rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_dw_kernel(
    x_ptr, dy_ptr, c_ptr, dw_ptr,
    M, L, WP, N, K,
    sxb, sxc, sxh, sxw,
    sdb, sdl, sdn,
    rows_per_split,
    P: tl.constexpr,
    HAS_C: tl.constexpr,
    CDT: tl.constexpr, DOT_F32: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # dW[n, k] (+)= sum over rows m of this split of dy[m, n] * patches[m, k].
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid % num_k
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    k_ok = rk < K
    col_off = _patch_cols(rk, sxc, sxh, sxw, P)

    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        b, l, row_off = _patch_rows(rm, L, WP, sxb, sxh, sxw, P)
        a = tl.load(x_ptr + row_off[:, None] + col_off[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_C:
            scale = tl.load(c_ptr + b, mask=m_ok, other=0.0).to(tl.float32)
            a = a.to(tl.float32) * scale[:, None]
        a = a.to(CDT)
        # dy^T tile [BLOCK_N, BLOCK_M], read through dy's strides (it is often a slice of the
        # gradient of a concatenation, so not contiguous over the batch).
        dy_off = b.to(tl.int64)[None, :] * sdb + l.to(tl.int64)[None, :] * sdl + rn[:, None] * sdn
        g = tl.load(dy_ptr + dy_off, mask=n_ok[:, None] & m_ok[None, :], other=0.0).to(CDT)
        if DOT_F32:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
        if DOT_IEEE:
            acc = tl.dot(g, a, acc, input_precision="ieee")
        else:
            acc = tl.dot(g, a, acc)

    dw_off = pid_s.to(tl.int64) * N * K + rn[:, None] * K + rk[None, :]
    tl.store(dw_ptr + dw_off, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------- host side


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, c_in: Tensor | None, pos: Tensor | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"patch_embed: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"patch_embed: weight must be [D, C, p, p], got shape {tuple(weight.shape)}")
    B, C, H, W = x.shape
    D, Cw, p, _ = weight.shape
    if Cw != C:
        raise ValueError(
            f"patch_embed: weight has {Cw} input channels but x has {C} "
            f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})"
        )
    if H % p or W % p:
        raise ValueError(f"patch_embed: image size {H}x{W} is not divisible by the patch size {p}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("c_in", c_in), ("pos", pos)):
        if t is None:
            continue
        if t.dtype not in _TL_DTYPE:
            raise TypeError(f"patch_embed: {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"patch_embed: {name} is on {t.device} but x is on {x.device}")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"patch_embed: bias must be [{D}], got shape {tuple(bias.shape)}")
    if c_in is not None:
        if tuple(c_in.shape) != (B,):
            raise ValueError(f"patch_embed: c_in must be [B] = [{B}], got shape {tuple(c_in.shape)}")
        if c_in.requires_grad:
            raise ValueError("patch_embed: c_in must not require grad (no gradient flows into the noise schedule)")
    L = (H // p) * (W // p)
    if pos is not None and tuple(pos.shape) != (1, L, D):
        raise ValueError(f"patch_embed: pos must be [1, L, D] = [1, {L}, {D}], got shape {tuple(pos.shape)}")


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the patches and the weight are rounded to before the matrix multiply."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    if x.dtype == torch.float32 and weight.dtype in (torch.float16, torch.bfloat16):
        return weight.dtype
    return x.dtype


def _dot_flags(cdt: torch.dtype) -> tuple[bool, bool]:
    """(widen dot operands to fp32, ask for IEEE fp32 products instead of TF32)."""
    return _INTERPRET, cdt == torch.float32 and not _INTERPRET


def _dw_splits(M: int, N: int, K: int, device: torch.device) -> tuple[int, int]:
    """(number of M chunks for the dweight kernel, rows per chunk: a multiple of BLOCK_M)."""
    bm = DW_CONFIG["BLOCK_M"]
    m_blocks = triton.cdiv(M, bm)
    tiles = triton.cdiv(N, DW_CONFIG["BLOCK_N"]) * triton.cdiv(K, DW_CONFIG["BLOCK_K"])
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # interpreter: small, so that the tests reach the split path
        sms = 4
    splits = max(1, min(DW_MAX_SPLITS, triton.cdiv(DW_WAVES * sms, tiles), m_blocks // DW_MIN_BLOCKS))
    blocks_per_split = triton.cdiv(m_blocks, splits)
    splits = triton.cdiv(m_blocks, blocks_per_split)
    return splits, blocks_per_split * bm


def _dweight(x: Tensor, dy: Tensor, c_in: Tensor | None, w_shape, w_dtype: torch.dtype, cdt: torch.dtype) -> Tensor:
    B, C, H, W = x.shape
    D, _, p, _ = w_shape
    WP, L, K = W // p, (H // p) * (W // p), C * p * p
    M = B * L
    if M == 0:
        return torch.zeros(w_shape, device=x.device, dtype=w_dtype)
    splits, rows = _dw_splits(M, D, K, x.device)
    dot_f32, dot_ieee = _dot_flags(cdt)
    cfg = DW_CONFIG
    if splits == 1:
        out = torch.empty((1, D, K), device=x.device, dtype=w_dtype)
    else:
        out = torch.empty((splits, D, K), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(D, cfg["BLOCK_N"]) * triton.cdiv(K, cfg["BLOCK_K"]), splits)
    _patch_embed_dw_kernel[grid](
        x, dy, c_in if c_in is not None else x, out,
        M, L, WP, D, K,
        *x.stride(),
        *dy.stride(),
        rows,
        P=p, HAS_C=c_in is not None,
        CDT=_TL_DTYPE[cdt], DOT_F32=dot_f32, DOT_IEEE=dot_ieee,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_M=cfg["BLOCK_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    dw = out[0] if splits == 1 else out.sum(0).to(w_dtype)
    return dw.view(w_shape)


class _PatchEmbedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, c_in, pos):
        B, C, H, W = x.shape
        D, _, p, _ = weight.shape
        WP, L, K = W // p, (H // p) * (W // p), C * p * p
        M = B * L
        cdt = compute_dtype(x, weight)
        out_dtype = cdt if pos is None else torch.promote_types(cdt, pos.dtype)
        y = torch.empty((B, L, D), device=x.device, dtype=out_dtype)
        if M > 0:
            w2 = weight.reshape(D, K)  # a view for a contiguous Conv2d weight
            dot_f32, dot_ieee = _dot_flags(cdt)
            cfg = FWD_CONFIG
            grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(D, cfg["BLOCK_N"]),)
            _patch_embed_fwd_kernel[grid](
                x, w2, bias if bias is not None else w2, c_in if c_in is not None else x,
                pos if pos is not None else w2, y,
                M, L, WP, D, K,
                *x.stride(),
                *w2.stride(),
                *(pos.stride()[1:] if pos is not None else (0, 0)),
                P=p, HAS_BIAS=bias is not None, HAS_C=c_in is not None, HAS_POS=pos is not None,
                CDT=_TL_DTYPE[cdt], DOT_F32=dot_f32, DOT_IEEE=dot_ieee,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
        ctx.cdt = cdt
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(
            x if needs_w else None,
            weight if needs_x else None,
            c_in if (needs_w or needs_x) else None,
        )
        ctx.x_meta = (x.shape, x.dtype)
        ctx.w_meta = (weight.shape, weight.dtype)
        ctx.b_dtype = bias.dtype if bias is not None else None
        ctx.pos_dtype = pos.dtype if pos is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, c_in = ctx.saved_tensors
        needs_x, needs_w, needs_b, _, needs_pos = ctx.needs_input_grad
        (B, C, H, W), x_dtype = ctx.x_meta
        (D, _, p, _), w_dtype = ctx.w_meta
        dx = dw = db = dpos = None
        if needs_w:
            dw = _dweight(x, dy, c_in, ctx.w_meta[0], w_dtype, ctx.cdt)
        if needs_b or needs_pos:
            dpos32 = torch.sum(dy, dim=0, keepdim=True, dtype=torch.float32)  # [1, L, D]
            if needs_pos:
                dpos = dpos32.to(ctx.pos_dtype)
            if needs_b:
                db = dpos32.sum(dim=(0, 1)).to(ctx.b_dtype)
        if needs_x:
            # Not on the training path (images need no gradient): a plain matmul + col2im.
            cdt = ctx.cdt
            K = C * p * p
            g = dy.reshape(-1, D).to(cdt)
            w2 = weight.reshape(D, K).to(cdt)
            if dy.device.type == "cpu" and cdt != torch.float32:
                cols = (g.float() @ w2.float()).to(cdt)
            else:
                cols = g @ w2
            cols = cols.view(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
            if c_in is not None:
                cols = cols.float() * c_in.float().view(-1, 1, 1, 1)
            dx = cols.to(x_dtype)
        return dx, dw, db, None, dpos


def patch_embed_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    c_in: Tensor | None = None,
    pos: Tensor | None = None,
) -> Tensor:
    """Fused patch embedding (see the module docstring for the semantics and dtype rule).

    x: [B, C, H, W] (any strides); weight: [D, C, p, p] (copied if not contiguous); bias: [D] or None;
    c_in: [B] or None (must not require grad); pos: [1, L, D] or None, L = (H/p) (W/p).
    Returns [B, L, D], contiguous. Differentiable in x, weight, bias and pos.
    """
    _check(x, weight, bias, c_in, pos)
    if not weight.is_contiguous():
        weight_c = weight.contiguous()  # autograd maps the gradient back to the original
    else:
        weight_c = weight
    return _PatchEmbedFn.apply(x, weight_c, bias, c_in, pos)

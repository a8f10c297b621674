"""Fused LayerNorm / AdaLN / gated-residual kernels against their PyTorch references, forward
and backward (every input gradient, weight/bias included)."""

import pytest
import torch

# (tests/conftest.py switches the Triton interpreter on when there is no GPU.)

from epg_fast.kernels import layer_norm as lnk
from epg_fast.kernels.layer_norm import (
    gated_layer_norm_reference,
    gated_layer_norm_triton,
    layer_norm_reference,
    layer_norm_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6

# Tolerances, relative: |a - b| <= tol * |b| + tol * max|b| elementwise (the max term absorbs
# cancellation in the row sums behind the gradients). Both sides compute in fp32, so the
# differences are summation order plus the rounding of the stored outputs:
# - fp32: summation order only, ~1e-6; 1e-4 leaves margin for 258-row sums.
# - fp16: one half-ulp rounding of outputs (2^-11 ~ 5e-4) and of the residual r that is then
#   normalised; 4e-3 is ~8 ulp.
# - bf16: ulp is 2^-8 ~ 4e-3 relative. The Triton interpreter also converts fp32 -> bf16 by
#   truncation (round toward zero, one full ulp) while the GPU and torch round to nearest, and
#   in the gated op that ulp in r propagates into y and every gradient: 2e-2 (~2-5 ulp).
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}

LARGE_D = (768, 1024, 1584, 1920, 2688)


def _close(actual, expected, tol, name):
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a, e = actual.float(), expected.float()
    atol = tol * max(e.abs().max().item(), 1e-6)
    torch.testing.assert_close(a, e, rtol=tol, atol=atol, msg=lambda m: f"{name}: {m}")


def _inputs(B, T, D, dtype, affine, modulated, mod_dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=torch.float32, s=1.0, o=0.0):
        return (torch.randn(*shape, generator=g) * s + o).to(device=DEVICE, dtype=dt)

    x = rnd(B, T, D, dt=dtype, s=2.0, o=0.5)
    w = rnd(D, s=0.5, o=1.0) if affine else None  # parameters stay fp32, as in the model
    b = rnd(D, s=0.5) if affine else None
    shift = rnd(B, D, dt=mod_dtype, s=0.5) if modulated else None
    scale = rnd(B, D, dt=mod_dtype, s=0.5) if modulated else None
    return x, w, b, shift, scale, g


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def _grads(loss, tensors):
    present = [t for t in tensors if t is not None]
    gs = iter(torch.autograd.grad(loss, present, allow_unused=True))
    return [None if t is None else next(gs) for t in tensors]


def _check_layer_norm(B, T, D, dtype, affine, modulated, mod_dtype=None, seed=0):
    mod_dtype = mod_dtype or dtype
    x, w, b, shift, scale, g = _inputs(B, T, D, dtype, affine, modulated, mod_dtype, seed)
    c = torch.randn(B, T, D, generator=g).to(DEVICE)  # random cotangent for y
    results = []
    for fn in (layer_norm_triton, layer_norm_reference):
        leaves = _leaves(x, w, b, shift, scale)
        y = fn(leaves[0], leaves[1], leaves[2], EPS, leaves[3], leaves[4])
        loss = (y.float() * c).sum()
        results.append([y] + _grads(loss, leaves))
    tol = TOL[dtype]
    for name, got, ref in zip(("y", "dx", "dweight", "dbias", "dshift", "dscale"), *results):
        assert (got is None) == (ref is None), name
        if ref is not None:
            _close(got, ref, tol, name)


# ---------------------------------------------------------------------------- plain / AdaLN


@pytest.mark.parametrize("modulated", [False, True], ids=["plain", "adaln"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", LARGE_D)
def test_layer_norm_large_d(D, dtype, affine, modulated):
    T = 2 + LARGE_D.index(D) % 4  # T in 2..5, B = 3: a few rows of each real model width
    # bf16 activations with fp32 modulation (the trainer's mixed case) for half of the widths.
    mod_dtype = torch.float32 if LARGE_D.index(D) % 2 else dtype
    _check_layer_norm(3, T, D, dtype, affine, modulated, mod_dtype, seed=D)


@pytest.mark.parametrize("modulated", [False, True], ids=["plain", "adaln"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_layer_norm_long_sequence(dtype, affine, modulated):
    # T = 258 tokens (the decoder's sequence), odd B, D = 64 (several rows per tile): the
    # backward splits each sample into several chunks, the last one ragged.
    B, T, D = 3, 258, 64
    block_d, block_m, warps = lnk._bwd_config(D)
    assert lnk._chunking(B, T, block_m, warps, torch.device(DEVICE))[0] > 1
    _check_layer_norm(B, T, D, dtype, affine, modulated, seed=1)


def test_layer_norm_fp16_wide_and_odd_width():
    _check_layer_norm(3, 3, 768, torch.float16, True, True, torch.float32, seed=2)
    _check_layer_norm(2, 7, 100, torch.float32, True, True, seed=3)  # D not a power of two, < 128


def test_layer_norm_partial_arguments():
    # weight without bias, and shift without scale / scale without shift.
    B, T, D = 2, 5, 96
    x, w, _, shift, scale, g = _inputs(B, T, D, torch.float32, True, True, torch.float32, 4)
    c = torch.randn(B, T, D, generator=g).to(DEVICE)
    for args in ((w, None, shift, None), (None, w, None, scale), (w, None, None, scale)):
        out = []
        for fn in (layer_norm_triton, layer_norm_reference):
            leaves = _leaves(x, *args)
            y = fn(leaves[0], leaves[1], leaves[2], EPS, leaves[3], leaves[4])
            out.append([y] + _grads((y * c).sum(), leaves))
        for got, ref in zip(*out):
            assert (got is None) == (ref is None)
            if ref is not None:
                _close(got, ref, TOL[torch.float32], "partial")


def test_layer_norm_any_leading_shape_and_strides():
    # Plain LN accepts [..., D] and non-contiguous inputs.
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(4, 6, 2, 80, generator=g) * 2 + 0.5).to(DEVICE)
    x = base.transpose(0, 1)  # [6, 4, 2, 80], non-contiguous
    w = torch.randn(80, generator=g).to(DEVICE)
    b = torch.randn(80, generator=g).to(DEVICE)
    c = torch.randn(x.shape, generator=g).to(DEVICE)
    out = []
    for fn in (layer_norm_triton, layer_norm_reference):
        leaves = _leaves(x, w, b)
        y = fn(leaves[0], leaves[1], leaves[2], EPS)
        out.append([y] + _grads((y * c).sum(), leaves))
    for name, got, ref in zip(("y", "dx", "dw", "db"), *out):
        _close(got, ref, TOL[torch.float32], name)
    # [N, D] too, and non-contiguous shift/scale.
    x2 = x.reshape(-1, 80)
    _close(layer_norm_triton(x2, w, b, EPS), layer_norm_reference(x2, w, b, EPS), 1e-4, "2d")
    x3 = x.reshape(6, 8, 80)
    sh = torch.randn(80, 6, generator=g).to(DEVICE).t()
    sc = torch.randn(80, 6, generator=g).to(DEVICE).t()
    _close(layer_norm_triton(x3, w, b, EPS, sh, sc), layer_norm_reference(x3, w, b, EPS, sh, sc), 1e-4, "strided mod")


def test_layer_norm_frozen_inputs_and_no_grad():
    # Only some inputs need gradients (frozen LN parameters, constant x), and inference mode.
    B, T, D = 2, 4, 128
    x, w, b, shift, scale, g = _inputs(B, T, D, torch.float32, True, True, torch.float32, 6)
    c = torch.randn(B, T, D, generator=g).to(DEVICE)
    out = []
    for fn in (layer_norm_triton, layer_norm_reference):
        sh, sc = _leaves(shift, scale)
        y = fn(x, w, b, EPS, sh, sc)
        out.append(_grads((y * c).sum(), [sh, sc]))
    for got, ref in zip(*out):
        _close(got, ref, 1e-4, "frozen")
    with torch.no_grad():
        _close(layer_norm_triton(x, w, b, EPS, shift, scale), layer_norm_reference(x, w, b, EPS, shift, scale), 1e-4, "nograd")


def test_per_sample_modulation_gradients_are_per_sample():
    # dshift/dscale (and dgate) are sums over the tokens of each sample only: with B = 4
    # samples of different data and several chunks per sample, a reduction that mixed samples
    # or chunks (or dropped the ragged last chunk) would fail this comparison.
    B, T, D = 4, 258, 64
    x, w, b, shift, scale, g = _inputs(B, T, D, torch.float32, True, True, torch.float32, 7)
    x = x * torch.arange(1, B + 1, device=DEVICE, dtype=x.dtype).view(B, 1, 1)  # samples differ in scale too
    c = torch.randn(B, T, D, generator=g).to(DEVICE) + torch.arange(B, device=DEVICE).view(B, 1, 1)
    out = []
    for fn in (layer_norm_triton, layer_norm_reference):
        leaves = _leaves(x, w, b, shift, scale)
        y = fn(leaves[0], leaves[1], leaves[2], EPS, leaves[3], leaves[4])
        out.append(_grads((y * c).sum(), leaves[3:]))
    (dsh, dsc), (rsh, rsc) = out
    assert not torch.allclose(rsh[0], rsh[1]) and not torch.allclose(rsc[0], rsc[1])
    _close(dsh, rsh, 1e-4, "dshift")
    _close(dsc, rsc, 1e-4, "dscale")


# ---------------------------------------------------------------------------- gated residual


def _check_gated(B, T, D, dtype, affine, modulated, mod_dtype=None, seed=0, flow=("r", "y")):
    mod_dtype = mod_dtype or dtype
    x, w, b, shift, scale, g = _inputs(B, T, D, dtype, affine, modulated, mod_dtype, seed)
    h = (torch.randn(B, T, D, generator=g) * 1.5).to(device=DEVICE, dtype=dtype)
    gate = (torch.randn(B, D, generator=g) * 0.5).to(device=DEVICE, dtype=mod_dtype)
    c1 = torch.randn(B, T, D, generator=g).to(DEVICE)
    c2 = torch.randn(B, T, D, generator=g).to(DEVICE)
    results = []
    for fn in (gated_layer_norm_triton, gated_layer_norm_reference):
        leaves = _leaves(x, gate, h, w, b, shift, scale)
        r, y = fn(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], EPS, leaves[5], leaves[6])
        loss = 0.0
        if "r" in flow:
            loss = loss + (r.float() * c1).sum()
        if "y" in flow:
            loss = loss + (y.float() * c2).sum()
        results.append([r, y] + _grads(loss, leaves))
    tol = TOL[dtype]
    names = ("r", "y", "dx", "dgate", "dh", "dweight", "dbias", "dshift", "dscale")
    for name, got, ref in zip(names, *results):
        if ref is None:  # unused in the reference's graph (only r flows): zero or absent
            assert got is None or not got.any(), name
        else:
            _close(got, ref, tol, name)
    # The normalisation itself, on the r the kernel stored (independent of how r was rounded).
    r_k, y_k = results[0][:2]
    _close(y_k, layer_norm_reference(r_k.detach(), w, b, EPS, shift, scale), TOL[dtype] / 2, "y(r)")


# The decoder always modulates; the unmodulated gated op is spot-checked at two widths.
GATED_CASES = [(D, m) for D in LARGE_D for m in (True, False) if m or D in (768, 2688)]


@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("D", "modulated"), GATED_CASES, ids=[f"{D}-{'adaln' if m else 'plain'}" for D, m in GATED_CASES])
def test_gated_large_d(D, modulated, dtype, affine):
    T = 2 + (LARGE_D.index(D) + 1) % 4
    mod_dtype = torch.float32 if LARGE_D.index(D) % 2 == 0 else dtype
    _check_gated(3, T, D, dtype, affine, modulated, mod_dtype, seed=10 + D)


@pytest.mark.parametrize("modulated", [False, True], ids=["plain", "adaln"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gated_long_sequence(dtype, affine, modulated):
    _check_gated(3, 258, 64, dtype, affine, modulated, seed=11)


@pytest.mark.parametrize("flow", [("r",), ("y",)], ids=["dr_only", "dy_only"])
def test_gated_one_output_used(flow):
    _check_gated(2, 9, 192, torch.float32, True, True, seed=12, flow=flow)


def test_gated_mixed_dtypes():
    # bf16 residual stream and branch output, fp32 gate/shift/scale and LN parameters.
    _check_gated(3, 4, 1152, torch.bfloat16, True, True, torch.float32, seed=13)


# ---------------------------------------------------------------------------- bad shapes


def test_bad_shapes_raise_value_error():
    x = torch.randn(2, 3, 16, device=DEVICE)
    w = torch.randn(16, device=DEVICE)
    good = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="shift must have shape"):
        layer_norm_triton(x, w, w, EPS, torch.randn(3, 16, device=DEVICE), good)
    with pytest.raises(ValueError, match="scale must have shape"):
        layer_norm_triton(x, w, w, EPS, good, torch.randn(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="weight must have shape"):
        layer_norm_triton(x, torch.randn(8, device=DEVICE), None, EPS)
    with pytest.raises(ValueError, match="bias must have shape"):
        layer_norm_triton(x, None, torch.randn(17, device=DEVICE), EPS)
    with pytest.raises(ValueError, match=r"x must be \[B, T, D\]"):
        layer_norm_triton(x.view(6, 16), None, None, EPS, good, good)
    with pytest.raises(ValueError, match="h must have"):
        gated_layer_norm_triton(x, good, torch.randn(2, 4, 16, device=DEVICE), w, w, EPS)
    with pytest.raises(ValueError, match="gate must have shape"):
        gated_layer_norm_triton(x, torch.randn(2, 1, 16, device=DEVICE), x, w, w, EPS)
    with pytest.raises(ValueError, match="shift must have shape"):
        gated_layer_norm_triton(x, good, x, w, w, EPS, torch.randn(1, 16, device=DEVICE), good)


# ---------------------------------------------------------------------------- residual (no gate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_residual_without_gate(dtype):
    # The encoder's r = x + h; y = LN(r): gate None, plain affine LN, any number of chunks.
    B, T, D = 3, 37, 96
    x, w, b, _, _, g = _inputs(B, T, D, dtype, True, False, dtype, 14)
    h = (torch.randn(B, T, D, generator=g) * 1.5).to(device=DEVICE, dtype=dtype)
    c1, c2 = (torch.randn(B, T, D, generator=g).to(DEVICE) for _ in range(2))
    results = []
    for fn in (gated_layer_norm_triton, gated_layer_norm_reference):
        leaves = _leaves(x, h, w, b)
        r, y = fn(leaves[0], None, leaves[1], leaves[2], leaves[3], EPS)
        results.append([r, y] + _grads((r.float() * c1).sum() + (y.float() * c2).sum(), leaves))
    for name, got, ref in zip(("r", "y", "dx", "dh", "dweight", "dbias"), *results):
        _close(got, ref, TOL[dtype], name)
    # gate None is the gate of ones, exactly: the same r, y and gradients as an explicit gate.
    ones = torch.ones(B, D, device=DEVICE, dtype=dtype)
    r1, y1 = gated_layer_norm_triton(x, ones, h, w, b, EPS)
    r0, y0 = gated_layer_norm_triton(x, None, h, w, b, EPS)
    assert torch.equal(r0, r1) and torch.equal(y0, y1)
    # ... and r is exactly the unfused torch sum (computed in fp32, rounded once to x's dtype).
    assert torch.equal(results[1][0], x + h)


# ---------------------------------------------------------------------------- output dtype


def _check_out_dtype(op, out_dtype, seed):
    """fp32 inputs (the encoder's residual stream), y written in a narrower dtype."""
    B, T, D = 2, 11, 160
    modulated = op in ("adaln", "gated")
    x, w, b, shift, scale, g = _inputs(B, T, D, torch.float32, True, modulated, torch.float32, seed)
    h = torch.randn(B, T, D, generator=g).to(device=DEVICE, dtype=out_dtype)  # a matmul's output
    gate = (torch.randn(B, D, generator=g) * 0.5).to(DEVICE) if op == "gated" else None
    c = torch.randn(B, T, D, generator=g).to(DEVICE)
    results = []
    for triton_path in (True, False):
        if op in ("plain", "adaln"):
            fn = layer_norm_triton if triton_path else layer_norm_reference
            leaves = _leaves(x, w, b, shift, scale)
            y = fn(leaves[0], leaves[1], leaves[2], EPS, leaves[3], leaves[4], out_dtype=out_dtype)
            r = None
        else:
            fn = gated_layer_norm_triton if triton_path else gated_layer_norm_reference
            leaves = _leaves(x, gate, h, w, b, shift, scale)
            r, y = fn(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], EPS, leaves[5], leaves[6], out_dtype=out_dtype)
            assert r.dtype == torch.float32
        assert y.dtype == out_dtype
        loss = (y.float() * c).sum() + (0 if r is None else (r * c).sum())
        grads = _grads(loss, leaves)
        assert grads[0].dtype == torch.float32  # dx in the input's dtype, not y's
        results.append([y] + grads)
    for got, ref in zip(*results):
        if ref is not None:
            _close(got, ref, TOL[out_dtype], f"{op} -> {out_dtype}")
    return results[1][0]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", ["plain", "adaln", "gated", "residual"])
def test_output_dtype(op, out_dtype):
    y = _check_out_dtype(op, out_dtype, seed=15)
    # The reference with out_dtype is bitwise the old fp32 output rounded once to out_dtype.
    x, w, b, shift, scale, _ = _inputs(2, 11, 160, torch.float32, True, op in ("adaln", "gated"), torch.float32, 15)
    if op in ("plain", "adaln"):
        assert torch.equal(y, layer_norm_reference(x, w, b, EPS, shift, scale).to(out_dtype))

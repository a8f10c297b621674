"""Fused patch embedding (kernels/patch_embed.py): the Triton kernels against the reference,
forward and backward, over patch sizes 16 / 32 / 4, odd batch sizes, non-square images,
D not a power of two, fp32 / fp16 / bf16, autocast, strided inputs and gradients."""

import os

import pytest
import torch

# (tests/conftest.py switches the Triton interpreter on when there is no GPU.)

from epg_fast.kernels import patch_embed as pe
from epg_fast.kernels.patch_embed import compute_dtype, patch_embed_reference, patch_embed_triton

device = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Max error relative to the largest magnitude of the fp64 ground truth. fp16 / bf16: the
# rounding of the scaled image, the weight and the output to the compute dtype (bf16 has an
# 8-bit mantissa: ~4e-3 per rounding).
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (B, C, H, W, p, D)
SHAPES = {
    "p16_32x48_B3": (3, 3, 32, 48, 16, 40),  # non-square, L = 6, odd batch, D = 40
    "p32_64x64_B1": (1, 3, 64, 64, 32, 48),  # K = 3072
    "p4_12x8_D24": (2, 3, 12, 8, 4, 24),  # K = 48, D not a power of two
    "p16_D768": (1, 3, 16, 32, 16, 768),  # the ViT-B width, M = 2
}
OPTIONS = {  # (bias, c_in, pos, x requires grad)
    "all": (True, True, True, True),
    "none": (False, False, False, False),
    "pos_only": (False, False, True, False),
    "bias_cin": (True, True, False, True),
}
SMALL = [s for s in SHAPES if s != "p16_D768"]  # D = 768 is slow in the interpreter: 2 cases
CASES = (
    [(s, torch.float32, o) for s in SMALL for o in ("all", "none", "bias_cin")]
    + [(s, torch.float16, o) for s in SMALL for o in ("all", "pos_only")]
    + [(s, torch.bfloat16, "all") for s in SMALL]
    + [("p16_D768", torch.float32, "all"), ("p16_D768", torch.bfloat16, "all")]
)


def make(shape, dtype, bias=True, c_in=True, pos=True, x_grad=True, seed=0):
    B, C, H, W, p, D = shape
    L = (H // p) * (W // p)
    g = torch.Generator().manual_seed(seed)

    def t(*size, scale=1.0, offset=0.0):
        return (torch.randn(*size, generator=g) * scale + offset).to(device=device, dtype=dtype)

    x = t(B, C, H, W).requires_grad_(x_grad)
    w = t(D, C, p, p, scale=(C * p * p) ** -0.5).requires_grad_()
    b = t(D, scale=0.5).requires_grad_() if bias else None
    c = (torch.rand(B, generator=g) + 0.25).to(device=device, dtype=dtype) if c_in else None
    ps = t(1, L, D, scale=0.5).requires_grad_() if pos else None
    return x, w, b, c, ps


def ground_truth(x, w, b, c, ps, dy):
    """fp64 reference output and gradients of (x, w, b, pos) for the same (rounded) inputs."""
    leaves = [None if v is None else v.detach().double().requires_grad_(v.requires_grad) for v in (x, w, b, ps)]
    y = patch_embed_reference(leaves[0], leaves[1], leaves[2], None if c is None else c.double(), leaves[3])
    wanted = [v for v in leaves if v is not None and v.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, dy.double()))
    return y, [None if v is None or not v.requires_grad else next(grads) for v in leaves]


def rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(x, w, b, c, ps, tol, out_dtype=None):
    y = patch_embed_triton(x, w, b, c, ps)
    B, C, H, W = x.shape
    D, p = w.shape[0], w.shape[-1]
    assert y.shape == (B, (H // p) * (W // p), D)
    if out_dtype is not None:
        assert y.dtype == out_dtype
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=y.dtype)
    inputs = [v for v in (x, w, b, ps) if v is not None and v.requires_grad]
    grads = iter(torch.autograd.grad(y, inputs, dy))
    got = [None if v is None or not v.requires_grad else next(grads) for v in (x, w, b, ps)]
    y_ref, want = ground_truth(x, w, b, c, ps, dy)
    assert rel_err(y, y_ref) < tol, ("y", rel_err(y, y_ref))
    for name, v, g, r in zip(("dx", "dweight", "dbias", "dpos"), (x, w, b, ps), got, want):
        if v is None or not v.requires_grad:
            continue
        assert g.shape == v.shape and g.dtype == v.dtype, name
        assert rel_err(g, r) < tol, (name, rel_err(g, r))
    return y


@pytest.mark.parametrize(
    "shape, dtype, opts",
    CASES,
    ids=[f"{s}-{str(d).split('.')[1]}-{o}" for s, d, o in CASES],
)
def test_matches_reference(shape, dtype, opts):
    # bf16 runs under the interpreter too: the kernels round the operands to bf16 and only
    # then widen them to fp32 for the interpreter's tl.dot, so the bf16 rounding and dtype
    # plumbing are tested; natively the dot takes the bf16 operands.
    bias, c_in, pos, x_grad = OPTIONS[opts]
    x, w, b, c, ps = make(SHAPES[shape], dtype, bias, c_in, pos, x_grad)
    y = check(x, w, b, c, ps, TOL[dtype], out_dtype=dtype)
    # Same dtype as the reference, and close to it in that dtype.
    y_ref = patch_embed_reference(x, w, b, c, ps)
    assert y_ref.dtype == y.dtype
    assert rel_err(y, y_ref.double()) < 2 * TOL[dtype]


def test_split_m_reduction_for_dweight():
    """Few output tiles: the dweight M reduction is split over programs (fp32 partials)."""
    shape = (5, 3, 16, 16, 4, 24)  # M = 80 rows, K = 48
    splits, rows = pe._dw_splits(5 * 16, 24, 48, torch.device(device))
    assert splits > 1 and rows % pe.DW_CONFIG["BLOCK_M"] == 0 and splits * rows >= 80
    for dtype in (torch.float32, torch.float16):
        check(*make(shape, dtype), TOL[dtype])


def test_h200_tile_config(monkeypatch):
    """The native tile sizes (128-wide tiles, one partial M tile) give the same results."""
    monkeypatch.setattr(pe, "FWD_CONFIG", dict(pe.FWD_CONFIG_H200))
    monkeypatch.setattr(pe, "DW_CONFIG", dict(pe.DW_CONFIG_H200))
    check(*make((3, 3, 32, 48, 16, 136), torch.float32), TOL[torch.float32])
    check(*make((2, 3, 64, 32, 32, 40), torch.float16), TOL[torch.float16])


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_dtype_rule(amp_dtype):
    """fp32 image and parameters under autocast: the matmul runs in the autocast dtype, the
    output is fp32 when pos (fp32) is added, the autocast dtype without pos, as the
    reference; gradients come back in the parameters' fp32."""
    shape = (3, 3, 32, 48, 16, 40)
    for with_pos in (True, False):
        x, w, b, c, ps = make(shape, torch.float32, pos=with_pos, x_grad=False)
        with torch.autocast(device, dtype=amp_dtype):
            assert compute_dtype(x, w) == amp_dtype
            y_ref = patch_embed_reference(x, w, b, c, ps)
            y = check(x, w, b, c, ps, TOL[amp_dtype])
        assert y.dtype == y_ref.dtype == (torch.float32 if with_pos else amp_dtype)
        assert rel_err(y, y_ref.double()) < 2 * TOL[amp_dtype]


def test_mixed_dtypes_without_autocast():
    """x fp32 with fp16 weight: computed in fp16; fp32 pos promotes the output to fp32."""
    shape = (3, 3, 32, 48, 16, 40)
    x, _, _, c, ps = make(shape, torch.float32)
    _, w, b, _, _ = make(shape, torch.float16)
    assert compute_dtype(x, w) == torch.float16
    check(x, w, b, c, ps, TOL[torch.float16], out_dtype=torch.float32)
    check(x, w, b, c, None, TOL[torch.float16], out_dtype=torch.float16)


def test_encoder_layout_strided_inputs_and_grads():
    """As the encoder calls it: pos is a slice of a longer pos_embed, the output is
    concatenated after head tokens (so dy is strided over the batch), and the image is
    channels-last; the gradient reaches the pos_embed slice only."""
    B, C, H, W, p, D, lead = 3, 3, 32, 48, 16, 40, 2
    L = (H // p) * (W // p)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, C, H, W, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(D, C, p, p, generator=g) * 0.05).to(device).requires_grad_()
    b = torch.randn(D, generator=g).to(device).requires_grad_()
    c = (torch.rand(B, generator=g) + 0.5).to(device)
    pos_embed = torch.randn(1, lead + L, D, generator=g).to(device).requires_grad_()
    head = torch.randn(B, lead, D, generator=g).to(device)
    proj = torch.randn(D, generator=g).to(device)

    def run(fn):
        patches = fn(x, w, b, c, pos_embed[:, lead:])
        tokens = torch.cat([head + pos_embed[:, :lead], patches], dim=1)
        loss = ((tokens @ proj) ** 2).sum()
        return [patches.detach()] + list(torch.autograd.grad(loss, (w, b, pos_embed)))

    for got, want in zip(run(patch_embed_triton), run(patch_embed_reference)):
        assert rel_err(got, want.double()) < 1e-5
    assert not x.is_contiguous()


def test_no_grad_inputs_and_empty_batch():
    x, w, b, c, ps = make((3, 3, 32, 48, 16, 40), torch.float32, x_grad=False)
    with torch.no_grad():
        y = patch_embed_triton(x, w, b, c, ps)
    assert not y.requires_grad
    x0 = torch.zeros(0, 3, 32, 48, device=device, requires_grad=True)
    y0 = patch_embed_triton(x0, w, b, None, ps)
    assert y0.shape == (0, 6, 40)
    dw, dx = torch.autograd.grad(y0.sum(), (w, x0))
    assert torch.all(dw == 0) and dx.shape == x0.shape


def test_shape_errors():
    x, w, b, c, ps = make((3, 3, 32, 48, 16, 40), torch.float32, x_grad=False)
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        patch_embed_triton(x[:, :, :24], w, b, c, None)
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        patch_embed_triton(x[..., :40], w, b, c, None)
    with pytest.raises(ValueError, match="weight has 3 input channels but x has 4"):
        patch_embed_triton(torch.cat([x, x[:, :1]], dim=1), w, b, c, None)
    with pytest.raises(ValueError, match=r"c_in must be \[B\] = \[3\]"):
        patch_embed_triton(x, w, b, c[:2], ps)
    with pytest.raises(ValueError, match="c_in must not require grad"):
        patch_embed_triton(x, w, b, c.clone().requires_grad_(), ps)
    with pytest.raises(ValueError, match=r"pos must be \[1, L, D\] = \[1, 6, 40\]"):
        patch_embed_triton(x, w, b, c, ps[:, :5])
    with pytest.raises(ValueError, match=r"bias must be \[40\]"):
        patch_embed_triton(x, w, b[:39], c, ps)
    with pytest.raises(ValueError, match=r"x must be \[B, C, H, W\]"):
        patch_embed_triton(x[0], w, b, c, ps)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        patch_embed_triton(x.double(), w, b, c, ps)

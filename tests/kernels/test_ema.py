"""Multi-tensor EMA (kernels/ema.py): the Triton kernel against the foreach reference, over
odd sizes and dtype mixes, the cached launch table, the launch count and the input checks."""

import pytest
import torch

# (tests/conftest.py switches the Triton interpreter on when there is no GPU.)

from epg_fast.kernels import ema
from epg_fast.kernels.ema import ema_reference, ema_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16 = torch.float32, torch.bfloat16

# Sizes that exercise the chunking with BLOCK = 4096: single elements, tails shorter than a
# warp, one partial chunk, exactly one chunk, one chunk + 1, several chunks + tail, 2-D.
SHAPES = [(1,), (7,), (1000,), (4096,), (4097,), (33, 65), (3, 4096 + 5), (2, 3, 5), (12293,)]

# Both sides compute in fp32: fp32 targets differ by the order of the few operations only
# (lerp's t + w (o - t) against ours). A bf16 target is rounded once; the reference rounds a
# bf16-target's fp32 online to bf16 first and the interpreter rounds by truncation, so allow
# ~2 bf16 ulps (2^-8 relative each) at |values| ~ 1-4.
TOL = {F32: dict(rtol=1e-6, atol=1e-6), BF16: dict(rtol=1e-2, atol=2e-2)}


def _pairs(t_dtype, o_dtype, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = [(torch.randn(s, generator=g) + 2.0).to(DEVICE, t_dtype) for s in shapes]  # nonzero
    onlines = [(torch.randn(s, generator=g) - 2.0).to(DEVICE, o_dtype) for s in shapes]
    return targets, onlines


def _check(got, want, dtype):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"tensor {i} {tuple(a.shape)}: {m}")


class _CountingKernel:
    """Stands in for the jitted kernel: counts `kernel[grid](...)` launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize(
    "t_dtype,o_dtype", [(F32, F32), (BF16, BF16), (F32, BF16), (BF16, F32)], ids=["fp32", "bf16", "fp32<-bf16", "bf16<-fp32"]
)
def test_matches_reference(t_dtype, o_dtype):
    targets, onlines = _pairs(t_dtype, o_dtype)
    before = [t.clone() for t in targets]
    expected = [t.clone() for t in targets]
    online_copy = [o.clone() for o in onlines]
    ema_reference(expected, onlines, 0.9)
    ema_triton(targets, onlines, 0.9)
    _check(targets, expected, t_dtype)
    # the update moved (almost) every element: mean target 2, mean online -2, a step of ~0.4
    # (a bf16 target keeps its value only where |online - target| is below ~0.1)
    changed = torch.cat([(t != b).flatten() for t, b in zip(targets, before)])
    assert changed.float().mean() > 0.99
    for o, c in zip(onlines, online_copy):  # the online tensors are read only
        assert torch.equal(o, c)


def test_fp64_ground_truth_fp32():
    targets, onlines = _pairs(F32, F32, seed=1)
    want = [(0.75 * t.double() + 0.25 * o.double()).float() for t, o in zip(targets, onlines)]
    ema_triton(targets, onlines, 0.75)
    _check(targets, want, F32)


def test_cached_table_new_rate(monkeypatch):
    targets, onlines = _pairs(F32, F32, seed=2)
    expected = [t.clone() for t in targets]
    builds = []
    real_build = ema._build_plan
    monkeypatch.setattr(ema, "_build_plan", lambda *a: builds.append(1) or real_build(*a))
    monkeypatch.setattr(ema, "_plans", type(ema._plans)())
    ema_triton(targets, onlines, 0.9)
    ema_reference(expected, onlines, 0.9)
    assert len(builds) == 1
    # a different rate, same tensors: the table is reused and the answer follows the new rate
    ema_triton(targets, onlines, 0.5)
    ema_reference(expected, onlines, 0.5)
    assert len(builds) == 1
    _check(targets, expected, F32)
    # other tensors (new addresses): a new table
    other_t, other_o = _pairs(F32, F32, shapes=[(5,), (4100,)], seed=3)
    other_expected = [t.clone() for t in other_t]
    ema_triton(other_t, other_o, 0.8)
    ema_reference(other_expected, other_o, 0.8)
    assert len(builds) == 2
    _check(other_t, other_expected, F32)


def test_few_launches(monkeypatch):
    counter = _CountingKernel(ema._ema_kernel)
    monkeypatch.setattr(ema, "_ema_kernel", counter)
    targets, onlines = _pairs(F32, F32, seed=4)
    ema_triton(targets, onlines, 0.9)
    n_chunks = sum(-(-t.numel() // ema.BLOCK) for t in targets)
    assert counter.grids == [(n_chunks,)]  # one launch for all tensors of one dtype pair
    # a mixed list: one launch per (target dtype, online dtype) group
    t1, o1 = _pairs(F32, F32, shapes=[(7,), (4097,)], seed=5)
    t2, o2 = _pairs(F32, BF16, shapes=[(9,), (33, 65)], seed=6)
    targets, onlines = [t1[0], t2[0], t1[1], t2[1]], [o1[0], o2[0], o1[1], o2[1]]
    expected = [t.clone() for t in targets]
    counter.grids.clear()
    ema_triton(targets, onlines, 0.9)
    assert sorted(counter.grids) == [(2,), (3,)]
    ema_reference(expected, onlines, 0.9)
    for a, b in zip(targets, expected):
        torch.testing.assert_close(a, b, **TOL[F32])
    info = ema.ema_plan_info(targets, onlines)
    assert [(g["tensors"], g["chunks"]) for g in info] == [(2, 3), (2, 2)]


def test_unaligned_views_and_empty():
    # views at an odd element offset: addresses not 16-byte aligned -> the unhinted path
    buf_t = (torch.randn(4096 * 2 + 3) + 2.0).to(DEVICE)
    buf_o = (torch.randn(4096 * 2 + 3) - 2.0).to(DEVICE)
    targets = [buf_t[1:4098], buf_t[4098:], torch.empty(0, device=DEVICE)]
    onlines = [buf_o[1:4098], buf_o[4098:], torch.empty(0, device=DEVICE)]
    expected = [t.clone() for t in targets]
    assert not ema.ema_plan_info(targets, onlines)[0]["aligned"]
    ema_triton(targets, onlines, 0.6)
    ema_reference(expected, onlines, 0.6)
    _check(targets, expected, F32)
    ema_triton([], [], 0.9)  # nothing to do


def test_rejects_bad_inputs():
    t = torch.randn(8, 6, device=DEVICE)
    o = torch.randn(8, 6, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        ema_triton([t.t()], [o], 0.9)
    with pytest.raises(ValueError, match="contiguous"):
        ema_triton([t], [o[:, ::2].t()], 0.9)
    with pytest.raises(ValueError, match="elements"):
        ema_triton([t], [o[:4]], 0.9)
    with pytest.raises(ValueError, match="targets"):
        ema_triton([t, t], [o], 0.9)
    with pytest.raises(ValueError, match="dtype"):
        ema_triton([t.double()], [o.double()], 0.9)

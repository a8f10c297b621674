"""Encoder + projector (spec section 2): initialisation, token layout, the stacked-views
forward, the reference ops, and the analytic FLOP count."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from epg_fast.flops import projector_macs, vit_macs
from epg_fast.kernels.ema import ema_reference
from epg_fast.kernels.layer_norm import layer_norm_reference
from epg_fast.kernels.patch_embed import patch_embed_reference
from epg_fast.models.encoder import ENCODER_PRESETS, MLP, Encoder, PretrainEncoder
from epg_fast.ops import Ops


def small(**kw) -> PretrainEncoder:
    torch.manual_seed(0)
    args = dict(image_size=16, patch_size=4, dim=32, depth=2, heads=2, proj_hidden=64, proj_dim=16) | kw
    return PretrainEncoder(**args)


def test_initialisation_follows_spec():
    dim = 768
    torch.manual_seed(0)
    enc = Encoder(64, 16, dim, 1, 12)
    qkv = enc.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (2 * dim))  # three D x D matrices, not xavier of [3D, D]
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.99 * bound
    fc1 = enc.blocks[0].mlp.fc1.weight
    assert fc1.abs().max() <= math.sqrt(6 / (dim + 4 * dim)) and fc1.abs().max() > 0.99 * math.sqrt(6 / (5 * dim))
    pw = enc.patch_embed.proj.weight
    pbound = math.sqrt(6 / (3 * 16 * 16 + dim))
    assert pw.abs().max() <= pbound and pw.abs().max() > 0.99 * pbound
    assert torch.all(enc.patch_embed.proj.bias == 0) and torch.all(enc.blocks[0].attn.proj.bias == 0)
    assert torch.all(enc.blocks[0].norm1.weight == 1) and torch.all(enc.blocks[0].norm1.bias == 0)
    assert 0 < enc.cls_token.std() < 1e-5
    assert enc.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert enc.blocks[0].attn.qkv.bias is None
    assert enc.pos_embed.shape == (1, 1 + 1 + 16, dim)  # [cls, time, 16 patches]


def test_forward_shapes_and_normalised_feature():
    m = small()
    x, t = torch.randn(5, 3, 16, 16), torch.rand(5) * 3 + 0.01
    z, h = m(x, t)
    assert z.shape == (5, 16) and h.shape == (5, 32)
    # h is the final LayerNorm (weight 1, bias 0 at init) of the cls token
    torch.testing.assert_close(h.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)


def test_noise_level_changes_the_output():
    m = small()
    x = torch.randn(2, 3, 16, 16)
    _, h1 = m(x, torch.full((2,), 0.01))
    _, h2 = m(x, torch.full((2,), 5.0))
    assert (h1 - h2).abs().max() > 1e-3  # the time token and c_in condition the network


def test_stacked_views_equal_separate_calls():
    """One encoder pass over [v1; v2; v3] with per-view BatchNorm = three separate calls."""
    m = small().train()
    views = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    ts = [torch.full((4,), v) for v in (0.01, 0.01, 2.0)]
    z, h = m(torch.cat(views), torch.cat(ts), 3, 2)
    for i in range(3):
        zi, hi = m(views[i], ts[i])
        torch.testing.assert_close(h[4 * i : 4 * i + 4], hi, atol=1e-5, rtol=1e-5)
        if i < 2:
            torch.testing.assert_close(z[4 * i : 4 * i + 4], zi, atol=1e-5, rtol=1e-5)
    assert z.shape[0] == 8


def test_patch_embed_reference_is_unfold_matmul():
    torch.manual_seed(1)
    x, w, b = torch.randn(3, 3, 12, 8), torch.randn(5, 3, 4, 4), torch.randn(5)
    c_in, pos = torch.rand(3) + 0.5, torch.randn(1, 6, 5)
    got = patch_embed_reference(x, w, b, c_in, pos)
    patches = F.unfold(x * c_in.view(-1, 1, 1, 1), 4, stride=4).transpose(1, 2)  # [B, L, C*p*p], row-major
    want = patches @ w.reshape(5, -1).T + b + pos
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_reference_with_modulation(dtype):
    torch.manual_seed(2)
    x = (torch.randn(3, 7, 24) * 3 + 1).to(dtype)
    w, b, shift, scale = torch.randn(24), torch.randn(24), torch.randn(3, 24), torch.randn(3, 24)
    got = layer_norm_reference(x, w, b, 1e-6, shift, scale)
    xf = x.float()
    mu, var = xf.mean(-1, keepdim=True), xf.var(-1, unbiased=False, keepdim=True)
    want = ((xf - mu) / torch.sqrt(var + 1e-6) * w + b) * (1 + scale[:, None]) + shift[:, None]
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_attention_sdpa_matches_softmax_formula():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 9, 3, 8) for _ in range(3))  # [B, T, H, hd]
    ops = Ops()
    got = ops.attention(q, k, v)
    assert ops.paths() == {"attention": "sdpa"}
    scores = torch.einsum("bthd,bshd->bhts", q, k) * 8**-0.5
    want = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ema_reference():
    torch.manual_seed(4)
    t, o = [torch.randn(5), torch.randn(2, 3)], [torch.randn(5), torch.randn(2, 3)]
    want = [0.9 * a + 0.1 * b for a, b in zip(t, o)]
    ema_reference(t, o, 0.9)
    for a, b in zip(t, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("preset", ["ViT-B", "EPG-L"])
def test_analytic_flops_match_flop_counter(preset):
    depth, dim, heads = ENCODER_PRESETS[preset]
    with torch.device("meta"):
        m = PretrainEncoder(image_size=256, patch_size=16, dim=dim, depth=depth, heads=heads).train()
        x, t = torch.randn(2, 3, 256, 256), torch.rand(2) + 0.1
    with FlopCounterMode(display=False) as counter:
        m(x, t)
    counted_macs = counter.get_total_flops() / 2 / 2  # counter: 2 per multiply-add; batch of 2
    want = vit_macs(256, 16, dim, depth) + projector_macs(dim, 4096, 256)
    assert counted_macs == pytest.approx(want, rel=1e-9)


def test_encoder_preset_sizes():
    depth, dim, heads = ENCODER_PRESETS["ViT-B"]
    with torch.device("meta"):
        n = sum(p.numel() for p in Encoder(256, 16, dim, depth, heads).parameters())
    assert n == pytest.approx(86.0e6, rel=0.01)  # the ViT-B/16 body


@pytest.mark.parametrize("preset", ["EPG-XL", "EPG-L"])
def test_epg_analytic_flops_match_flop_counter(preset):
    from epg_fast.flops import epg_macs
    from epg_fast.models.epg import build_epg

    with torch.device("meta"):
        m = build_epg(preset, 256, 16)
        x, t, y = torch.randn(2, 3, 256, 256), torch.rand(2) + 0.1, torch.zeros(2, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        m(x, t, y)
    p = m.patch_size
    want = epg_macs(256, p, m.dim, len(m.blocks), m.out_norm.normalized_shape[0])
    assert counter.get_total_flops() / 2 / 2 == pytest.approx(want, rel=1e-9)


def test_mlp_compiles_into_one_graph():
    """bias + GELU is left to torch.compile (inductor moves fc1's bias into the GELU's
    pointwise epilogue): the MLP must reach it as one graph, with nothing of ours in between."""
    mlp = MLP(16, 64)
    explained = torch._dynamo.explain(mlp)(torch.randn(2, 5, 16))
    assert explained.graph_break_count == 0 and explained.graph_count == 1

"""Model level: the EPG encoder with the fused kernels against the reference path, same
weights, same inputs: outputs and every parameter gradient agree."""

import pytest
import torch

from epg_fast.models.encoder import Block, PretrainEncoder
from epg_fast.models.epg import EPG
from epg_fast.ops import Ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ARGS = dict(image_size=16, patch_size=4, dim=48, depth=2, heads=2, proj_hidden=32, proj_dim=8)


def run(model: PretrainEncoder, x: torch.Tensor, t: torch.Tensor) -> tuple:
    z, h = model(x, t, 2, 1)
    ((z * torch.linspace(-1, 1, z.shape[-1], device=z.device)).sum() + (h**2).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return z.detach(), h.detach(), grads


def test_fused_encoder_matches_reference():
    torch.manual_seed(0)
    reference = PretrainEncoder(**ARGS, ops=Ops("reference")).to(DEVICE).train()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so their gradients are tested too
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    fused = PretrainEncoder(**ARGS, ops=Ops("triton")).to(DEVICE).train()
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(6, 3, 16, 16, device=DEVICE)
    t = torch.rand(6, device=DEVICE) * 4 + 0.01
    z_ref, h_ref, g_ref = run(reference, x, t)
    z_tri, h_tri, g_tri = run(fused, x, t)
    assert set(reference.encoder.ops.paths().values()) == {"reference", "sdpa"}
    assert fused.encoder.ops.paths()["layer_norm"] == "triton" and fused.encoder.ops.paths()["patch_embed"] == "triton"
    torch.testing.assert_close(h_tri, h_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_tri, z_ref, atol=1e-4, rtol=1e-4)
    for name in g_ref:
        # fp32 sums in a different order: errors scale with the gradient's magnitude (the
        # cls-token gradient reaches ~200 here), so the tolerance does too.
        atol = 1e-5 * g_ref[name].abs().max().item() + 1e-6
        torch.testing.assert_close(g_tri[name], g_ref[name], atol=atol, rtol=1e-3, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------- under autocast

# The Triton interpreter rounds fp32 -> bf16 toward zero (the GPU and torch: to nearest), so
# on CPU the fused path is checked under fp16 autocast, where both round to nearest.
AUTOCAST = [("reference", torch.bfloat16), ("triton", torch.bfloat16 if DEVICE == "cuda" else torch.float16)]


def _old_block_forward(self, x):
    """Block.forward before the residual add was fused into the MLP's LayerNorm."""
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def _use_old_path(monkeypatch) -> None:
    """Today's path before this change: LayerNorms write their input's dtype (autocast casts
    again before each matmul), the skip concatenation is promoted, the residual add unfused."""
    monkeypatch.setattr(Ops, "autocast_dtype", staticmethod(lambda x: None))
    monkeypatch.setattr(Block, "forward", _old_block_forward)


def run_autocast(model, dtype: torch.dtype, *inputs) -> tuple:
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=dtype):
        out = model(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o.float() * torch.linspace(-1, 1, o.shape[-1], device=o.device)).sum() for o in outs)
    loss.backward()
    return tuple(o.detach() for o in outs), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(new, old):
    (out_new, g_new), (out_old, g_old) = new, old
    for a, b in zip(out_new, out_old):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert g_new.keys() == g_old.keys()
    for name in g_old:
        assert torch.equal(g_new[name], g_old[name]), name


@pytest.mark.parametrize(("mode", "dtype"), AUTOCAST, ids=[m for m, _ in AUTOCAST])
def test_encoder_under_autocast_equals_the_old_path(mode, dtype, monkeypatch):
    """LayerNorms writing the autocast dtype and the fused residual add change no value: the
    outputs (z, and h in fp32) and every parameter gradient are bitwise today's."""
    torch.manual_seed(1)
    model = PretrainEncoder(**ARGS, ops=Ops(mode)).to(DEVICE).train()
    x = torch.randn(6, 3, 16, 16, device=DEVICE)
    t = torch.rand(6, device=DEVICE) * 4 + 0.01
    with torch.autocast(DEVICE, dtype=dtype):
        assert model.encoder.blocks[0].norm1(torch.randn(2, 3, 48, device=DEVICE)).dtype == dtype
    new = run_autocast(model, dtype, x, t, 2, 1)
    assert new[0][1].dtype == torch.float32  # h, read by the consistency loss in fp32
    assert model.encoder.ops.paths()["residual_norm"] == mode
    _use_old_path(monkeypatch)
    _assert_same(new, run_autocast(model, dtype, x, t, 2, 1))


@pytest.mark.parametrize("decoder_dim", [48, 64], ids=["identity", "projected"])
def test_epg_under_autocast_equals_the_old_path(decoder_dim, monkeypatch):
    """The whole EPG (decoder skip concatenation in bf16 included) equals today's path."""
    torch.manual_seed(2)
    model = EPG(16, 4, 48, 2, 2, decoder_dim, 2, num_classes=10, ops=Ops("reference")).to(DEVICE)
    with torch.no_grad():  # past the zero init, so every decoder path carries signal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x, t, y = torch.randn(3, 3, 16, 16, device=DEVICE), torch.rand(3, device=DEVICE) + 0.1, torch.tensor([0, 4, 10], device=DEVICE)
    new = run_autocast(model, torch.bfloat16, x, t, y)
    _use_old_path(monkeypatch)
    _assert_same(new, run_autocast(model, torch.bfloat16, x, t, y))


def test_fused_encoder_matches_reference_under_autocast():
    mode_dtype = AUTOCAST[1][1]
    torch.manual_seed(3)
    reference = PretrainEncoder(**ARGS, ops=Ops("reference")).to(DEVICE).train()
    fused = PretrainEncoder(**ARGS, ops=Ops("triton")).to(DEVICE).train()
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(6, 3, 16, 16, device=DEVICE)
    t = torch.rand(6, device=DEVICE) * 4 + 0.01
    (out_ref, g_ref), (out_tri, g_tri) = (run_autocast(m, mode_dtype, x, t, 2, 1) for m in (reference, fused))
    for a, b in zip(out_tri, out_ref):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    for name in g_ref:
        atol = 2e-2 * g_ref[name].abs().max().item() + 1e-6
        torch.testing.assert_close(g_tri[name], g_ref[name], atol=atol, rtol=2e-2, msg=lambda m: f"{name}: {m}")

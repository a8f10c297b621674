"""The DiT baseline (models/dit.py): published sizes, shapes, adaLN-Zero initialisation, the
fixed position embedding, and the fused-kernel path against the reference path."""

import pytest
import torch

from epg_fast.models.dit import DIT_PRESETS, DiT, build_dit
from epg_fast.ops import Ops


def tiny(**kw) -> DiT:
    torch.manual_seed(0)
    args = dict(input_size=8, patch_size=2, dim=32, depth=2, heads=2, num_classes=10) | kw
    return DiT(**args)


@pytest.mark.parametrize("preset", list(DIT_PRESETS))
def test_parameter_counts_match_published(preset):
    with torch.device("meta"):
        model = build_dit(f"{preset}/2")
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(DIT_PRESETS[preset].params, rel=0.01)


def test_position_embedding_is_a_fixed_buffer():
    m = tiny()
    assert "pos_embed" not in dict(m.named_parameters()) and "pos_embed" in m.state_dict()
    pos = m.pos_embed[0]  # [16 patches, 32]: columns 0..7 embed the column index, 16..23 the row
    assert pos.shape == (16, 32)
    col, row = torch.arange(16) % 4, torch.arange(16) // 4
    torch.testing.assert_close(pos[:, 0], col.float().sin())  # frequency 1
    torch.testing.assert_close(pos[:, 8], col.float().cos())
    torch.testing.assert_close(pos[:, 16], row.float().sin())
    torch.testing.assert_close(pos[:, 24], row.float().cos())


def test_forward_shape_and_zero_output_at_init():
    m = build_dit("DiT-S/4", input_size=32, num_classes=10)
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([3.0, 700.0]), torch.tensor([1, 10])  # 10: "no class"
    out = m(x, t, y)
    assert out.shape == (2, 8, 32, 32)
    assert torch.all(out == 0)  # adaLN-Zero: final modulation and linear start at zero


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="DiT-XL"):
        build_dit("DiT-XXL/2")
    with pytest.raises(ValueError, match="PRESET/PATCH"):
        build_dit("DiT-XL")


def test_fused_path_matches_reference():
    """Ops("triton") (the Triton interpreter on CPU) against the PyTorch references, forward
    and parameter gradients, with the zero-initialised weights made non-zero."""
    reference = tiny(ops=Ops("reference"))
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fused = tiny(ops=Ops("triton"))
    fused.load_state_dict(reference.state_dict())
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1.0, 250.0, 999.0]), torch.tensor([0, 4, 10])

    def run(m: DiT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = m(x, t, y)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    want, want_grads = run(reference)
    got, got_grads = run(fused)
    assert reference.ops.paths()["gated_adaln_norm"] == "reference"
    assert fused.ops.paths()["gated_adaln_norm"] == "triton" and fused.ops.paths()["patch_embed"] == "triton"
    assert want.abs().max() > 1e-3  # a non-trivial output
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)

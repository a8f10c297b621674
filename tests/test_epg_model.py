"""The EPG generative model (spec section 4): preset sizes, zero-init, conditioning, the
decoder's last-in-first-out skips (against a naive re-implementation), the denoiser
parameterisations and loading a pre-trained encoder."""

import math

import pytest
import torch
import torch.nn.functional as F

from epg_fast import schedule
from epg_fast.models.encoder import ENCODER_PRESETS, LN_EPS, Encoder, PretrainEncoder
from epg_fast.models.epg import ENCODER_PARTS, EPG, EPG_PRESETS, build_epg, denoise, load_encoder_from_pretrain
from epg_fast.ops import Ops

SMALL = dict(image_size=16, patch_size=4, dim=32, depth=3, heads=2, decoder_dim=48, decoder_heads=3, num_classes=10)


def small(**kw) -> EPG:
    torch.manual_seed(0)
    return EPG(**(SMALL | kw))


def perturb_zero_inits(model: EPG) -> None:
    """Random values where the model starts at zero, so every path carries signal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for block in model.decoder_blocks:
            block.adaLN_modulation[1].weight.normal_(std=0.1)
            block.adaLN_modulation[1].bias.normal_(std=0.1)
        model.out.weight.normal_(std=0.1)
        model.out.bias.normal_(std=0.1)
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial LN affine parameters
                p.add_(torch.randn_like(p) * 0.1)


def inputs(B=3, R=16, classes=10):
    torch.manual_seed(2)
    return torch.randn(B, 3, R, R), torch.rand(B) * 3 + 0.05, torch.randint(0, classes + 1, (B,))


@pytest.mark.parametrize("preset", list(EPG_PRESETS))
def test_preset_parameter_counts_match_published(preset):
    with torch.device("meta"):
        model = build_epg(preset, 256, 16)
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(EPG_PRESETS[preset].params, rel=0.005)


def test_preset_encoders_are_the_pretraining_encoders():
    for name, p in EPG_PRESETS.items():
        assert ENCODER_PRESETS[name] == (p.depth, p.dim, p.heads)
        assert p.decoder_dim % p.decoder_heads == 0 and (p.decoder_dim // p.decoder_heads) % 8 == 0


def test_encoder_parts_name_every_encoder_parameter():
    names = {k.split(".", 1)[0] for k in Encoder(16, 4, 32, 2, 2).state_dict()}
    assert names == set(ENCODER_PARTS)


def test_output_shape_and_zero_init():
    model = small()
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == (3, 3, 16, 16)
    assert torch.all(out == 0)  # `out` is zero-initialised
    for block in model.decoder_blocks:
        assert torch.all(block.adaLN_modulation[1].weight == 0) and torch.all(block.adaLN_modulation[1].bias == 0)
        bound = math.sqrt(6 / (48 + 32 + 48))  # xavier of skip_linear [48, 48 + 32]
        w = block.skip_linear.weight
        assert w.shape == (48, 48 + 32) and w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert torch.all(block.skip_linear.bias == 0) and block.attn.qkv.bias is None
        assert torch.all(block.norm1.weight == 1) and torch.all(block.norm1.bias == 0)
    assert model.class_embed.weight.shape == (10 + 1, 32)  # last row: the "no class" label
    assert model.encoder_to_decoder.weight.shape == (48, 32)
    big = EPG(16, 4, 64, 1, 1, 64, 1, num_classes=1000)
    assert big.class_embed.weight.shape == (1001, 64)
    assert big.class_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert isinstance(big.encoder_to_decoder, torch.nn.Identity)  # equal widths: no projection


def test_label_and_level_change_the_output():
    model = small()
    perturb_zero_inits(model)
    x, t, y = inputs()
    base = model(x, t, y)
    other_y = (y + 1) % 11
    assert (model(x, t, other_y) - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    assert (model(x, t * 2, y) - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    # per-sample: changing sample 0's label leaves the others untouched
    y2 = y.clone()
    y2[0] = (y[0] + 1) % 11
    out2 = model(x, t, y2)
    assert (out2[0] - base[0]).abs().max() > 1e-4
    torch.testing.assert_close(out2[1:], base[1:], atol=1e-6, rtol=0)


def test_decoder_block_i_gets_encoder_block_depth_minus_1_minus_i():
    model = small()
    enc_out, dec_skip = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, out, i=i: enc_out.__setitem__(i, out))
    for i, block in enumerate(model.decoder_blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: dec_skip.__setitem__(i, args[1]))
    model(*inputs())
    depth = len(model.blocks)
    for i in range(depth):
        assert dec_skip[i] is enc_out[depth - 1 - i]


def naive_forward(model: EPG, x_t, t, y):
    """The spec's section 4 written out with explicit loops and plain torch ops."""
    p, D = model.patch_size, model.dim
    B, R = x_t.shape[0], x_t.shape[-1]
    g = R // p

    def ln(v, norm, shift=None, scale=None):
        out = F.layer_norm(v, v.shape[-1:], norm.weight, norm.bias, LN_EPS)
        return out if shift is None else out * (1 + scale[:, None]) + shift[:, None]

    def attention(v, attn):
        Bv, T, C = v.shape
        hd = C // attn.heads
        q, k, val = (v @ attn.qkv.weight.T).split(C, dim=-1)
        heads = []
        for h in range(attn.heads):
            sl = slice(h * hd, (h + 1) * hd)
            w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd), dim=-1)
            heads.append(w @ val[..., sl])
        return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias

    def mlp(v, m):
        return F.linear(F.gelu(F.linear(v, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)

    xin = x_t / torch.sqrt(t**2 + 0.25)[:, None, None, None]
    patches = F.conv2d(xin, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p)
    patches = patches.flatten(2).transpose(1, 2)  # [B, L, D], row-major over the grid
    c_noise = 250 * torch.log(t)
    k = torch.arange(D // 2)
    args = c_noise[:, None] * torch.exp(-math.log(10000) * k / (D // 2))[None]
    time = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    label = model.class_embed.weight[y]
    cls = model.cls_token[0, 0][None] + label
    x = torch.cat([cls[:, None], time[:, None], patches], dim=1) + model.pos_embed
    encoder_outputs = []
    for block in model.blocks:
        x = x + attention(ln(x, block.norm1), block.attn)
        x = x + mlp(ln(x, block.norm2), block.mlp)
        encoder_outputs.append(x)
    x = ln(x, model.norm)
    x = x @ model.encoder_to_decoder.weight.T + model.encoder_to_decoder.bias
    c = time + label
    depth = len(model.blocks)
    for i, block in enumerate(model.decoder_blocks):
        skip = encoder_outputs[depth - 1 - i]
        x = ln(F.linear(torch.cat([x, skip], dim=-1), block.skip_linear.weight, block.skip_linear.bias), block.skip_norm)
        mod = F.linear(F.silu(c), block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.split(model.decoder_blocks[0].norm1.weight.shape[0], dim=-1)
        x = x + gate_a[:, None] * attention(ln(x, block.norm1, shift_a, scale_a), block.attn)
        x = x + gate_m[:, None] * mlp(ln(x, block.norm2, shift_m, scale_m), block.mlp)
    vec = F.linear(ln(x[:, 2:], model.out_norm), model.out.weight, model.out.bias)  # [B, L, p*p*3]
    img = torch.empty(B, 3, R, R)
    for gi in range(g):
        for gj in range(g):
            for p1 in range(p):
                for p2 in range(p):
                    for ch in range(3):
                        img[:, ch, gi * p + p1, gj * p + p2] = vec[:, gi * g + gj, (p1 * p + p2) * 3 + ch]
    return img


def test_matches_naive_reimplementation():
    model = small()
    perturb_zero_inits(model)
    x, t, y = inputs()
    with torch.no_grad():
        got = model(x, t, y)
        want = naive_forward(model, x, t, y)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_permuting_encoder_blocks_changes_the_output():
    """The skips carry each block's identity: reversing the encoder changes the result."""
    model = small()
    perturb_zero_inits(model)
    x, t, y = inputs()
    with torch.no_grad():
        base = model(x, t, y)
        model.blocks = torch.nn.ModuleList(reversed(list(model.blocks)))
        assert (model(x, t, y) - base).abs().max() > 1e-3


def test_denoise_parameterisations():
    model = small()
    perturb_zero_inits(model)
    x, t, y = inputs()
    t_min = schedule.resolution_shift(16) * schedule.SIGMA_MIN
    with torch.no_grad():
        out = model(x, t, y)
        assert torch.equal(denoise(model, x, t, y, t_min, prediction="x0"), out)
        d = denoise(model, x, t, y, t_min)
        s = (-1, 1, 1, 1)
        torch.testing.assert_close(d, schedule.c_skip(t, t_min).view(s) * x + schedule.c_out(t, t_min).view(s) * out)
        # boundary condition of the consistency parameterisation: D(x) = x at t = t_min
        torch.testing.assert_close(denoise(model, x, torch.full_like(t, t_min), y, t_min), x, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="prediction"):
        denoise(model, x, t, y, t_min, prediction="eps")


def test_load_encoder_from_pretrain():
    torch.manual_seed(3)
    enc_args = dict(image_size=16, patch_size=4, dim=32, depth=3, heads=2)
    pre = PretrainEncoder(proj_hidden=16, proj_dim=8, **enc_args)
    model = small()
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] not in ENCODER_PARTS}
    missing, unexpected = load_encoder_from_pretrain(model, pre.state_dict())
    assert missing == [] and unexpected == []
    own = model.state_dict()
    for key, value in pre.encoder.state_dict().items():
        assert torch.equal(own[key], value)
    for key, value in decoder_before.items():
        assert torch.equal(own[key], value)
    # same noisy input -> same encoder features as the pre-training network
    x, t, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.norm(Encoder.forward(model, x, t)[:, 0]), pre.features(x, t))

    partial = pre.state_dict()
    del partial["encoder.blocks.1.mlp.fc2.bias"]
    partial["encoder.extra"] = torch.zeros(1)
    partial["head.weight"] = torch.zeros(1)
    missing, unexpected = load_encoder_from_pretrain(small(), partial)
    assert missing == ["blocks.1.mlp.fc2.bias"] and unexpected == ["encoder.extra", "head.weight"]

    wrong = pre.state_dict()
    wrong["encoder.pos_embed"] = torch.zeros(1, 5, 32)
    with pytest.raises(ValueError, match="encoder.pos_embed"):
        load_encoder_from_pretrain(small(), wrong)


def test_fused_kernels_match_reference():
    """The decoder's modulated and gated LayerNorms through the Triton kernels (interpreter on
    CPU) equal the reference path, outputs and parameter gradients."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = small(depth=2, ops=Ops("reference")).to(device)
    perturb_zero_inits(reference)
    fused = small(depth=2, ops=Ops("triton")).to(device)
    fused.load_state_dict(reference.state_dict())
    x, t, y = (v.to(device) for v in inputs(B=2))
    results = []
    for model in (reference, fused):
        out = model(x, t, y)
        (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert reference.ops.paths()["gated_adaln_norm"] == "reference"
    assert fused.ops.paths()["gated_adaln_norm"] == "triton"
    (ref, g_ref), (tri, g_tri) = results
    torch.testing.assert_close(tri, ref, atol=1e-4, rtol=1e-4)
    for name in g_ref:
        torch.testing.assert_close(g_tri[name], g_ref[name], atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------
# Agreement with the reference implementation's model construction (issue 10, items 1 and 8)


def test_dropout_only_on_decoder_attention_output():
    """The reference builds the fine-tuned model's encoder with drop=0 and gives its decoder
    blocks the rate only as the attention's proj_drop (their MLPs get 0)."""
    model = small(dropout=0.5)
    active = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
    assert active == {f"decoder_blocks.{i}.attn.drop" for i in range(SMALL["depth"])}
    assert all(m.p == 0.5 for n, m in model.named_modules() if n in active)
    # In training mode the encoder (every skip the decoder sees) is deterministic.
    model.train()
    x, t, y = inputs()
    first = Encoder.forward(model, x, t, cls_cond=model.class_embed(y))
    assert torch.equal(first, Encoder.forward(model, x, t, cls_cond=model.class_embed(y)))
    # The pre-training encoder keeps dropout in every block (the reference's RCMViT gets drop).
    pre = PretrainEncoder(image_size=16, patch_size=4, dim=32, depth=2, heads=2, dropout=0.5)
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in pre.modules()) == 2 * 2


def test_fresh_epg_init_is_whole_matrix_xavier():
    """A fresh EPG model (no init.encoder): every linear layer, encoder qkv included, is xavier
    over its whole matrix (qkv [3D, D]: bound sqrt(6 / (D + 3D))); adaLN and `out` zero."""
    model = EPG(16, 4, 64, 2, 2, 96, 2, num_classes=10)
    zero = {"out"} | {f"decoder_blocks.{i}.adaLN_modulation.1" for i in range(2)}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if name in zero:
            assert torch.all(m.weight == 0) and torch.all(m.bias == 0), name
            continue
        fan_out, fan_in = m.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        top = m.weight.abs().max().item()
        assert 0.97 * bound < top <= bound, (name, top, bound)
        assert m.bias is None or torch.all(m.bias == 0)
    assert math.sqrt(6 / (64 + 3 * 64)) < math.sqrt(6 / (2 * 64))  # the per-q/k/v bound is wider
    pw = model.patch_embed.proj.weight  # the encoder's own init: xavier with fan_in 3 p p
    assert pw.abs().max().item() <= math.sqrt(6 / (3 * 4 * 4 + 64))

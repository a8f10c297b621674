"""Checkpoint conversion: reference-named state dicts (names written out here from the
reference's layout, independently of our modules) into our models and back, the error
messages, and the command line."""

import subprocess
import sys

import pytest
import torch

from epg_fast.convert import ConvertError, convert, unwrap
from epg_fast.models.encoder import PretrainEncoder
from epg_fast.models.epg import EPG, load_encoder_from_pretrain

R, P, DEPTH, CLASSES = 16, 4, 2, 10


def vit_block(prefix: str, d: int) -> dict:
    return {
        f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
        f"{prefix}.attn.qkv.weight": (3 * d, d),
        f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
        f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
        f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
        f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,),
    }


def encoder_shapes(d: int) -> dict:
    shapes = {
        "patch_embed.proj.weight": (d, 3, P, P), "patch_embed.proj.bias": (d,),
        "cls_token": (1, 1, d), "pos_embed": (1, (R // P) ** 2 + 2, d),
        "norm.weight": (d,), "norm.bias": (d,),
    }
    for i in range(DEPTH):
        shapes |= vit_block(f"blocks.{i}", d)
    return shapes


def reference_epg(enc: int, dec: int, seed: int = 0) -> dict:
    shapes = encoder_shapes(enc) | {
        "out_norm.weight": (dec,), "out_norm.bias": (dec,),
        "out.weight": (P * P * 3, dec), "out.bias": (P * P * 3,),
        "class_embed.weight": (CLASSES + 1, enc),
    }
    if enc != dec:
        shapes |= {"encoder_to_decoder.weight": (dec, enc), "encoder_to_decoder.bias": (dec,)}
    for i in range(DEPTH):
        b = f"decoder_blocks.{i}"
        shapes |= vit_block(b, dec) | {
            f"{b}.skip_linear.weight": (dec, dec + enc), f"{b}.skip_linear.bias": (dec,),
            f"{b}.skip_norm.weight": (dec,), f"{b}.skip_norm.bias": (dec,),
            f"{b}.adaLN_modulation.1.weight": (6 * dec, enc), f"{b}.adaLN_modulation.1.bias": (6 * dec,),
        }
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


def reference_pretrain(enc: int, hidden: int = 24, out: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in encoder_shapes(enc).items()}
    sd |= {
        "projection_head.0.weight": torch.randn(hidden, enc, generator=g),
        "projection_head.3.weight": torch.randn(hidden, hidden, generator=g),
        "projection_head.6.weight": torch.randn(out, hidden, generator=g),
    }
    for i in (1, 4):
        sd |= {
            f"projection_head.{i}.weight": torch.rand(hidden, generator=g) + 0.5,
            f"projection_head.{i}.bias": torch.randn(hidden, generator=g),
            f"projection_head.{i}.running_mean": torch.randn(hidden, generator=g),
            f"projection_head.{i}.running_var": torch.rand(hidden, generator=g) + 0.5,
            f"projection_head.{i}.num_batches_tracked": torch.tensor(7),
        }
    return sd


def epg(enc: int, dec: int) -> EPG:
    return EPG(R, P, enc, DEPTH, 2, dec, 2, num_classes=CLASSES)


@pytest.mark.parametrize("enc, dec", [(64, 96), (64, 64)])
def test_reference_epg_loads_into_our_model_and_runs(enc, dec):
    kind, ours = convert(reference_epg(enc, dec))
    assert kind == "epg"
    assert ("encoder_to_decoder.weight" in ours) == (enc != dec)
    model = epg(enc, dec)
    model.load_state_dict(ours, strict=True)
    x, t, y = torch.randn(2, 3, R, R), torch.tensor([0.1, 3.0]), torch.tensor([3, CLASSES])
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, 3, R, R) and torch.isfinite(out).all() and out.abs().max() > 0


@pytest.mark.parametrize("enc, dec", [(64, 96), (64, 64)])
def test_round_trips_are_exact(enc, dec):
    torch.manual_seed(0)
    model_sd = epg(enc, dec).state_dict()
    kind, ref = convert(model_sd, to="reference")
    _, back = convert(ref)
    assert kind == "epg" and back.keys() == model_sd.keys()
    assert all(torch.equal(back[k], model_sd[k]) for k in model_sd)
    src = reference_epg(enc, dec)
    _, again = convert(convert(src)[1], to="reference")
    assert again.keys() == src.keys() and all(torch.equal(again[k], src[k]) for k in src)


def test_pretraining_checkpoint_goes_into_pretrain_encoder():
    src = reference_pretrain(64)
    kind, ours = convert(src)
    assert kind == "encoder"
    assert "encoder.blocks.1.attn.qkv.weight" in ours and "projection_head.4.running_var" in ours
    model = PretrainEncoder(proj_hidden=24, proj_dim=8, image_size=R, patch_size=P, dim=64, depth=DEPTH, heads=2)
    model.load_state_dict(ours, strict=True)
    z, h = model.eval()(torch.randn(2, 3, R, R), torch.tensor([0.1, 3.0]))
    assert z.shape == (2, 8) and torch.isfinite(z).all() and h.shape == (2, 64)
    # ...and from there into the generative model's encoder
    assert load_encoder_from_pretrain(epg(64, 96), ours) == ([], [])
    _, back = convert(ours, to="reference")
    assert back.keys() == src.keys() and all(torch.equal(back[k], src[k]) for k in src)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_shape_mismatch_names_key_and_both_shapes():
    src = reference_epg(64, 96)
    src["decoder_blocks.1.mlp.fc1.weight"] = torch.zeros(10, 96)
    with pytest.raises(ConvertError) as err:
        convert(src)
    msg = one_line(err)
    assert "decoder_blocks.1.mlp.fc1.weight" in msg and "[10, 96]" in msg and "[384, 96]" in msg
    # against a preset: the small file is not an EPG-XL
    with pytest.raises(ConvertError) as err:
        convert(reference_epg(64, 96), preset="EPG-XL")
    msg = one_line(err)
    assert "patch_embed.proj.weight" in msg and "[64, 3, 4, 4]" in msg and "[768, 3, 16, 16]" in msg


def test_unknown_and_missing_keys():
    src = reference_epg(64, 96)
    src["decoder_blocks.0.attn.qkv.bias"] = torch.zeros(288)
    with pytest.raises(ConvertError) as err:
        convert(src)
    assert "unknown key 'decoder_blocks.0.attn.qkv.bias'" in one_line(err)
    src = reference_pretrain(64)
    src["blocks.5.norm1.weight"] = torch.zeros(64)  # a block the architecture does not have
    del src["blocks.1.norm1.weight"]
    with pytest.raises(ConvertError) as err:
        convert(src)
    assert "blocks.1.norm1.weight" in one_line(err)  # 6 blocks inferred: 1..5 are missing
    src = reference_pretrain(64)
    del src["projection_head.4.running_mean"]
    with pytest.raises(ConvertError, match="missing 1 key.*'?projection_head.4.running_mean"):
        convert(src)
    with pytest.raises(ConvertError, match="already in our naming"):
        convert(convert(reference_pretrain(64))[1])


def test_wrappers():
    a, b = reference_epg(64, 96, seed=0), reference_epg(64, 96, seed=1)
    assert unwrap(a) == (a, None)
    assert unwrap({"model": a})[1] == "model"
    sd, which = unwrap({"model": a, "ema": b, "step": 3})
    assert which == "ema" and sd is not b and torch.equal(sd["out.weight"], b["out.weight"])
    sd, which = unwrap({"model": a, "ema": b}, weights="model")
    assert which == "model" and torch.equal(sd["out.weight"], a["out.weight"])
    with pytest.raises(ConvertError, match="no 'ema' weights"):
        unwrap({"model": a}, weights="ema")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "epg_fast.convert", *map(str, args)], capture_output=True, text=True)


def test_cli_end_to_end(tmp_path):
    src = reference_epg(64, 96)
    torch.save({"ema": src}, tmp_path / "ref.pth")
    done = run_cli(tmp_path / "ref.pth", tmp_path / "ours.pt")
    assert done.returncode == 0, done.stderr
    assert "'ema' weights" in done.stdout and "EPG model" in done.stdout
    ours = torch.load(tmp_path / "ours.pt", weights_only=True)
    epg(64, 96).load_state_dict(ours, strict=True)
    assert all(torch.equal(ours[k], src[k]) for k in src)

    src["out.weight"] = torch.zeros(5, 5)
    torch.save(src, tmp_path / "bad.pth")
    failed = run_cli(tmp_path / "bad.pth", tmp_path / "never.pt", "--to", "ours")
    assert failed.returncode == 2 and not (tmp_path / "never.pt").exists()
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: shape mismatch for 'out.weight'")

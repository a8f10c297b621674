"""The dispatch seam: an Ops' kernel mode (from config, EPG_KERNELS overriding it), per-device
path choice, and its record of the paths taken."""

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from epg_fast import ops
from epg_fast.config import Config, read_config
from epg_fast.models.encoder import Encoder
from epg_fast.ops import Ops


def test_auto_uses_references_on_cpu_and_kernels_on_cuda():
    auto = Ops()
    assert auto.kernels_for(torch.device("cpu")) == "reference"
    assert auto.kernels_for(torch.device("cuda", 0)) == "triton"


def test_reference_mode_everywhere():
    assert Ops("reference").kernels_for(torch.device("cuda", 0)) == "reference"


def test_bad_modes_fail_at_construction():
    with pytest.raises(ValueError, match="must be one of"):
        Ops("fast")
    with pytest.raises(ValueError, match="attention mode must be one of"):
        Ops(attention_mode="eager")


def test_environment_overrides_config(monkeypatch):
    monkeypatch.delenv("EPG_KERNELS", raising=False)
    assert Ops.from_config("triton", "sdpa") == Ops("triton", "sdpa")
    monkeypatch.setenv("EPG_KERNELS", "reference")
    assert Ops.from_config("triton", "sdpa") == Ops("reference", "sdpa")
    assert Ops("triton").kernel_mode == "triton"  # built directly, an Ops ignores the environment
    monkeypatch.setenv("EPG_KERNELS", "fast")
    with pytest.raises(ValueError, match="must be one of"):
        Ops.from_config("auto")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(ops, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        Ops("triton").kernels_for(torch.device("cpu"))
    monkeypatch.setattr(ops, "_INTERPRET", True)
    assert Ops("triton").kernels_for(torch.device("cpu")) == "triton"


def test_each_model_records_its_own_paths_and_its_copies_share_them():
    """Two models with different modes in one process do not affect each other; the EMA
    shadow (a deep copy) shares its original's Ops, and the state dict holds no trace of it."""
    fused, plain = Encoder(8, 4, 16, 1, 2, ops=Ops("triton")), Encoder(8, 4, 16, 1, 2, ops=Ops("reference"))
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 0.5)
    shadow = copy.deepcopy(fused)
    assert shadow.ops is fused.ops and shadow.blocks[0].attn.ops is fused.ops
    shadow(x, t)
    plain(x, t)
    assert fused.ops.paths() == {"patch_embed": "triton", "layer_norm": "triton", "residual_norm": "triton", "attention": "sdpa"}
    assert plain.ops.paths() == {"patch_embed": "reference", "layer_norm": "reference", "residual_norm": "reference", "attention": "sdpa"}
    assert Encoder(8, 4, 16, 1, 2).ops == Ops()  # the default: the auto modes
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert not any("ops" in k for k in fused.state_dict())


def test_readme_documents_every_config_key():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)?)`", readme))

    def keys(section, prefix=""):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                yield from keys(value, f"{f.name}.")
            elif f.name != "name":
                yield prefix + f.name

    missing = [k for k in keys(Config()) if k not in documented]
    assert not missing, f"config keys missing from the README's reference: {missing}"


def test_pinned_sdpa_backends():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 9, 3, 8) for _ in range(3))  # [B, T, H, hd]
    math = Ops(attention_mode="math")
    torch.testing.assert_close(math.attention(q, k, v), Ops(attention_mode="sdpa").attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert math.paths() == {"attention": "sdpa-math"}
    for mode in ("cudnn", "efficient"):
        with pytest.raises(RuntimeError, match=f"model.attention={mode} needs CUDA tensors"):
            Ops(attention_mode=mode).attention(q, k, v)
        assert Ops(attention_mode=mode).attention_backend(torch.device("cuda", 0), torch.bfloat16) == f"sdpa-{mode}"
    assert read_config(None, ["model.attention=cudnn"]).model.attention == "cudnn"


def test_autocast_dtype_and_cat_for_matmul():
    """Under autocast the pieces are cast before the concatenation: bitwise the values the
    matmul saw before (fp32 concatenation cast by autocast), in the autocast dtype."""
    torch.manual_seed(1)
    fused = Ops("reference")
    x, skip = torch.randn(2, 5, 8, dtype=torch.bfloat16), torch.randn(2, 5, 4)
    w = torch.randn(6, 12)
    assert fused.autocast_dtype(skip) is None
    assert fused.cat_for_matmul([x, skip]).dtype == torch.float32  # no autocast: torch's promotion
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.autocast_dtype(skip) == torch.bfloat16
        cat = fused.cat_for_matmul([x, skip])
        assert cat.dtype == torch.bfloat16
        assert torch.equal(F.linear(cat, w), F.linear(torch.cat([x, skip], -1), w))

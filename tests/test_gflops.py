"""DiT's analytic FLOP count (flops.dit_macs) against torch's FLOP counter and DiT's published
GFLOPs, and the GFLOPs table (benchmarks/gflops.py) end to end."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from epg_fast.flops import dit_macs
from epg_fast.models.dit import DIT_PRESETS, build_dit

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gflops.py"

# DiT paper (Peebles & Xie 2023), GFLOPs (multiply-adds) per forward: (name, latent size) -> GFLOPs.
PUBLISHED = {("DiT-XL/2", 32): 118.6, ("DiT-XL/2", 64): 524.6, ("DiT-L/2", 32): 80.7, ("DiT-B/2", 32): 23.0,
             ("DiT-S/2", 32): 6.06}


def analytic(name: str, latent: int) -> int:
    preset, patch = name.split("/")
    p = DIT_PRESETS[preset]
    return dit_macs(latent, int(patch), p.dim, p.depth)


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-XL/2", "DiT-B/4"])
def test_analytic_flops_match_flop_counter(name):
    with torch.device("meta"):
        m = build_dit(name, 32)
        x, t, y = torch.randn(2, 4, 32, 32), torch.rand(2) * 999, torch.zeros(2, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        m(x, t, y)
    assert counter.get_total_flops() / 2 / 2 == analytic(name, 32)  # 2 FLOPs per multiply-add; batch of 2


@pytest.mark.parametrize(("name", "latent"), list(PUBLISHED))
def test_published_gflops(name, latent):
    assert analytic(name, latent) / 1e9 == pytest.approx(PUBLISHED[name, latent], rel=0.01)


def run_script(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_table_prints_every_model():
    out = run_script()
    for model in ("EPG-L/16", "EPG-XL/16", "EPG-XXL/16", "EPG-G/16", "EPG-L/32", "DiT-S/8", "DiT-XL/2"):
        assert model in out, model
    assert "2.27*" in out and "3.04*" in out  # DiT's own FID, marked


def test_json_report():
    report = json.loads(run_script("--json", "--nfe-epg", "75", "--nfe-dit", "250"))
    rows = {(r["model"], r["resolution"], r["nfe"]): r for r in report["rows"]}
    for (name, latent), gflops in PUBLISHED.items():
        row = rows[name, latent * 8, 500]  # 250 steps, each a CFG-doubled forward
        assert row["forward_gflops"] == pytest.approx(gflops, rel=0.01)
        assert row["sampling_gflops"] == pytest.approx(500 * row["forward_gflops"] + row["vae_decode_gflops"])
    assert rows["DiT-XL/2", 256, 500]["vae_decode_gflops"] == 310 and rows["DiT-XL/2", 512, 500]["fid"] == 3.04
    xl = rows["EPG-XL/16", 256, 75]
    assert xl["fid"] == 2.04 and xl["vae_decode_gflops"] is None
    assert xl["sampling_gflops"] == pytest.approx(75 * xl["forward_gflops"])
    assert set(xl["train_step_gflops"]) == {"pretrain", "denoise", "consistency"}
    assert rows["EPG-L/16", 256, 1]["fid"] == 8.82  # the one-step consistency model
    assert rows["EPG-L/32", 512, 75]["fid"] == 2.35


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed (--plot only)")
def test_plot(tmp_path):
    out = tmp_path / "gflops.png"
    run_script("--plot", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

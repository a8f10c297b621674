"""Compute per image of EPG and DiT: forward, sampling and training GFLOPs, with published FID.

    python benchmarks/gflops.py [--json] [--plot FILE.png] [--nfe-epg 75] [--nfe-dit 250]

Rows: the EPG presets at 256 px (patch 16) and 512 px (patch 32), and the one-step
consistency EPG-L/16; DiT-S/B/L/XL at patch 2, 4 and 8 at 256 px and DiT-XL/2 at 512 px.
All counts are analytic (epg_fast/flops.py, equal to torch.utils.flop_counter's count / 2;
see tests/test_model.py and tests/test_gflops.py); parameter counts come from building each
model on the meta device. Runs anywhere, no GPU, in seconds. The footnotes printed under the
table (and under "footnotes" in --json) state every convention.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from epg_fast.config import ModelConfig
from epg_fast.flops import dit_macs, epg_macs, finetune_step_macs, pretrain_step_macs, projector_macs, vit_macs
from epg_fast.models.dit import DIT_PRESETS, build_dit
from epg_fast.models.epg import EPG_PRESETS, build_epg

GIGA = 1e9
VAE_FACTOR = 8  # SD-VAE: a 256 px image is a 32 x 32 latent
# SD-VAE decoder GFLOPs per image, documented constants (EPG_SPEC section 7), not computed here.
VAE_DECODER_GFLOPS = {256: 310.0, 512: 1230.0}
EPG_PATCH = {256: 16, 512: 32}

# Published FID-50K on class-conditional ImageNet: (model, resolution, sampler) -> FID.
EPG_FID = {  # EPG paper (Lei et al. 2025), EPG_SPEC section 7
    ("EPG-XL/16", 256, "heun"): 2.04,
    ("EPG-XXL/16", 256, "heun"): 1.87,
    ("EPG-G/16", 256, "heun"): 1.58,
    ("EPG-L/32", 512, "heun"): 2.35,
    ("EPG-L/16", 256, "onestep"): 8.82,
}
DIT_FID = {("DiT-XL/2", 256): 2.27, ("DiT-XL/2", 512): 3.04}  # DiT paper: 250 DDPM steps, CFG 1.5

FOOTNOTES = [
    "GFLOPs in DiT's convention: one multiply-add = one FLOP, one image (hardware FLOPs are twice "
    "these). 'fwd' is one forward pass without CFG doubling, as DiT reports it.",
    "params: counted on models built on the meta device (EPG: the fine-tuning model, encoder + decoder; "
    "EPG_PRESETS' published counts agree within 0.1% at /16. DiT: without the fixed position embedding).",
    "VAE (const): the SD-VAE decoder, latent models only; documented constants (EPG_SPEC section 7), not computed.",
    "sample/img counts what sampling spends: NFE x fwd (+ one VAE decode). EPG: Heun on 32 levels with "
    "guidance only inside sigma (0.19, 1.61], {nfe_epg} forwards as this project's sampler counts them "
    "(a guided forward counts 2); one-step: 1. DiT: {nfe_dit} DDPM steps with CFG, each a forward of the "
    "doubled batch: {nfe_dit} x 2 forwards.",
    "train step/img = forward + backward (backward = 2 forwards). pretrain: six encoder forwards "
    "(three with gradients) and six projector forwards (two with gradients); 'enc fwd' is one "
    "encoder + projector forward. denoise: 3 x fwd; consistency: 3 x fwd + the target's forward. "
    "DiT's training step (in the denoise column): 3 x fwd, the VAE encoding of the image not counted.",
    "FID-50K as published: EPG from the EPG paper (EPG_SPEC section 7); '*' marks DiT's own "
    "numbers (DiT paper: 250 DDPM steps, CFG scale 1.5).",
]


@dataclass
class Row:
    model: str  # e.g. "EPG-XL/16", "DiT-XL/2"
    family: str  # "EPG" or "DiT"
    resolution: int  # image pixels
    params_m: float
    forward_gflops: float
    sampler: str
    nfe: int  # forwards spent per sampled image
    sampling_gflops: float  # nfe * forward (+ VAE decode)
    vae_decode_gflops: float | None = None  # documented constant, latent models only
    encoder_forward_gflops: float | None = None  # EPG: pre-training encoder + projector, one forward
    train_step_gflops: dict[str, float] = field(default_factory=dict)  # per image, per stage
    fid: float | None = None
    fid_source: str | None = None


def params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def epg_rows(nfe: int) -> list[Row]:
    rows = []
    for preset, p in EPG_PRESETS.items():
        for resolution, patch in EPG_PATCH.items():
            cfg = ModelConfig(preset=preset, depth=p.depth, dim=p.dim, heads=p.heads, decoder_dim=p.decoder_dim,
                              decoder_heads=p.decoder_heads, image_size=resolution, patch_size=patch)
            extra = cfg.cls_tokens + 1
            encoder = vit_macs(resolution, patch, p.dim, p.depth, cfg.mlp_ratio, extra)
            forward = epg_macs(resolution, patch, p.dim, p.depth, p.decoder_dim, cfg.mlp_ratio, extra) / GIGA
            with torch.device("meta"):
                params = params_m(build_epg(preset, resolution, patch))
            common = dict(
                family="EPG", resolution=resolution, params_m=params, forward_gflops=forward,
                encoder_forward_gflops=(encoder + projector_macs(p.dim, cfg.proj_hidden, cfg.proj_dim)) / GIGA,
                train_step_gflops={
                    "pretrain": pretrain_step_macs(cfg) / GIGA,
                    "denoise": finetune_step_macs(cfg, target_forward=False) / GIGA,
                    "consistency": finetune_step_macs(cfg, target_forward=True) / GIGA,
                },
            )
            name = f"{preset}/{patch}"
            samplers = [("heun", "Heun 32, interval CFG", nfe)]
            if (name, resolution, "onestep") in EPG_FID:
                samplers.append(("onestep", "one-step (consistency)", 1))
            for key, sampler, n in samplers:
                fid = EPG_FID.get((name, resolution, key))
                rows.append(Row(model=name, sampler=sampler, nfe=n, sampling_gflops=n * forward, fid=fid,
                                fid_source="EPG paper" if fid is not None else None, **common))
    return rows


def dit_rows(steps: int) -> list[Row]:
    configs = [(f"{preset}/{patch}", 256) for preset in DIT_PRESETS for patch in (2, 4, 8)] + [("DiT-XL/2", 512)]
    rows = []
    for name, resolution in configs:
        preset, patch = name.split("/")
        p, latent = DIT_PRESETS[preset], resolution // VAE_FACTOR
        forward = dit_macs(latent, int(patch), p.dim, p.depth) / GIGA
        with torch.device("meta"):
            params = params_m(build_dit(name, latent))
        nfe, vae = 2 * steps, VAE_DECODER_GFLOPS[resolution]
        fid = DIT_FID.get((name, resolution))
        rows.append(Row(
            model=name, family="DiT", resolution=resolution, params_m=params, forward_gflops=forward,
            sampler=f"DDPM {steps}, CFG (x2)", nfe=nfe, sampling_gflops=nfe * forward + vae, vae_decode_gflops=vae,
            train_step_gflops={"denoise": 3 * forward}, fid=fid, fid_source="DiT paper" if fid is not None else None,
        ))
    return rows


def _g(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if value < 100 else f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def format_table(rows: list[Row], nfe_epg: int, nfe_dit: int) -> str:
    header = ["model", "px", "params M", "fwd", "VAE (const)", "sampler", "NFE", "sample/img",
              "enc fwd", "pretrain", "denoise", "consistency", "FID"]
    lines = []
    for r in rows:
        t = r.train_step_gflops
        fid = "-" if r.fid is None else f"{r.fid:.2f}" + ("*" if r.family == "DiT" else "")
        lines.append([
            r.model, str(r.resolution), f"{r.params_m:.1f}", _g(r.forward_gflops),
            "-" if r.vae_decode_gflops is None else f"{r.vae_decode_gflops:,.0f}",
            r.sampler, str(r.nfe), _g(r.sampling_gflops), _g(r.encoder_forward_gflops),
            _g(t.get("pretrain")), _g(t.get("denoise")), _g(t.get("consistency")), fid,
        ])
    widths = [max(len(x[i]) for x in [header] + lines) for i in range(len(header))]
    left = {0, 5}  # text columns; numbers are right-aligned

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    title = ("GFLOPs per image. Sampling: fwd, VAE (const), sample/img. Training: enc fwd (one pre-training "
             "forward), then one step of each stage: pretrain, denoise, consistency.")
    out = [title, fmt(header), "  ".join("-" * w for w in widths)]
    family = rows[0].family
    for r, cells in zip(rows, lines):
        if r.family != family:
            out.append("")
            family = r.family
        out.append(fmt(cells))
    out.append("")
    notes = [n.format(nfe_epg=nfe_epg, nfe_dit=nfe_dit) for n in FOOTNOTES]
    out += [f"({i}) {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(out)


def plot(rows: list[Row], path: Path) -> None:
    """Sampling GFLOPs per image (log x) against published FID, one labelled point per model."""
    import matplotlib  # lazily: only --plot needs it (main checks that it is installed)

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, marker in (("EPG", "o"), ("DiT", "s")):
        points = [r for r in rows if r.family == family and r.fid is not None]
        ax.scatter([r.sampling_gflops for r in points], [r.fid for r in points], marker=marker, label=family)
        for r in points:
            label = f"{r.model} {r.resolution}px" + (" 1-step" if r.nfe == 1 else "")
            ax.annotate(label, (r.sampling_gflops, r.fid), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.15)  # room for the labels of the outermost points
    ax.set_xlabel("sampling GFLOPs per image (multiply-adds; NFE x forward + VAE decode)")
    ax.set_ylabel("FID-50K (published)")
    ax.set_title("ImageNet class-conditional: sampling cost vs FID")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="sampling GFLOPs vs published FID (matplotlib)")
    parser.add_argument("--nfe-epg", type=int, default=75, help="forwards per EPG sample (Heun 32 levels + interval CFG)")
    parser.add_argument("--nfe-dit", type=int, default=250, help="DiT sampling steps (each a CFG-doubled forward)")
    args = parser.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")

    rows = epg_rows(args.nfe_epg) + dit_rows(args.nfe_dit)
    if args.json:
        report = {
            "convention": "multiply-adds (DiT's GFLOPs), one image; forward_gflops without CFG doubling",
            "nfe": {"epg": args.nfe_epg, "dit_steps": args.nfe_dit, "dit_forwards_per_step": 2},
            "vae_decoder_gflops": {str(k): v for k, v in VAE_DECODER_GFLOPS.items()} | {"source": "documented constants"},
            "rows": [asdict(r) for r in rows],
            "footnotes": [n.format(nfe_epg=args.nfe_epg, nfe_dit=args.nfe_dit) for n in FOOTNOTES],
        }
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(format_table(rows, args.nfe_epg, args.nfe_dit))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()

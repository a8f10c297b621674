"""Attention backends of `model.attention`, timed at the decoder's shapes.

    python benchmarks/attention.py [--smoke] [--json FILE] [--markdown FILE]

Each backend runs through `epg_fast.ops.Ops.attention`, the trainer's own call: flash-attn 2
(`flash`, when importable), PyTorch SDPA's cuDNN backend (`cudnn`), its memory-efficient
backend (`efficient`), and SDPA's own choice (`sdpa`). Shapes: the decoder of each EPG preset
at 256 px / patch 16 (258 tokens: cls + time + 256 patches), bf16, batch 256; the head dims
64, 72, 120 and 128 are those of EPG-L, -XL, -XXL and -G. Timed forward and forward+backward
(`triton.testing.do_bench` medians); TFLOP/s counts the two attention matmuls (4 B H T^2 hd
forward, 2.5 times that backward). `err`: max relative difference of the output from the
`math` backend in fp32 on the same inputs.

Without CUDA only `--smoke` runs: the `math` backend (and `sdpa`) on a tiny shape, to check
the harness. A backend that cannot run a shape (not importable, unsupported head dim) is
reported with its one-line error, never replaced by another.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also when a test loads this file by path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # epg_fast, when run from a bare checkout
from report import fmt, git_commit, write_report  # noqa: E402

from epg_fast.models.epg import EPG_PRESETS  # noqa: E402
from epg_fast.ops import Ops  # noqa: E402

TOKENS = 258
GPU_BACKENDS = ("flash", "cudnn", "efficient", "sdpa")
CPU_BACKENDS = ("math", "sdpa")


def time_ms(fn, cuda: bool, smoke: bool) -> float:
    if cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5 if smoke else 25, rep=20 if smoke else 100, return_mode="median"))
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        fn()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def shapes(smoke: bool) -> list[tuple[str, int, int, int, int]]:
    """(preset, batch, tokens, heads, head dim)."""
    if smoke:
        return [("tiny", 2, 10, 2, 8)]
    return [(name, 256, TOKENS, p.decoder_heads, p.decoder_dim // p.decoder_heads) for name, p in EPG_PRESETS.items()]


def run(smoke: bool, cuda: bool) -> list[dict]:
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for preset, B, T, H, hd in shapes(smoke):
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, T, H, hd, device=dev, dtype=dtype, generator=g).requires_grad_(True) for _ in range(3))
        dout = torch.randn(B, T, H, hd, device=dev, dtype=dtype, generator=g)
        with torch.no_grad():
            want = Ops(attention_mode="math").attention(q.float(), k.float(), v.float())
        fwd_flops = 4.0 * B * H * T * T * hd
        for backend in GPU_BACKENDS if cuda else CPU_BACKENDS:
            for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
                row = dict(preset=preset, shape=f"[{B}, {T}, {H}, {hd}] {str(dtype).removeprefix('torch.')}",
                           head_dim=hd, backend=backend, mode=mode)
                try:
                    ops = Ops(attention_mode=backend)
                    row["path"] = ops.attention_backend(dev, dtype)
                    if mode == "fwd":
                        def step(ops=ops):
                            with torch.no_grad():
                                return ops.attention(q, k, v)
                        row["err"] = float((step().float() - want).abs().max() / want.abs().max())
                    else:
                        def step(ops=ops):
                            q.grad = k.grad = v.grad = None
                            ops.attention(q, k, v).backward(dout)
                        step()
                    row["ms"] = time_ms(step, cuda, smoke)
                    row["tflops"] = flops / row["ms"] / 1e9
                except Exception as e:  # not importable, or this backend cannot run this shape
                    row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
                rows.append(row)
                print(f"# {preset} hd={hd} {backend:9s} {mode:7s} "
                      + (row["error"] if "error" in row else f"{row['ms']:.3f} ms {row['tflops']:.1f} TFLOP/s"), flush=True)
        del q, k, v, dout, want
        if cuda:
            torch.cuda.empty_cache()
    return rows


def render_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Attention backends — {meta['label']}", ""]
    lines += [f"- **{k.replace('_', ' ')}**: {meta[k]}" for k in ("device", "torch", "date", "git_commit")]
    lines += ["", "| preset | shape | mode | backend | path | ms | TFLOP/s | err |", "|---|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['shape']} | {r['mode']} | {r['backend']} | | error: {r['error']} | | |")
        else:
            lines.append(f"| {r['preset']} | {r['shape']} | {r['mode']} | {r['backend']} | {r.get('path', '')} | "
                         f"{r['ms']:.3f} | {r['tflops']:.1f} | {fmt(r.get('err'), '.1e')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few iterations (CPU: the math backend)")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--markdown", help="write the Markdown report here")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: the attention backends compared here are CUDA kernels; use --smoke", file=sys.stderr)
        return 2
    meta = dict(
        label=(torch.cuda.get_device_name(0) if cuda else "CPU, math backend — timings meaningless, checks the harness")
        + (" (smoke)" if cuda and args.smoke else ""),
        device=torch.cuda.get_device_name(0) if cuda else "CPU",
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        git_commit=git_commit(),
        smoke=args.smoke,
    )
    rows = run(args.smoke, cuda)
    md = render_markdown(meta, rows)
    write_report(args.json, args.markdown, dict(meta=meta, results=rows), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

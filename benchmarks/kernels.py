"""Kernel benchmarks: every fused Triton op against its PyTorch baselines.

    python benchmarks/kernels.py [--smoke] [--json FILE] [--markdown FILE]

Ops, at the shapes of EPG-XL/16 at 256 px (batch 256, 258 tokens, bf16 activations):
- LayerNorm of the encoder (D = 768, weight + bias) and AdaLN LayerNorm of the decoder
  (D = 1584, per-sample shift/scale), `layer_norm_triton` vs `layer_norm_reference` eager and
  under `torch.compile`; the encoder's LN also vs NVIDIA apex's `FusedLayerNorm` (the classic
  fast LayerNorm) where apex is importable (NGC containers; never installed by us: without
  it the report says the baseline was skipped), in bf16 like the activations;
- gated AdaLN LayerNorm of the decoder, `gated_layer_norm_triton` (r = x + gate * h, then
  the modulated LN of r) vs its reference, eager and compiled;
- patch embedding (3 x 256 x 256 images, p = 16, D = 768), `patch_embed_triton` vs
  `patch_embed_reference` and vs a plain fp32 `nn.Conv2d` under bf16 autocast followed by
  flatten/transpose (all with the c_in scale and the position embedding);
- the target-network EMA over the parameter shapes of EPG-XL (fp32 targets and onlines),
  `ema_triton` vs `ema_reference` (torch._foreach_lerp_) vs a per-parameter Python loop.

Each is timed forward and forward+backward (the EMA: the update). Bandwidth counts the bytes
an op must minimally move (see each `_build_*` below), reported as GB/s and as a fraction of
the device copy bandwidth measured here (a large `dst.copy_(src)`, 2 x bytes / time).
"triton x" is how many times faster the Triton variant is than the row's variant.

On CUDA, timings are `triton.testing.do_bench` medians (CUDA events, warmup, L2 flushed
between runs). Without CUDA only `--smoke` runs: tiny shapes through the Triton interpreter
(set here before any kernel module is imported), a few iterations, to check the harness.
An op whose kernel module or function does not import is reported as missing and skipped;
a variant that raises is reported with its error. Results are written after every op, so a
run stopped by a timeout still leaves what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also when a test loads this file by path
from report import fmt, git_commit, write_report  # noqa: E402

EPS = 1e-6
CPU_LABEL = "CPU (interpreter) — timings meaningless, checks the harness"

# The issue's targets on the H200, judged on the forward+backward rows (EMA: the update).
# The LN targets are stated for AdaLN LN; the encoder's plain LN (same kernel, no
# modulation) is held to them too.
LN_OPS = ("ln_enc", "adaln_dec", "gated_dec")
TARGETS = [
    (op, "fwd+bwd", kind, baseline, goal)
    for op in LN_OPS
    for kind, baseline, goal in (("speedup", "eager", 2.0), ("speedup", "compile", 1.2), ("bandwidth", None, 0.80))
] + [
    ("patch_embed", "fwd+bwd", "speedup", "conv2d+autocast", 1.5),
    ("ema", "update", "speedup", "loop", 10.0),
    ("ema", "update", "bandwidth", None, 0.80),
]

def apex_layer_norm() -> tuple[type | None, str]:
    """apex's FusedLayerNorm class (None when apex does not import) and a note for the report."""
    try:
        from apex.normalization import FusedLayerNorm
    except Exception as e:  # ImportError, or an apex built without its CUDA extensions
        return None, f"not importable ({type(e).__name__}): apex baseline skipped"
    return FusedLayerNorm, "apex.normalization.FusedLayerNorm"


class Missing(Exception):
    """The op's Triton function (or its reference) does not import yet."""


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ----------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, cuda: bool, smoke: bool):
        self.cuda, self.smoke = cuda, smoke

    def __call__(self, fn, leaves=()) -> float:
        """Median milliseconds of fn(); leaves get .grad = None before every run."""
        if self.cuda:
            from triton.testing import do_bench

            warmup, rep = (5, 20) if self.smoke else (25, 100)
            return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(leaves) or None, return_mode="median"))
        times = []
        for i in range(3 if self.smoke else 10):
            for t in leaves:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            if i:  # the first run is the warmup
                times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def copy_bandwidth(dev: torch.device, timer: Timer, smoke: bool) -> float:
    """GB/s of a large device copy: 2 x bytes / time (read + write)."""
    n = (1 << 16 if smoke else 1 << 28) if dev.type == "cuda" else 1 << 20  # 1 GiB of fp32 on GPU
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes(src) / ms / 1e6


# ----------------------------------------------------------------------------- op builders
# Each builder returns a dict: title, shape, modes {mode: bytes}, flops {mode: flops} (opt.),
# variants {name: callable() -> output(s)}, baselines (names), leaves (tensors whose .grad is
# reset), grads (the upstream gradients for the outputs), and optionally `update` (EMA).


def _rand(*shape, dev, dtype, scale=1.0, offset=0.0, grad=False):
    t = (torch.randn(*shape, device=dev, dtype=torch.float32) * scale + offset).to(dtype)
    return t.requires_grad_(grad)


def _compiled(fn, backend: str):
    return torch.compile(fn, backend=backend, dynamic=False)


def _build_layer_norm(dev, smoke: bool, backend: str, adaln: bool) -> dict:
    try:
        from epg_fast.kernels.layer_norm import layer_norm_reference, layer_norm_triton
    except Exception as e:  # ImportError, AttributeError, or a kernel module still broken
        raise Missing(f"{type(e).__name__}: {e}") from e
    B, T, D = (2, 10, 96 if adaln else 64) if smoke else (256, 258, 1584 if adaln else 768)
    bf16 = torch.bfloat16
    x = _rand(B, T, D, dev=dev, dtype=bf16, grad=True)
    # as in the trainer: fp32 parameters, bf16 activations (the autocast outputs)
    w = _rand(D, dev=dev, dtype=torch.float32, scale=0.1, offset=1.0, grad=True)
    b = _rand(D, dev=dev, dtype=torch.float32, scale=0.1, grad=True)
    shift = _rand(B, D, dev=dev, dtype=bf16, scale=0.1, grad=True) if adaln else None
    scale = _rand(B, D, dev=dev, dtype=bf16, scale=0.1, grad=True) if adaln else None
    dy = _rand(B, T, D, dev=dev, dtype=bf16)
    ref = layer_norm_reference
    comp = _compiled(ref, backend)
    variants = {
        "triton": lambda: layer_norm_triton(x, w, b, EPS, shift, scale),
        "eager": lambda: ref(x, w, b, EPS, shift, scale),
        "compile": lambda: comp(x, w, b, EPS, shift, scale),
    }
    leaves = [t for t in (x, w, b, shift, scale) if t is not None]
    apex_ln, _ = apex_layer_norm()
    if apex_ln is not None and not adaln and dev.type == "cuda":
        apex_mod = apex_ln(D, eps=EPS).to(dev, bf16)  # weights in the activation dtype: apex's plain path
        with torch.no_grad():
            apex_mod.weight.copy_(w)
            apex_mod.bias.copy_(b)
        variants["apex"] = lambda: apex_mod(x)
        leaves += [apex_mod.weight, apex_mod.bias]
    # fwd: read x (+ weight, bias, shift, scale), write y.
    # bwd: read dy, x (saved), weight, scale; write dx, dweight, dbias, dshift, dscale.
    fwd = nbytes(x, w, b, shift, scale) + nbytes(x)
    bwd = nbytes(dy, x, w, scale) + nbytes(x, w, b, shift, scale)
    return dict(
        title="AdaLN LayerNorm (decoder)" if adaln else "LayerNorm (encoder)",
        shape=f"[{B}, {T}, {D}] bf16" + (", shift/scale [B, D]" if adaln else ""),
        modes={"fwd": fwd, "fwd+bwd": fwd + bwd},
        variants=variants,
        leaves=leaves,
        grads=(dy,),
    )


def _build_gated(dev, smoke: bool, backend: str) -> dict:
    try:
        from epg_fast.kernels.layer_norm import gated_layer_norm_reference, gated_layer_norm_triton
    except Exception as e:
        raise Missing(f"{type(e).__name__}: {e}") from e
    B, T, D = (2, 10, 96) if smoke else (256, 258, 1584)
    bf16 = torch.bfloat16
    x = _rand(B, T, D, dev=dev, dtype=bf16, grad=True)
    h = _rand(B, T, D, dev=dev, dtype=bf16, grad=True)
    gate = _rand(B, D, dev=dev, dtype=bf16, scale=0.5, grad=True)
    w = _rand(D, dev=dev, dtype=torch.float32, scale=0.1, offset=1.0, grad=True)
    b = _rand(D, dev=dev, dtype=torch.float32, scale=0.1, grad=True)
    shift = _rand(B, D, dev=dev, dtype=bf16, scale=0.1, grad=True)
    scale = _rand(B, D, dev=dev, dtype=bf16, scale=0.1, grad=True)
    dr = _rand(B, T, D, dev=dev, dtype=bf16)
    dy = _rand(B, T, D, dev=dev, dtype=bf16)
    ref = gated_layer_norm_reference
    comp = _compiled(ref, backend)
    # fwd: read x, h (+ gate, weight, bias, shift, scale), write r, y.
    # bwd: read dr, dy, r (saved), h, gate, weight, scale; write dx, dh (+ the 5 small grads).
    small = nbytes(gate, w, b, shift, scale)
    fwd = nbytes(x, h) + small + 2 * nbytes(x)
    bwd = nbytes(dr, dy, x, h) + nbytes(gate, w, scale) + nbytes(x, h) + small
    return dict(
        title="gated AdaLN LayerNorm (decoder)",
        shape=f"[{B}, {T}, {D}] bf16, r = x + gate*h",
        modes={"fwd": fwd, "fwd+bwd": fwd + bwd},
        variants={
            "triton": lambda: gated_layer_norm_triton(x, gate, h, w, b, EPS, shift, scale),
            "eager": lambda: ref(x, gate, h, w, b, EPS, shift, scale),
            "compile": lambda: comp(x, gate, h, w, b, EPS, shift, scale),
        },
        leaves=[x, h, gate, w, b, shift, scale],
        grads=(dr, dy),
    )


def _build_patch_embed(dev, smoke: bool, backend: str) -> dict:
    try:
        from epg_fast.kernels.patch_embed import patch_embed_reference, patch_embed_triton
    except Exception as e:
        raise Missing(f"{type(e).__name__}: {e}") from e
    B, R, p, D = (2, 32, 8, 64) if smoke else (256, 256, 16, 768)
    C, L, K = 3, (R // p) ** 2, 3 * p * p
    bf16 = torch.bfloat16
    x = _rand(B, C, R, R, dev=dev, dtype=bf16)  # training images need no gradient
    c_in = torch.rand(B, device=dev) + 0.5
    w = _rand(D, C, p, p, dev=dev, dtype=bf16, scale=K**-0.5, grad=True)
    bias = _rand(D, dev=dev, dtype=bf16, scale=0.1, grad=True)
    pos = _rand(1, L, D, dev=dev, dtype=bf16, scale=0.02, grad=True)
    dy = _rand(B, L, D, dev=dev, dtype=bf16)
    conv = torch.nn.Conv2d(C, D, p, stride=p).to(dev)  # fp32 parameters, as an nn.Module holds them
    with torch.no_grad():
        conv.weight.copy_(w.float())
        conv.bias.copy_(bias.float())

    def conv_autocast():
        with torch.autocast(dev.type, dtype=bf16):
            y = conv(x * c_in.view(-1, 1, 1, 1).to(x.dtype))
            return y.flatten(2).transpose(1, 2) + pos

    # fwd: read x, c_in, weight, bias, pos; write y [B, L, D].
    # bwd (x needs no gradient): read dy, x, c_in; write dweight, dbias, dpos.
    y_bytes = B * L * D * 2
    fwd = nbytes(x, c_in, w, bias, pos) + y_bytes
    bwd = y_bytes + nbytes(x, c_in, w, bias, pos)
    mnk = 2.0 * B * L * D * K
    return dict(
        title="patch embedding",
        shape=f"[{B}, {C}, {R}, {R}] bf16, p={p}, D={D}",
        modes={"fwd": fwd, "fwd+bwd": fwd + bwd},
        flops={"fwd": mnk, "fwd+bwd": 2 * mnk},  # backward: dweight only
        variants={
            "triton": lambda: patch_embed_triton(x, w, bias, c_in, pos),
            "eager": lambda: patch_embed_reference(x, w, bias, c_in, pos),
            "conv2d+autocast": conv_autocast,
        },
        leaves=[w, bias, pos, conv.weight, conv.bias],
        grads=(dy,),
    )


def epg_xl_param_shapes(enc_blocks=12, enc_d=768, dec_blocks=12, dec_d=1584, patch=16, res=256, classes=1000):
    """Parameter shapes of EPG-XL/16 (EPG_SPEC section 4): encoder + decoder + head."""
    L = (res // patch) ** 2
    shapes = [(enc_d, 3, patch, patch), (enc_d,), (1, 1, enc_d), (1, L + 2, enc_d)]
    for _ in range(enc_blocks):  # pre-norm ViT block, qkv without bias
        shapes += [(enc_d,), (enc_d,), (3 * enc_d, enc_d), (enc_d, enc_d), (enc_d,), (enc_d,), (enc_d,)]
        shapes += [(4 * enc_d, enc_d), (4 * enc_d,), (enc_d, 4 * enc_d), (enc_d,)]
    shapes += [(enc_d,), (enc_d,), (classes + 1, enc_d), (dec_d, enc_d), (dec_d,)]  # norm, class, enc->dec
    for _ in range(dec_blocks):  # skip linear + LN, adaLN-Zero modulation, attention, MLP
        shapes += [(dec_d, dec_d + enc_d), (dec_d,), (dec_d,), (dec_d,), (6 * dec_d, enc_d), (6 * dec_d,)]
        shapes += [(dec_d,), (dec_d,), (3 * dec_d, dec_d), (dec_d, dec_d), (dec_d,), (dec_d,), (dec_d,)]
        shapes += [(4 * dec_d, dec_d), (4 * dec_d,), (dec_d, 4 * dec_d), (dec_d,)]
    shapes += [(dec_d,), (dec_d,), (patch * patch * 3, dec_d), (patch * patch * 3,)]  # out norm + linear
    return shapes


def _build_ema(dev, smoke: bool, backend: str) -> dict:
    try:
        from epg_fast.kernels.ema import ema_reference, ema_triton
    except Exception as e:
        raise Missing(f"{type(e).__name__}: {e}") from e
    shapes = epg_xl_param_shapes(1, 32, 1, 48, 8, 32, 10) if smoke else epg_xl_param_shapes()
    targets = [_rand(*s, dev=dev, dtype=torch.float32) for s in shapes]
    onlines = [_rand(*s, dev=dev, dtype=torch.float32) for s in shapes]
    n = sum(math.prod(s) for s in shapes)
    rate = 0.999

    def loop():
        for t, o in zip(targets, onlines):
            t.mul_(rate).add_(o, alpha=1 - rate)

    variants = {
        "triton": lambda: ema_triton(targets, onlines, rate),
        "foreach": lambda: ema_reference(targets, onlines, rate),
        "loop": loop,
    }
    for block, warps in ((2048, 4), (8192, 8), (16384, 16)):  # the default is 4096 x 8
        variants[f"triton b{block}w{warps}"] = lambda b=block, w=warps: ema_triton(
            targets, onlines, rate, block=b, num_warps=w
        )
    return dict(
        title="EMA (target network)",
        shape=f"{len(shapes)} tensors, {n / 1e6:.1f}M params fp32",
        modes={"update": 3 * 4 * n},  # read target + online, write target
        variants=variants,
        leaves=[],
        grads=(),
        update=(targets, onlines, rate, ema_triton, ema_reference),
    )


# Run order: the quick ops first, the LN ops (torch.compile: ~30 s each on a fresh machine)
# after them, so a run cut short by a timeout still has the most rows.
OPS = {
    "ema": _build_ema,
    "patch_embed": _build_patch_embed,
    "ln_enc": lambda dev, smoke, be: _build_layer_norm(dev, smoke, be, adaln=False),
    "adaln_dec": lambda dev, smoke, be: _build_layer_norm(dev, smoke, be, adaln=True),
    "gated_dec": _build_gated,
}


# ----------------------------------------------------------------------------- running


def _outputs(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def _step(fn, mode: str, grads):
    if mode == "fwd+bwd":

        def run():
            torch.autograd.backward(_outputs(fn()), grads)

        return run
    return fn


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _check(case: dict, mode: str) -> float | None:
    """Max relative error of the Triton variant against the eager reference (outputs for
    fwd, every leaf gradient for fwd+bwd, the updated targets for the EMA)."""
    if "update" in case:
        targets, onlines, rate, fast, ref = case["update"]
        a = [t.clone() for t in targets]
        b = [t.clone() for t in targets]
        fast(a, onlines, rate)
        ref(b, onlines, rate)
        return max(_rel_err(x, y) for x, y in zip(a, b))
    fast, ref = case["variants"]["triton"], case["variants"]["eager"]
    if mode == "fwd":
        with torch.no_grad():
            return max(_rel_err(x, y) for x, y in zip(_outputs(fast()), _outputs(ref())))
    leaves = case["leaves"]
    got = []
    for fn in (fast, ref):
        for t in leaves:
            t.grad = None
        torch.autograd.backward(_outputs(fn()), case["grads"])
        got.append([None if t.grad is None else t.grad.clone() for t in leaves])
    for t in leaves:
        t.grad = None
    return max(_rel_err(x, y) for x, y in zip(*got) if x is not None and y is not None)


def run_op(name: str, dev, args, timer: Timer, copy_gbps: float) -> tuple[str, list[dict]]:
    try:
        case = OPS[name](dev, args.smoke, args.compile_backend)
    except Missing as e:
        return f"missing ({e})", []
    except Exception as e:  # building the inputs failed (out of memory, ...)
        return f"error building: {type(e).__name__}: {e}", []
    rows = []
    for mode, bytes_ in case["modes"].items():
        try:
            err = _check(case, mode)
        except Exception as e:
            err = f"{type(e).__name__}: {str(e)[:120]}"
        times = {}
        for variant, fn in case["variants"].items():
            row = dict(op=name, title=case["title"], shape=case["shape"], mode=mode, variant=variant, bytes=bytes_)
            try:
                step = _step(fn, mode, case["grads"])
                step()  # warm: compiles (Triton JIT, torch.compile), autotunes
                sync(dev.type == "cuda")
                ms = timer(step, case["leaves"] if mode == "fwd+bwd" else ())
                times[variant] = ms
                row.update(ms=ms, gbps=bytes_ / ms / 1e6)
                row["copy_frac"] = row["gbps"] / copy_gbps
                flops = case.get("flops", {}).get(mode)
                if flops:
                    row["tflops"] = flops / ms / 1e9
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                if args.verbose:
                    traceback.print_exc()
            if variant == "triton":
                row["err"] = err
            rows.append(row)
        fast = times.get("triton")
        for row in rows:
            if row["mode"] == mode and fast and row.get("ms"):
                row["speedup"] = row["ms"] / fast  # how many times faster triton is than this row
    del case
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return "ok", rows


def evaluate_targets(rows: list[dict], ops: dict[str, str], judged: bool) -> list[dict]:
    out = []
    for op, mode, kind, baseline, goal in TARGETS:
        if op not in ops:  # not asked for (--ops)
            continue
        by_variant = {r["variant"]: r for r in rows if r["op"] == op and r["mode"] == mode}
        fast = by_variant.get("triton", {})
        if kind == "speedup":
            what = f"triton >= {goal:g}x {baseline}"
            base = by_variant.get(baseline, {})
            value = base["ms"] / fast["ms"] if fast.get("ms") and base.get("ms") else None
            shown = None if value is None else f"{value:.2f}x"
        else:
            what = f">= {goal:.0%} of copy bandwidth"
            value = fast.get("copy_frac")
            shown = None if value is None else f"{value:.0%}"
        if not judged:
            status = "n/a (not a GPU run)"
        elif value is None:
            status = "n/a (" + (ops.get(op, "not run") if ops.get(op, "not run") != "ok" else "no timing") + ")"
        else:
            status = "PASS" if value >= goal else "FAIL"
        out.append(dict(op=op, mode=mode, target=what, goal=goal, value=value, measured=shown, status=status))
    return out


# ----------------------------------------------------------------------------- reporting






def render_markdown(meta: dict, rows: list[dict], ops: dict[str, str], targets: list[dict]) -> str:
    lines = [f"# Kernel benchmarks — {meta['label']}", ""]
    for k in ("device", "torch", "triton", "date", "git_commit", "copy_bandwidth", "timing", "compile_backend", "apex"):
        lines.append(f"- **{k.replace('_', ' ')}**: {meta[k]}")
    lines += [
        "",
        "Bandwidth counts the bytes each op must minimally move; `% copy` is that over the measured copy "
        "bandwidth. `triton x` = this row's time / the Triton time (> 1: Triton is faster). `err` = max "
        "relative error of the Triton result vs the eager reference (outputs, or every input gradient).",
        "",
        "| op | shape | mode | variant | ms | GB/s | % copy | TFLOP/s | triton x | err |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, status in ops.items():
        if status != "ok":
            lines.append(f"| {name} | | | **{status}** | | | | | | |")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['mode']} | {r['variant']} | error: {r['error']} | | | | | |")
            continue
        err = r.get("err")
        err_s = "" if err is None else (f"{err:.1e}" if isinstance(err, float) else f"check failed: {err}")
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['mode']} | {r['variant']} | {r['ms']:.4f} | {r['gbps']:.0f} | "
            f"{r['copy_frac']:.0%} | {fmt(r.get('tflops'), '.1f')} | {fmt(r.get('speedup'), '.2f')} | {err_s} |"
        )
    lines += [
        "",
        "## Targets (issue; judged on the H200 run only)",
        "",
        "AdaLN LN fwd+bwd >= 2x eager, >= 1.2x torch.compile and >= 80% of copy bandwidth; EMA >= 10x the "
        "per-parameter loop and >= 80% of copy bandwidth; patch embed fwd+bwd >= 1.5x Conv2d under bf16 autocast.",
        "",
        "| op | mode | target | measured | PASS/FAIL |",
        "|---|---|---|---:|---|",
    ]
    for t in targets:
        lines.append(f"| {t['op']} | {t['mode']} | {t['target']} | {t['measured'] or ''} | {t['status']} |")
    return "\n".join(lines) + "\n"


def write_outputs(args, meta, rows, ops, targets) -> str:
    md = render_markdown(meta, rows, ops, targets)
    write_report(args.json, args.markdown, dict(meta=meta, ops=ops, results=rows, targets=targets), md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations (CPU: through the Triton interpreter)")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--markdown", help="write the Markdown report here")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--compile-backend", help="torch.compile backend (default: inductor; aot_eager for a CPU smoke run)")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; ops not started by then are skipped (0: none)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing variants")
    args = ap.parse_args(argv)
    t_start = time.time()

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            print("no CUDA device: the full shapes would take hours through the Triton interpreter; use --smoke", file=sys.stderr)
            return 2
        # before any kernel module (and its @triton.jit decorators) is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.compile_backend is None:
        # inductor's first CPU compile takes ~40 s here; aot_eager still traces through dynamo + AOTAutograd
        args.compile_backend = "inductor" if cuda else "aot_eager"
    names = [n.strip() for n in args.ops.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPS]
    if unknown:
        ap.error(f"unknown ops {unknown}; known: {list(OPS)}")

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    timer = Timer(cuda, args.smoke)
    copy_gbps = copy_bandwidth(dev, timer, args.smoke)
    if cuda:
        device_name = torch.cuda.get_device_name(0)
        label = "smoke (tiny shapes) — timings not representative" if args.smoke else f"{device_name}, EPG-XL/16 shapes"
        timing = "triton.testing.do_bench median (CUDA events, L2 flushed)"
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}), TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
        label = CPU_LABEL
        timing = "time.perf_counter median of 2 runs after 1 warmup"
    meta = dict(
        label=label,
        device=device_name,
        torch=torch.__version__,
        triton=triton_version,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        git_commit=git_commit(),
        copy_bandwidth=f"{copy_gbps:.0f} GB/s (dst.copy_(src), 2 x bytes / time)",
        copy_gbps=copy_gbps,
        timing=timing,
        compile_backend=args.compile_backend,
        apex=apex_layer_norm()[1] if cuda else "not on CPU: apex baseline skipped",
        smoke=args.smoke,
    )
    print(f"# {label}\n# device {device_name}; copy bandwidth {copy_gbps:.0f} GB/s", flush=True)

    rows: list[dict] = []
    ops: dict[str, str] = {}
    for name in names:
        if args.time_budget and time.time() - t_start > args.time_budget:
            ops[name] = "skipped (time budget)"
            continue
        t0 = time.time()
        status, op_rows = run_op(name, dev, args, timer, copy_gbps)
        ops[name] = status
        rows += op_rows
        print(f"# {name}: {status} ({time.time() - t0:.1f} s)", flush=True)
        write_outputs(args, meta, rows, ops, evaluate_targets(rows, ops, cuda and not args.smoke))
    md = write_outputs(args, meta, rows, ops, evaluate_targets(rows, ops, cuda and not args.smoke))
    print(md)
    print(f"# total {time.time() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

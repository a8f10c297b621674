"""Training-throughput benchmark: images/s, TFLOP/s and MFU of whole training steps.

    python benchmarks/throughput.py [--smoke] [--json FILE] [--markdown FILE] [--chart FILE.png]
        [--steps N] [--warmup N] [--workloads W ...] [--variants V ...] [--batch [W=]N ...]
        [--time-budget S] [--compile-backend B]

Workloads. One GPU, a plain PyTorch training step: the trainer's own stage object
(epg_fast.stages: its per-step draws and loss, from a uint8 batch as the loader hands it
over), backward, AdamW step, EMA update. No DeepSpeed and no data loading: the inputs are
synthetic and made on the device once, so this measures the model step alone (the trainer
adds the loader and DeepSpeed).
- `pretrain`: EPG-XL/16 pre-training: the ViT-B/16 encoder + projector (4096 / 256) at
  256 px, batch 128, with the real objective (`pretrain_loss`: the online model, its EMA
  copy as the target network, the three views, one shared noise tensor, a level index drawn
  from the curriculum at mid-training, i.e. 1281 levels).
- `denoise`: EPG-XL/16 `denoise` fine-tuning (583M parameters, `denoise_loss`), batch 64.
- `dit`: DiT-XL/2 on 32x32x4 latents, batch 256, with a plain epsilon-prediction MSE at a
  uniformly drawn DDPM step (DiT's linear betas, 1000 steps). DiT's learned-variance (VLB)
  term is left out: it is elementwise work on the output, no matmul, so throughput does
  not depend on it. The SD-VAE encoding of the images is NOT included and not run: see
  `sd_vae_encoder_macs` (about 136 G multiply-adds per 256 px image, forward only), which
  a pipeline that encodes images online adds to every image; precomputed latents cost
  nothing per step. Reported as "missing" when `epg_fast.models.dit` does not import.

Variants, measured side by side in one run:
- `reference`, what the published implementation does: PyTorch ops (`kernels=reference`),
  attention through torch SDPA (the reference uses timm-style attention, which calls the
  same SDPA when timm's fused attention is on), fp16 autocast with `torch.amp.GradScaler`,
  torch's default AdamW (foreach, not fused), the EMA as a per-parameter Python loop
  (`t.mul_(r).add_(o, alpha=1 - r)`), pre-training with `consistency_target="detach"` (b'
  rides along with gradients, then the graph is thrown away).
- `fast`: the fused Triton kernels (`kernels=triton`), flash-attn when importable, else
  SDPA (recorded), bf16 autocast without a scaler, fused AdamW, the fused multi-tensor EMA
  (`Ops.ema_update`), `consistency_target="no_grad"`.
- `compile`: `fast` + `torch.compile` of the model modules (the online network and, in
  pre-training, the target network; not the loss). A compile failure is recorded, the run
  goes on.

Per (workload, variant): images/s (batch / median step time over the timed steps; warmup
excluded; CUDA events between steps, one synchronisation at the end), step time, achieved
TFLOP/s from the analytic FLOPs (2 x multiply-adds per image x images/s; the FLOPs are the
work the objective needs, the same for every variant, so work a variant wastes lowers its
MFU), MFU against the bf16 matmul peak measured here (8192^3, CUDA only) and against the
989 TFLOP/s datasheet, peak memory (`torch.cuda.max_memory_allocated`, reset per run), NVML
telemetry sampled in a background thread during the timed steps, the path every op took
(`Ops.paths()`: proof that the fused kernels ran) and the speedup over `reference`.

Without CUDA only `--smoke` runs (tiny models, 2 steps) and the numbers are meaningless:
the kernels of `fast` run through the Triton interpreter (switched on here before epg_fast
is imported), both variants use bf16 autocast (CPU fp16 autocast is partial and slow, so
the reference's precision differs from its GPU run) and `compile` uses the `aot_eager`
backend (inductor's CPU compile takes minutes here). Results are written after every run,
so a run stopped by a timeout still leaves what it measured; an out-of-memory run is
recorded as "OOM" and the next one starts from freed memory.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Before epg_fast is imported: the kernels' @triton.jit decorators need the interpreter
# switched on at import time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from epg_fast.config import Config, ModelConfig, TrainConfig  # noqa: E402
from epg_fast.metrics import PEAK_BF16_TFLOPS, PEAK_MATMUL_N, GPUTelemetry, measured_peak_tflops  # noqa: E402
from epg_fast.ops import Ops  # noqa: E402
from epg_fast.stages import build_stage, resolve_config, stage_named  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also when a test loads this file by path
from report import fmt, git_commit, write_report  # noqa: E402

CPU_LABEL = "CPU smoke — numbers meaningless (Triton interpreter, tiny models; checks the harness)"
DATASHEET_BF16_TFLOPS = PEAK_BF16_TFLOPS["H200"]  # H100/H200 SXM dense bf16
WORKLOADS = ("pretrain", "denoise", "dit")
VARIANTS = ("reference", "fast", "compile")
DEFAULT_BATCH = {"pretrain": 128, "denoise": 64, "dit": 256}
SMOKE_BATCH = {"pretrain": 4, "denoise": 4, "dit": 4}

# The issue's targets on the H200 (judged on full, non-smoke GPU runs only). MFU is judged
# against the measured matmul peak, on the better of `fast` and `compile`.
TARGETS = [
    dict(name="denoise_mfu", workload="denoise", kind="mfu", goal=0.55, text="EPG-XL/16 fine-tuning (denoise) >= 55% MFU"),
    dict(name="pretrain_mfu", workload="pretrain", kind="mfu", goal=0.45, text="EPG-XL/16 pre-training >= 45% MFU"),
    dict(name="pretrain_speedup", workload="pretrain", kind="speedup", goal=1.5,
         text="pre-training `fast` >= 1.5x `reference` images/s"),
]


# ----------------------------------------------------------------------------- arithmetic


def achieved_tflops(macs_per_image: int | None, images_per_s: float | None) -> float | None:
    """Hardware TFLOP/s: one multiply-add is two floating-point operations."""
    if not macs_per_image or not images_per_s:
        return None
    return 2.0 * macs_per_image * images_per_s / 1e12


def mfu(tflops: float | None, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved over peak TFLOP/s (None when either is unknown)."""
    if tflops is None or not peak_tflops:
        return None
    return tflops / peak_tflops


def summarize_samples(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{"gpu/power_w": w, ...} readings -> {"power_w": {"mean", "max", "n"}, ...}."""
    out: dict[str, dict[str, float]] = {}
    for key in sorted({k for s in samples for k in s}):
        values = [s[key] for s in samples if key in s]
        out[key.removeprefix("gpu/")] = {"mean": statistics.fmean(values), "max": max(values), "n": len(values)}
    return out


def sd_vae_encoder_macs(resolution: int = 256) -> int:
    """Multiply-adds of the SD-VAE (kl-f8, the VAE DiT uses) encoder for one RGB image.

    Analytic, from the published architecture (the LDM `Encoder` of the kl-f8 config:
    ch 128, ch_mult (1, 2, 4, 4), 2 ResNet blocks per level, attention only in the middle
    block, z_channels 4 doubled for mean and log-variance, then the 1x1 quant_conv), as
    flops.py counts: convolutions, linear maps and attention matmuls; GroupNorm and SiLU
    are left out. About 136 G at 256 px.
    """

    def conv(res: int, c_in: int, c_out: int, k: int = 3) -> int:
        return res * res * c_in * c_out * k * k

    def resnet(res: int, c_in: int, c_out: int) -> int:
        shortcut = conv(res, c_in, c_out, 1) if c_in != c_out else 0  # nin_shortcut
        return conv(res, c_in, c_out) + conv(res, c_out, c_out) + shortcut

    widths = [128 * m for m in (1, 2, 4, 4)]
    res, ch = resolution, 128
    total = conv(res, 3, ch)  # conv_in
    for level, width in enumerate(widths):
        for _ in range(2):
            total += resnet(res, ch, width)
            ch = width
        if level < len(widths) - 1:  # Downsample: 3x3 stride-2 conv (output at res / 2)
            res //= 2
            total += conv(res, ch, ch)
    tokens = res * res
    attention = 4 * tokens * ch * ch + 2 * tokens * tokens * ch  # q, k, v, proj_out + the two matmuls
    total += 2 * resnet(res, ch, ch) + attention  # mid block
    total += conv(res, ch, 8) + conv(res, 8, 8, 1)  # conv_out (2 x z_channels), quant_conv
    return total


def skipped_steps(scale_before: float, scale_after: float) -> int:
    """Optimiser steps GradScaler skipped between two readings of its scale: each skip
    halves the scale. Read outside the timed steps (get_scale() syncs); a growth (x2 after
    2000 clean steps) inside the window would hide one skip."""
    if scale_after >= scale_before:
        return 0
    return round(math.log2(scale_before / scale_after))


@torch.no_grad()
def ema_loop(targets: list[Tensor], onlines: list[Tensor], rate: float) -> None:
    """The reference's EMA: one mul_ and one add_ per parameter, two launches each."""
    for t, o in zip(targets, onlines):
        t.mul_(rate).add_(o, alpha=1 - rate)


# ----------------------------------------------------------------------------- variants


@dataclass
class Setup:
    """How one variant runs; recorded in the JSON as it is."""

    variant: str
    kernels: str  # Ops kernel mode
    attention: str  # Ops attention mode
    precision: str  # autocast dtype: "fp16" or "bf16"
    grad_scaler: bool
    optimizer: str  # "default" (torch's choice: foreach on CUDA) or "fused"
    ema: str  # "loop" (per-parameter Python loop) or "Ops.ema_update"
    consistency_target: str  # pre-training only
    compile_backend: str | None  # torch.compile backend of the model modules, None: eager
    notes: list[str] = field(default_factory=list)

    @property
    def amp_dtype(self) -> torch.dtype:
        return torch.float16 if self.precision == "fp16" else torch.bfloat16


def make_setup(variant: str, cuda: bool, compile_backend: str) -> Setup:
    if variant == "reference":
        s = Setup(variant, "reference", "sdpa", "fp16" if cuda else "bf16", cuda, "default", "loop", "detach", None)
        s.notes.append("attention: torch SDPA (the published code's timm-style attention calls SDPA too)")
        if not cuda:
            s.notes.append("CPU: bf16 autocast without GradScaler (the GPU reference runs fp16 + GradScaler)")
        return s
    s = Setup(variant, "triton", "auto", "bf16", False, "fused", "Ops.ema_update", "no_grad",
              compile_backend if variant == "compile" else None)
    if not cuda and variant == "compile":
        # Dynamo traces into the interpreter's numpy pointer arithmetic and fails (uint64
        # fake tensors); on CUDA it sees real Triton launches. The CPU run still exercises
        # torch.compile of the models, with the PyTorch references inside.
        s.kernels = "reference"
        s.notes.append("CPU: kernels=reference, torch.compile cannot trace the Triton interpreter")
    elif not cuda:
        s.notes.append("CPU: the Triton kernels run through the interpreter (TRITON_INTERPRET=1)")
    return s


# ----------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """One training step to measure: the stage that builds the networks and computes the
    loss (the trainer's own, for EPG), and a batch as the loader hands it over."""

    name: str
    title: str
    batch: int
    stage: Callable[[Setup, torch.device, Ops], Any]  # a Stage (epg_fast.stages) of the variant, on the device
    inputs: Callable[[int, torch.device], dict[str, Tensor]]
    macs_per_image: int | None  # forward + backward of one training step, one image
    macs_source: str
    missing: str | None = None  # the workload cannot run at all (a module does not import)


# The timed steps are at mid-training of the default schedule: pre-training's curriculum
# then has 1281 levels.
STEP = TrainConfig().total_steps // 2


def _stage_workload(name: str, title: str, batch: int, cfg: Config, macs_source: str) -> Workload:
    """A workload of the trainer's stage `cfg.stage` (a resolved config): the variant's stage
    options (the reference's consistency target) are set in a copy of `cfg` before the stage
    is built."""

    def stage(setup: Setup, dev: torch.device, ops: Ops):
        variant = copy.deepcopy(cfg)
        variant.pretrain.consistency_target = setup.consistency_target
        return build_stage(variant, dev, ops)

    def inputs(batch: int, dev: torch.device) -> dict[str, Tensor]:
        g = torch.Generator(device=dev).manual_seed(1)
        size = cfg.model.image_size
        out = {k: torch.randint(256, (batch, 3, size, size), generator=g, device=dev, dtype=torch.uint8)
               for k in stage_named(cfg.stage).views}
        out["label"] = torch.randint(cfg.model.num_classes, (batch,), generator=g, device=dev)
        return out

    return Workload(name, title, batch, stage, inputs, stage_named(cfg.stage).macs_per_image(cfg), macs_source)


def pretrain_workload(smoke: bool, batch: int) -> Workload:
    if smoke:
        m = ModelConfig(depth=2, dim=64, heads=2, image_size=16, patch_size=4, proj_hidden=128, proj_dim=32)
    else:
        m = ModelConfig(preset="EPG-XL", image_size=256, patch_size=16)
    cfg = resolve_config(Config(stage="pretrain", model=m))
    size = f"{m.image_size} px, patch {m.patch_size}"
    title = "tiny encoder + projector" if smoke else "EPG-XL/16 pre-training (ViT-B/16 + projector 4096/256)"
    return _stage_workload("pretrain", f"{title}, {size}", batch, cfg,
                           "flops.pretrain_step_macs (6 encoder + 6 projector forwards, 3 + 2 of them with backward)")


def denoise_workload(smoke: bool, batch: int) -> Workload:
    if smoke:
        m = ModelConfig(depth=2, dim=64, heads=2, decoder_dim=96, decoder_heads=2, image_size=16, patch_size=4, num_classes=10)
    else:
        m = ModelConfig(preset="EPG-XL", image_size=256, patch_size=16, num_classes=1000)
    cfg = resolve_config(Config(stage="denoise", model=m))
    title = (("tiny EPG" if smoke else "EPG-XL/16 denoise fine-tuning") + f", {m.image_size} px, patch {m.patch_size}, "
             f"encoder {m.depth}x{m.dim}, decoder {m.depth}x{m.decoder_dim}")
    return _stage_workload("denoise", title, batch, cfg, "flops.finetune_step_macs (one forward with backward, x3)")


DIT_STEPS = 1000  # DDPM steps of DiT's linear beta schedule


class DiTStage:
    """DiT latent training behind the stage protocol's step surface: its network and EMA
    shadow, no shared draws, and a plain epsilon-prediction MSE at a uniform DDPM step."""

    shadow_in_loss = False
    ema_rate = 0.9999

    def __init__(self, model: nn.Module, channels: int) -> None:
        self.model, self.channels = model, channels
        self.shadow = copy.deepcopy(model).requires_grad_(False).eval()

    def draws(self, step: int, gen: torch.Generator) -> tuple[()]:
        return ()

    def loss(self, online, batch, step, draws, gen) -> tuple[Tensor, dict]:
        x0, alpha_bar = batch["x"], batch["alpha_bar"]
        t = torch.randint(DIT_STEPS, (x0.shape[0],), generator=gen, device=x0.device)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=gen, device=x0.device)
        out = online(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float(), batch["label"])
        return F.mse_loss(out[:, : self.channels].float(), eps), {}  # the variance half unused


def dit_workload(smoke: bool, batch: int) -> Workload:
    # The DiT model and its FLOP count are new; import both lazily, so this script works
    # (and reports DiT as missing) on a tree without them.
    name, size, patch, classes = ("tiny DiT", 8, 2, 10) if smoke else ("DiT-XL/2", 32, 2, 1000)
    channels = 4
    title = f"{name} latent training, {size}x{size}x{channels} latents (SD-VAE encoding not included)"
    nothing = lambda *a: None  # noqa: E731
    try:
        from epg_fast.models import dit
    except Exception as e:  # ImportError, or a module that does not import yet
        return Workload("dit", title, batch, nothing, nothing, None, "", missing=f"{type(e).__name__}: {e}")

    if smoke:
        dim, depth, heads = 64, 2, 2
        build = lambda ops: dit.DiT(size, patch, dim, depth, heads, in_channels=channels, num_classes=classes, ops=ops)  # noqa: E731
    else:
        preset = dit.DIT_PRESETS["DiT-XL"]
        dim, depth, heads = preset.dim, preset.depth, preset.heads
        build = lambda ops: dit.build_dit(name, input_size=size, num_classes=classes, ops=ops)  # noqa: E731
    try:
        from epg_fast.flops import dit_macs

        macs, source = 3 * dit_macs(size, patch, dim, depth, in_channels=channels, out_channels=2 * channels), \
            "3 x flops.dit_macs (one forward with backward)"
    except Exception as e:  # the model runs; only its TFLOP/s and MFU are then unknown
        macs, source = None, f"unknown: flops.dit_macs unavailable ({type(e).__name__}: {e})"

    def inputs(batch: int, dev: torch.device) -> dict[str, Tensor]:
        g = torch.Generator(device=dev).manual_seed(1)
        betas = torch.linspace(1e-4, 0.02, DIT_STEPS, dtype=torch.float64)
        return {
            "x": torch.randn(batch, channels, size, size, generator=g, device=dev),
            "label": torch.randint(classes, (batch,), generator=g, device=dev),
            "alpha_bar": torch.cumprod(1 - betas, 0).float().to(dev),
        }

    return Workload("dit", title, batch, lambda setup, dev, ops: DiTStage(build(ops), channels), inputs, macs, source)


BUILDERS = {"pretrain": pretrain_workload, "denoise": denoise_workload, "dit": dit_workload}


# ----------------------------------------------------------------------------- one training step


class StepRunner:
    """The stage, optimiser, scaler and EMA of one (workload, variant), and its `step()`: the
    stage's draws and loss as the trainer runs them, then a plain PyTorch backward, AdamW
    step and EMA update (no DeepSpeed)."""

    def __init__(self, w: Workload, setup: Setup, dev: torch.device) -> None:
        # A fresh Ops per run: its paths() are this run's only.
        self.ops = Ops(setup.kernels, setup.attention)
        self.w, self.setup, self.dev = w, setup, dev
        torch.manual_seed(0)
        with dev:  # parameters are created (and initialised) on the device: no host copy
            self.stage = w.stage(setup, dev, self.ops)
        model, shadow = self.stage.model, self.stage.shadow
        model.train()
        self.params = sum(p.numel() for p in model.parameters())
        self.online_params, self.shadow_params = list(model.parameters()), list(shadow.parameters())
        self.online = model
        if setup.compile_backend:
            # dynamic=False: pre-training calls the encoder at three batch sizes; static
            # shapes give one specialised graph each, as the steady state of a real run.
            self.online = torch.compile(model, backend=setup.compile_backend, dynamic=False)
            if self.stage.shadow_in_loss:  # the loss calls the stage's shadow: compile it there
                self.stage.shadow = torch.compile(shadow, backend=setup.compile_backend, dynamic=False)
        hyper = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.03)
        fused = {"fused": True} if setup.optimizer == "fused" else {}
        self.optimizer = torch.optim.AdamW(model.parameters(), **hyper, **fused)
        # The default initial scale (2^16) overflows in the first steps of a fresh model and
        # those steps skip the optimiser; a long run settles lower. Start lower so that the
        # timed steps are full steps (skips are counted anyway, see `skipped_steps`).
        self.scaler = torch.amp.GradScaler(dev.type, init_scale=2.0**10) if setup.grad_scaler else None
        self.inputs = w.inputs(w.batch, dev)
        self.gen = torch.Generator(device=dev).manual_seed(2)
        self.draw_gen = torch.Generator().manual_seed(0)  # shared draws on the CPU: no device sync

    def step(self) -> Tensor:
        draws = self.stage.draws(STEP, self.draw_gen)
        with torch.autocast(self.dev.type, dtype=self.setup.amp_dtype):
            loss, _ = self.stage.loss(self.online, self.inputs, STEP, draws, self.gen)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.setup.ema == "loop":
            ema_loop(self.shadow_params, self.online_params, self.stage.ema_rate)
        else:
            self.ops.ema_update(self.shadow_params, self.online_params, self.stage.ema_rate)
        self.last_loss = loss.detach()
        return self.last_loss


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_steps(step: Callable[[], Any], n: int, dev: torch.device) -> list[float]:
    """Seconds of each of n steps. On CUDA: events between the steps and one sync at the end,
    so the host runs ahead as in training (and a host-bound step still shows)."""
    if dev.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            step()
            events[i + 1].record()
        torch.cuda.synchronize(dev)
        return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


class TelemetrySampler:
    """Samples NVML (GPUTelemetry) every `interval` seconds in a background thread while the
    `with` block runs; nothing without a GPU."""

    def __init__(self, telemetry: GPUTelemetry | None, interval: float = 0.05) -> None:
        self.telemetry, self.interval = telemetry, interval
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while True:
            try:
                self.samples.append(self.telemetry.sample())
            except Exception:  # NVML errors must not kill the benchmark
                return
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> TelemetrySampler:
        if self.telemetry is not None and self.telemetry.handle is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> dict[str, dict[str, float]]:
        return summarize_samples(self.samples)


def first_line(message: str, limit: int = 300) -> str:
    """The first line of an error message (also of one whose repr holds escaped newlines)."""
    line = message.strip().replace("\\n", "\n").split("\n")[0].strip()
    return line[:limit] + ("..." if len(line) > limit else "")


def _is_oom(e: BaseException) -> bool:
    # torch.compile wraps errors of its compiled graphs (BackendCompilerFailed, ...).
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def measure(w: Workload, setup: Setup, dev: torch.device, args, telemetry: GPUTelemetry | None, peak: float | None) -> dict:
    """Build, warm up and time one (workload, variant); the record of the run (status "ok")."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_build = time.perf_counter()
    runner = StepRunner(w, setup, dev)
    rec: dict[str, Any] = {"params": runner.params, "build_s": time.perf_counter() - t_build}
    t_first = time.perf_counter()
    runner.step()  # the first step compiles (Triton JIT, torch.compile) and autotunes
    sync(dev)
    rec["first_step_s"] = time.perf_counter() - t_first
    for _ in range(args.warmup - 1):
        runner.step()
    sync(dev)
    scale_before = runner.scaler.get_scale() if runner.scaler is not None else None
    with TelemetrySampler(telemetry) as sampler:
        times = time_steps(runner.step, args.steps, dev)
    loss = float(runner.last_loss)  # read after the timing: .item() syncs
    step_s = statistics.median(times)
    ips = w.batch / step_s
    tflops = achieved_tflops(w.macs_per_image, ips)
    rec.update(
        status="ok",
        step_ms=step_s * 1e3,
        step_ms_min=min(times) * 1e3,
        step_ms_max=max(times) * 1e3,
        images_per_s=ips,
        tflops=tflops,
        mfu=mfu(tflops, peak),
        mfu_datasheet=mfu(tflops, DATASHEET_BF16_TFLOPS) if dev.type == "cuda" else None,
        peak_mem_gb=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        telemetry=sampler.summary(),
        # The loop bypasses ops, so it is named here under the key ops uses for its EMA.
        paths={**runner.ops.paths(), "ema": "python loop (per parameter)"} if setup.ema == "loop" else runner.ops.paths(),
        attention_backend=runner.ops.attention_backend(dev, setup.amp_dtype),
        loss=loss,
        loss_finite=math.isfinite(loss),
    )
    if runner.scaler is not None:
        rec["scaler_skipped_steps"] = skipped_steps(scale_before, runner.scaler.get_scale())
    del runner
    return rec


def run_one(w: Workload, variant: str, args, dev: torch.device, telemetry, peak) -> dict:
    setup = make_setup(variant, dev.type == "cuda", args.compile_backend)
    rec: dict[str, Any] = dict(workload=w.name, variant=variant, batch=w.batch, setup=dataclasses.asdict(setup))
    if w.missing:
        return {**rec, "status": f"missing ({w.missing})"}
    failure = None
    try:
        rec.update(measure(w, setup, dev, args, telemetry, peak))
    except Exception as e:
        failure = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {first_line(str(e))}"
        if args.verbose:
            traceback.print_exc()
    # Outside the except block: the traceback (and the tensors its frames hold) is gone.
    if failure:
        rec["status"] = failure
    if setup.compile_backend:
        torch._dynamo.reset()  # drop the compiled graphs (and the memory they pin)
    _free(dev)
    return rec


# ----------------------------------------------------------------------------- results


def add_speedups(runs: list[dict]) -> None:
    """speedup_vs_reference = images/s of the run over images/s of its workload's reference."""
    ref = {r["workload"]: r.get("images_per_s") for r in runs if r["variant"] == "reference"}
    for r in runs:
        base = ref.get(r["workload"])
        r["speedup_vs_reference"] = r["images_per_s"] / base if base and r.get("images_per_s") else None


def evaluate_targets(runs: list[dict], judged: bool) -> list[dict]:
    """The issue's targets with PASS/FAIL (only for a full GPU run; n/a otherwise)."""
    out = []
    for t in TARGETS:
        by_variant = {r["variant"]: r for r in runs if r["workload"] == t["workload"]}
        if t["kind"] == "mfu":  # the better of fast and compile
            candidates = [(r["mfu"], v) for v, r in by_variant.items() if v in ("fast", "compile") and r.get("mfu") is not None]
            value, variant = max(candidates) if candidates else (None, None)
            shown = None if value is None else f"{value:.1%} ({variant})"
        else:
            value, variant = by_variant.get("fast", {}).get("speedup_vs_reference"), "fast"
            shown = None if value is None else f"{value:.2f}x"
        if not judged:
            status = "n/a (not a full GPU run)"
        elif value is None:
            status = "n/a (not measured)"
        else:
            status = "PASS" if value >= t["goal"] else "FAIL"
        out.append(dict(name=t["name"], workload=t["workload"], target=t["text"], goal=t["goal"], value=value,
                        variant=variant, measured=shown, status=status))
    return out






def _telemetry_cell(r: dict, key: str, spec: str) -> str:
    t = r.get("telemetry", {}).get(key)
    return "" if not t else f"{t['mean']:{spec}} / {t['max']:{spec}}"


def _paths_cell(r: dict) -> str:
    return ", ".join(f"{op}: {path}" for op, path in sorted(r.get("paths", {}).items()))


def render_markdown(meta: dict, workloads: dict, runs: list[dict], targets: list[dict]) -> str:
    lines = [f"# Training throughput — {meta['label']}", ""]
    for k in ("device", "torch", "triton", "python", "date", "git_commit", "peak_bf16", "timing", "steps",
              "compile_backend", "time_budget"):
        lines.append(f"- **{k.replace('_', ' ')}**: {meta[k]}")
    lines += ["", "## Workloads", "", "| workload | model | batch | params | multiply-adds / image / step | FLOPs from |",
              "|---|---|---:|---:|---:|---|"]
    for name, w in workloads.items():
        params = next((r["params"] for r in runs if r["workload"] == name and r.get("params")), None)
        lines.append(f"| {name} | {w['title']} | {w['batch']} | {fmt(params and params / 1e6, '.1f', 'M')} | "
                     f"{fmt(w['macs_per_image'] and w['macs_per_image'] / 1e9, '.4g', ' G')} | "
                     f"{w['missing'] and 'missing: ' + w['missing'] or w['macs_source']} |")
    lines += [
        "",
        "## Results",
        "",
        "images/s = batch / median step time. TFLOP/s = 2 x multiply-adds x images/s (the work the objective "
        "needs; a variant's wasted work lowers its MFU). MFU against the measured bf16 matmul peak and against "
        f"the {DATASHEET_BF16_TFLOPS:g} TFLOP/s datasheet. Telemetry: mean / max over the timed steps.",
        "",
        "| workload | variant | status | step ms | images/s | x ref | TFLOP/s | MFU | MFU (989) | peak mem GB "
        "| SM MHz | power W | util % | first step s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['workload']} | {r['variant']} | {r['status']} | {fmt(r.get('step_ms'), '.1f')} | "
            f"{fmt(r.get('images_per_s'), '.1f')} | {fmt(r.get('speedup_vs_reference'), '.2f', 'x')} | "
            f"{fmt(r.get('tflops'), '.3g')} | {fmt(r.get('mfu'), '.1%')} | {fmt(r.get('mfu_datasheet'), '.1%')} | "
            f"{fmt(r.get('peak_mem_gb'), '.1f')} | {_telemetry_cell(r, 'sm_clock_mhz', '.0f')} | "
            f"{_telemetry_cell(r, 'power_w', '.0f')} | {_telemetry_cell(r, 'util', '.0f')} | "
            f"{fmt(r.get('first_step_s'), '.2f')} |"
        )
    lines += ["", "## Op paths taken (Ops.paths() after each run)", "", "| workload | variant | attention | paths |",
              "|---|---|---|---|"]
    for r in runs:
        if r.get("paths"):
            lines.append(f"| {r['workload']} | {r['variant']} | {r.get('attention_backend', '')} | {_paths_cell(r)} |")
    lines += ["", "## Variants", "", "| variant | kernels | attention | precision | GradScaler | AdamW | EMA | "
              "consistency target | compile | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in runs:
        s = r["setup"]
        if s["variant"] in seen:
            continue
        seen.add(s["variant"])
        lines.append(f"| {s['variant']} | {s['kernels']} | {s['attention']} | {s['precision']} | {s['grad_scaler']} | "
                     f"{s['optimizer']} | {s['ema']} | {s['consistency_target']} | {s['compile_backend'] or 'no'} | "
                     f"{'; '.join(s['notes'])} |")
    lines += ["", "## Targets (issue; judged on a full H200 run only)", "", "| target | measured | PASS/FAIL |",
              "|---|---:|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['measured'] or ''} | {t['status']} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def write_chart(path: str, runs: list[dict], label: str) -> str:
    """A bar chart of images/s per workload (one panel each: their scales differ) and variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"skipped: {e}"
    names = list(dict.fromkeys(r["workload"] for r in runs))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    colours = {"reference": "#8c8c8c", "fast": "#1f77b4", "compile": "#2ca02c"}
    for ax, name in zip(axes[0], names):
        rows = [r for r in runs if r["workload"] == name]
        values = [r.get("images_per_s") or 0.0 for r in rows]
        bars = ax.bar([r["variant"] for r in rows], values, color=[colours.get(r["variant"], "#d62728") for r in rows])
        for bar, r in zip(bars, rows):
            if r.get("images_per_s"):
                speedup = r.get("speedup_vs_reference")
                text = f"{r['images_per_s']:.3g}" + (f"\n{speedup:.2f}x" if speedup and r["variant"] != "reference" else "")
            else:  # OOM, error, skipped, missing: the status word in place of a bar
                text = r["status"].split(" ")[0].split(":")[0]
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_title(name)
        ax.set_ylabel("images/s")
        ax.margins(y=0.2)
    fig.suptitle(f"Training throughput — {label}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "ok"


def write_outputs(args, meta: dict, workloads: dict, runs: list[dict], judged: bool) -> str:
    add_speedups(runs)
    targets = evaluate_targets(runs, judged)
    md = render_markdown(meta, workloads, runs, targets)
    if args.chart:  # after every run: a run stopped by a timeout still leaves its chart
        meta["chart"] = write_chart(args.chart, runs, meta["label"])
    write_report(args.json, args.markdown, dict(meta=meta, workloads=workloads, runs=runs, targets=targets), md)
    return md


# ----------------------------------------------------------------------------- main


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def parse_batches(items: list[str], defaults: dict[str, int]) -> dict[str, int]:
    """`--batch 64` (every workload) and/or `--batch pretrain=128 dit=256`."""
    out = dict(defaults)
    for item in _split(items):
        name, _, value = item.rpartition("=")
        if name and name not in out:
            raise ValueError(f"--batch {item}: unknown workload {name!r} (known: {', '.join(out)})")
        for key in [name] if name else list(out):
            out[key] = int(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models, 2 steps (without CUDA: through the Triton interpreter)")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--markdown", help="write the Markdown report here")
    ap.add_argument("--chart", help="write a PNG bar chart of images/s here (needs matplotlib)")
    ap.add_argument("--steps", type=int, help="timed steps per run (default 10; smoke 2)")
    ap.add_argument("--warmup", type=int, help="untimed steps first, >= 1 (default 3; smoke 1)")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), help=f"subset of {' '.join(WORKLOADS)}")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"subset of {' '.join(VARIANTS)}")
    ap.add_argument("--batch", nargs="+", default=[], help="N (all workloads) or WORKLOAD=N; default "
                    + " ".join(f"{k}={v}" for k, v in DEFAULT_BATCH.items()))
    ap.add_argument("--time-budget", type=float, default=210.0,
                    help="seconds; runs not started by then are recorded as skipped (0: none; default 210)")
    ap.add_argument("--compile-backend", help="torch.compile backend (default: inductor; aot_eager without CUDA)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing runs")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    t_start = time.time()
    # Each variant builds its own Ops: EPG_KERNELS (read only by Ops.from_config) plays no part.
    kernels_env = os.environ.get("EPG_KERNELS")
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: the full models would take hours through the Triton interpreter; use --smoke", file=sys.stderr)
        return 2
    args.steps = args.steps or (2 if args.smoke else 10)
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if args.smoke else 3))
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
    names, variants = _split(args.workloads), _split(args.variants)
    for given, known in ((names, WORKLOADS), (variants, VARIANTS)):
        if unknown := [n for n in given if n not in known]:
            ap.error(f"unknown {unknown}; known: {list(known)}")
    try:
        batches = parse_batches(args.batch, SMOKE_BATCH if args.smoke else DEFAULT_BATCH)
    except ValueError as e:
        ap.error(str(e))

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    dev = torch.device("cuda" if cuda else "cpu")
    peak_info = measured_peak_tflops(dev)  # the trainer's MFU denominator (cached per GPU name)
    peak = peak_info.measured if peak_info else None
    telemetry = GPUTelemetry(dev) if cuda else None
    if cuda:
        device_name = torch.cuda.get_device_name(dev)
        label = f"{device_name}" + (", smoke (tiny models) — numbers not representative" if args.smoke else "")
        timing = "median of per-step CUDA-event times (events between steps, one sync at the end)"
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}), TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
        label = CPU_LABEL
        timing = "median of per-step time.perf_counter"
    vae = sd_vae_encoder_macs(256)
    notes = [
        "No DeepSpeed, no data loading: synthetic inputs on the device; one GPU.",
        "FLOPs are analytic (epg_fast.flops, DiT's convention: matmuls only; 1 multiply-add = 2 hardware FLOPs "
        "here); a backward pass counts as two forwards. The reference's extra work (b' with gradients) is not counted.",
        "DiT: epsilon-prediction MSE at a uniform DDPM step (linear betas); the learned-variance term is left out "
        "(no matmul). SD-VAE encoding is NOT included and not run: add "
        f"{vae / 1e9:.0f} G multiply-adds ({2 * vae / 1e9:.0f} GFLOP) per 256 px image when latents are encoded "
        "online (analytic count of the kl-f8 encoder, benchmarks/throughput.py: sd_vae_encoder_macs).",
        "`compile` = `fast` + torch.compile of the model modules (not the loss, not the optimiser or the EMA).",
    ]
    if kernels_env:
        notes.append(f"EPG_KERNELS={kernels_env} was set and ignored: each variant sets its own kernel mode.")
    if not cuda:
        notes.append("CPU: no MFU (no peak measured), no memory or NVML telemetry; reference in bf16 (GPU: fp16).")
    meta = dict(
        label=label,
        device=device_name,
        cuda=cuda,
        torch=torch.__version__,
        triton=triton_version,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        git_commit=git_commit(),
        peak_bf16=(f"measured {peak:.0f} TFLOP/s ({PEAK_MATMUL_N}^3 bf16 torch.mm, epg_fast.metrics.measured_peak_tflops, "
                   f"as the trainer's MFU); datasheet {DATASHEET_BF16_TFLOPS:g}"
                   if peak else "not measured (no CUDA)"),
        peak_bf16_measured_tflops=peak,
        peak_bf16_datasheet_tflops=DATASHEET_BF16_TFLOPS,
        timing=timing,
        steps=f"{args.warmup} warmup + {args.steps} timed per run",
        warmup_steps=args.warmup,
        timed_steps=args.steps,
        compile_backend=args.compile_backend,
        time_budget=f"{args.time_budget:g} s (no run starts after it)" if args.time_budget else "none",
        smoke=args.smoke,
        vae_encoder_macs_per_image=vae,
        notes=notes,
    )
    print(f"# {label}\n# device {device_name}; {meta['peak_bf16']}", flush=True)

    workloads: dict[str, Workload] = {n: BUILDERS[n](args.smoke, batches[n]) for n in names}
    workload_info = {n: dict(title=w.title, batch=w.batch, macs_per_image=w.macs_per_image, macs_source=w.macs_source,
                             missing=w.missing) for n, w in workloads.items()}
    # Every workload's reference and fast first, the compile runs (slowest to start) last:
    # a time budget then cuts the compile runs first.
    order = [(n, v) for n in names for v in variants if v != "compile"]
    order += [(n, "compile") for n in names if "compile" in variants]
    judged = cuda and not args.smoke
    runs: list[dict] = []
    for name, variant in order:
        if args.time_budget and time.time() - t_start > args.time_budget:
            setup = make_setup(variant, cuda, args.compile_backend)
            runs.append(dict(workload=name, variant=variant, batch=batches[name], setup=dataclasses.asdict(setup),
                             status="skipped (time budget)"))
        else:
            t0 = time.time()
            rec = run_one(workloads[name], variant, args, dev, telemetry, peak)
            rec["wall_s"] = time.time() - t0
            runs.append(rec)
            ips = f"{rec['images_per_s']:.1f} images/s" if rec.get("images_per_s") else ""
            print(f"# {name:8s} {variant:9s} {rec['status']} {ips} ({rec['wall_s']:.1f} s)", flush=True)
        runs.sort(key=lambda r: (names.index(r["workload"]), variants.index(r["variant"])))
        write_outputs(args, meta, workload_info, runs, judged)
    meta["total_s"] = time.time() - t_start
    md = write_outputs(args, meta, workload_info, runs, judged)
    if args.chart:
        print(f"# chart: {meta['chart']}")
    print(md)
    print(f"# total {time.time() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

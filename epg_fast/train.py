"""The EPG trainer: `deepspeed epg_fast/train.py --stage pretrain|denoise|consistency
[--config FILE] [key=value ...]`, also as a single process (`python epg_fast/train.py ...`).

One loop for every stage; one step reads top to bottom: batch -> the stage's loss (views,
levels and noise from (seed, step, rank)) -> DeepSpeed backward/step (optimiser, lr) ->
shadow EMA (pre-training's target, fine-tuning's sampling weights) -> metrics -> samples ->
checkpoint. What differs between stages lives in epg_fast/stages/.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Run as a script, Python puts epg_fast/ itself first on sys.path, where our module names
    # (config, data, ops, ...) would shadow top-level packages; the package is imported by name.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import hashlib
import logging
import platform
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from epg_fast.checkpoint import (CheckpointError, Checkpoints, CheckpointWriteError, check_same_model,
                                 check_writable, read_checkpoint)
from epg_fast.config import STAGES, Config, ConfigError, check_world, preset_comments
from epg_fast.data import DataError, build_loader
from epg_fast.distributed import setup_distributed, teardown_distributed
from epg_fast.metrics import GPUTelemetry, MetricsWriter, PeakTflops, measured_peak_tflops
from epg_fast.ops import Ops
from epg_fast.optim import GradClip, base_lr, build_optimizer, build_scheduler, param_groups
from epg_fast.profiling import Profiling, format_breakdown
from epg_fast.safety import NonFiniteGuard, RunError, apply_optimiser_settings, config_changes, hold_run_dir
from epg_fast.sample import write_sample_grid
from epg_fast.stages import Stage, build_stage, load_config, stage_named
from epg_fast.syncs import on_host

log = logging.getLogger("epg_fast")
# The step in progress, for the error a hung or dead peer rank causes (see main).
progress = {"step": None}


# ---------------------------------------------------------------------------------------
# Setup


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, default="pretrain")
    p.add_argument("--config", default=None, help="YAML preset (default: configs/<stage>/demo.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the preset's comments (the paper presets: "
                   "each value's source) and the resolved config, then exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.total_steps=20 data.root=/data")
    return p.parse_args(argv)


def setup_logging(rank: int, run_dir: Path) -> None:
    """Rank 0 logs INFO to the console and to run_dir/train.log; other ranks warnings only."""
    class TqdmHandler(logging.StreamHandler):  # keeps the progress bar intact
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(self.format(record), file=sys.stderr)

    log.handlers.clear()
    log.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [TqdmHandler()]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("epg_fast.data").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def resolve_precision(cfg: Config, device: torch.device) -> str:
    precision = cfg.train.precision
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs CUDA (DeepSpeed refuses fp16 on CPU); use fp32 or bf16")
    return precision


def deepspeed_config(cfg: Config, world: int, precision: str) -> dict:
    # bf16 runs under torch.autocast with fp32 weights, gradients and optimiser (DeepSpeed in
    # fp32 mode); fp16 is DeepSpeed's fp16 mode (half weights, fp32 master, dynamic loss scale).
    return {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.global_batch // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits at the end of the step.
    A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received %s: checkpointing at the end of this step", signal.Signals(signum).name)


# ---------------------------------------------------------------------------------------
# The training loop (every stage; epg_fast/stages/ holds what differs)


def step_generator(gen: torch.Generator, seed: int, step: int, rank: int) -> torch.Generator:
    """Randomness of one step as a function of (seed, step, rank): exact resume needs no
    generator state, and every rank draws different noise."""
    return gen.manual_seed(((seed * 1_000_003 + step) * 65_537 + rank) % 2**63)


def stop_group(world: int, device: torch.device) -> dist.ProcessGroup | None:
    """The group the ranks agree on a stop request in: None with one rank (nothing to agree
    on), else a gloo group, whose all-reduce of a CPU tensor is a host operation (on CUDA a
    gloo group beside NCCL's: an NCCL all-reduce read on the host would wait for the device)."""
    if world == 1:
        return None
    return dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD


def agree_to_stop(requested: bool, group: dist.ProcessGroup | None) -> bool:
    """A stop request on any rank stops every rank at the same step. Each step, because a
    signal reaches the ranks at different times; a host-side all-reduce (see `stop_group`):
    the ranks' host threads meet, the device queue is untouched."""
    if group is None:
        return requested
    flag = torch.tensor([int(requested)], dtype=torch.int64)  # CPU, no device argument
    dist.all_reduce(flag, group=group)
    with on_host():
        return bool(flag)


@torch.no_grad()
def param_norm(module: torch.nn.Module, zero_stage: int) -> float:
    """Global L2 norm of the parameters; under ZeRO-3 each rank holds a shard."""
    sq = sum(getattr(p, "ds_tensor", p).detach().float().pow(2).sum() for p in module.parameters())
    if zero_stage == 3 and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    return float(sq) ** 0.5


def local_grad_norm(module: torch.nn.Module) -> float:
    """Norm of the gradients as they stand: at ZeRO 0 without fp16, DeepSpeed hands the plain
    torch optimiser full, all-reduced gradients and reports no norm, so it is taken here,
    before the step (which clips and then zeroes them)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def check_replicas_identical(module: torch.nn.Module, world: int) -> None:
    """Data parallelism keeps one model: hash the weights on every rank and compare."""
    digest = hashlib.sha256()
    for p in module.parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * world
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) == 1:
        log.info("online weights sha256 %s..., identical on all %d ranks", digests[0][:16], world)
    else:
        log.error("online weights DIFFER across ranks: %s", [d[:16] for d in digests])


def mean_over_ranks(values: dict, world: int) -> dict:
    """Tensor metrics averaged over ranks in one all-reduce (numbers pass through)."""
    keys = [k for k, v in values.items() if torch.is_tensor(v)]
    out = {k: v for k, v in values.items() if k not in keys}
    if keys:
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
        if world > 1:
            dist.all_reduce(stacked)
        out.update({k: float(v) / world for k, v in zip(keys, stacked)})
    return {"loss": out.pop("loss"), **out}


def compile_networks(cfg: Config, stage: Stage) -> None:
    """train.compile: torch.compile the online network and, where the loss runs it, the shadow,
    in place (nn.Module.compile: same parameters and state-dict keys, so checkpoints do not
    change); compiled lazily, at the first step."""
    if not cfg.train.compile:
        return
    stage.model.compile(backend=cfg.train.compile_backend)
    if stage.shadow_in_loss:
        stage.shadow.compile(backend=cfg.train.compile_backend)
    log.info("torch.compile (backend %s) of the online network%s: compiled at the first step",
             cfg.train.compile_backend, " and the target" if stage.shadow_in_loss else "")


def build_engine(cfg: Config, stage: Stage, device: torch.device, world: int, precision: str):
    """(engine, optimizer, lr scheduler): DeepSpeed around the stage's online network, AdamW of
    optim.impl (epg_fast.optimizers) with the lr schedule of epg_fast.optim."""
    import deepspeed

    optimizer = build_optimizer(stage.model, cfg, device)
    engine, _, _, scheduler = deepspeed.initialize(
        model=stage.model,
        optimizer=optimizer,
        lr_scheduler=build_scheduler(cfg),
        config=deepspeed_config(cfg, world, precision),
    )
    return engine, optimizer, scheduler


class ShadowEMA:
    """The shadow network (pre-training's target f-, fine-tuning's EMA weights): EMA of the
    online parameters after every optimiser step, and of the floating-point buffers (BatchNorm
    statistics) when the stage says so; otherwise the shadow's buffers are the stage's."""

    def __init__(self, online: torch.nn.Module, target: torch.nn.Module, rate: float, average_buffers: bool,
                 zero_stage: int, ops: Ops):
        self.rate, self.zero_stage, self.ops = rate, zero_stage, ops
        self.online_params = list(online.parameters())
        self.target_params = list(target.parameters())
        float_buffers = lambda m: [b for n, b in m.named_buffers() if b.is_floating_point()]
        self.online_buffers = float_buffers(online) if average_buffers else []
        self.target_buffers = float_buffers(target) if average_buffers else []

    def update(self) -> None:
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(self.online_params):
                self.ops.ema_update(self.target_params, self.online_params, self.rate)
        else:
            self.ops.ema_update(self.target_params, self.online_params, self.rate)
        if self.online_buffers:
            self.ops.ema_update(self.target_buffers, self.online_buffers, self.rate)


class StepOutput(NamedTuple):
    loss: torch.Tensor
    parts: dict  # the stage's metrics: device tensors and host numbers
    grad_norm: float | None  # on logging steps when taken here (see local_grad_norm)
    stop: bool  # every rank stops after this step


class TrainStep:
    """One training step from the host batch to the shadow's update: the loop body of `train`,
    and what benchmarks/sync_count.py counts and benchmarks/throughput.py times.

    No host-device synchronisation on a non-logging step (tests/test_step_syncs.py): the
    step's shared decisions (pre-training's level index) are drawn by every rank from a CPU
    generator seeded by (seed, step) alone, so they need no broadcast; level values are host
    floats; the stop request is agreed on the host (`agree_to_stop`); the batch's copy does
    not block. Logging steps read the loss and the gradient norm, and synchronise.
    """

    def __init__(self, cfg: Config, stage: Stage, engine, device: torch.device, rank: int, precision: str,
                 ops: Ops, prof: Profiling, stop_group: dist.ProcessGroup | None = None,
                 to_device: Callable[[dict, torch.device], dict] | None = None) -> None:
        self.cfg, self.stage, self.engine, self.device, self.rank, self.prof = cfg, stage, engine, device, rank, prof
        # The loader's copy to the device (with data.augment=device it also finishes the views).
        self.to_device = to_device or (lambda b, dev: {k: v.to(dev, non_blocking=True) for k, v in b.items()})
        self.clip = GradClip(cfg.optim)
        self.ema = ShadowEMA(engine.module, stage.shadow, stage.ema_rate, stage.average_buffers,
                             cfg.train.zero_stage, ops)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        self.decisions = torch.Generator()  # CPU: rank 0's draws, made alike by every rank
        self.noise = torch.Generator(device=device)  # this rank's noise, on the device
        self.own_grad_norm = cfg.train.zero_stage == 0 and precision != "fp16"
        self.stop_group = stop_group
        self.guard = NonFiniteGuard(engine, stage.shadow, device, cfg.train.max_nonfinite)

    def __call__(self, step: int, host_batch: dict[str, torch.Tensor], stop_requested: bool = False,
                 log_now: bool = False) -> StepOutput:
        cfg, stage, engine, prof = self.cfg, self.stage, self.engine, self.prof
        with prof.phase("h2d"):
            batch = self.to_device(host_batch, self.device)
        with prof.phase("comm"):
            with on_host():  # a CPU generator's draws: host numbers by construction
                draws = stage.draws(step, step_generator(self.decisions, cfg.train.seed, step, 0))
            stop_now = agree_to_stop(stop_requested, self.stop_group)
        self.guard.begin_step()
        with prof.phase("forward"), self.autocast:
            loss, parts = stage.loss(engine, batch, step, draws,
                                     step_generator(self.noise, cfg.train.seed, step, self.rank + 1))
            loss = self.guard.loss(loss, step)
        with prof.phase("backward"):
            engine.backward(loss)
        gnorm = local_grad_norm(engine.module) if log_now and self.own_grad_norm else None
        self.clip.apply(engine, step)
        with prof.phase("optimizer"):
            engine.step()  # optimiser step (DeepSpeed clips first when optim.grad_clip > 0), then lr step
        with prof.phase("ema"):
            self.ema.update()
        self.guard.end_step(loss, step)  # a non-finite step: all of the above undone on the device
        return StepOutput(loss, parts, gnorm, stop_now)


def describe_config(cfg: Config, comments: str) -> str:
    """The preset's comment block (where each value comes from) and the resolved config."""
    return "\n".join(([f"preset notes:\n{comments}"] if comments else [])
                     + ["resolved config:", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip()])


def startup_block(cfg: Config, world: int, device: torch.device, precision: str, stage: Stage, loader,
                  autocast_dtype, ops: Ops, optimizer: torch.optim.Optimizer, peak: PeakTflops | None,
                  comments: str = "") -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    lines = [
        describe_config(cfg, comments),
        f"stage        {cfg.stage}",
        f"parameters   {stage.describe()}",
        f"world size   {world} ({'nccl' if device.type == 'cuda' else 'gloo'}), device {device} [{name}]",
        f"precision    {precision}; attention {ops.attention_backend(device, autocast_dtype)}; "
        f"kernels {ops.kernels_for(device)}; ZeRO stage {cfg.train.zero_stage}",
        f"data         {loader.num_images:,} images, {loader.num_classes} classes, "
        f"{loader.steps_per_epoch} steps/epoch of {cfg.train.global_batch}; "
        f"source: {cfg.data.source}; loader: {cfg.data.loader} ({loader.executor})",
        f"compute      {2 * stage.macs_per_image(cfg) / 1e9:.2f} GFLOP per image per step ({stage.compute()})",
        f"optimiser    optim.impl={cfg.optim.impl}: {optimizer_kernel(optimizer)}; "
        f"compile {cfg.train.compile_backend if cfg.train.compile else 'off'}",
        f"MFU peak     {mfu_line(cfg.log.peak_tflops, peak)}",
    ]
    log.info("\n".join(lines))


def optimizer_kernel(optimizer: torch.optim.Optimizer) -> str:
    kind = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    defaults = optimizer.defaults
    flags = [k for k in ("fused", "foreach") if defaults.get(k)]
    return kind + (f" ({', '.join(flags)})" if flags else "")


def mfu_line(override: float | None, peak: PeakTflops | None) -> str:
    """Which peak MFU divides by: log.peak_tflops, else the measured bf16 matmul peak."""
    datasheet = f"datasheet {peak.datasheet:.0f}" if peak and peak.datasheet else "no datasheet figure"
    if override:
        return f"{override:.0f} TFLOP/s (log.peak_tflops)" + (f"; measured {peak.measured:.0f}, {datasheet}" if peak else "")
    if peak:
        return f"{peak.measured:.0f} TFLOP/s, the measured bf16 matmul peak ({datasheet})"
    return "none on CPU (no mfu)"


def graph_breaks() -> int:
    """Graph breaks torch.compile has met so far in this process."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def train(cfg: Config, comments: str = "") -> int:
    check_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible")
    rank, world, device = setup_distributed(cfg.train.device, group_of_one=True,  # DeepSpeed needs a group
                                            timeout_minutes=cfg.train.dist_timeout)
    run_dir = Path(cfg.train.run_dir)
    check_writable(run_dir)  # before any work: a read-only folder would fail only at the first save
    run_lock = hold_run_dir(run_dir) if rank == 0 else None  # held until this process ends
    setup_logging(rank, run_dir)
    precision = resolve_precision(cfg, device)
    ops = Ops.from_config(cfg.model.kernels, cfg.model.attention)  # the one Ops of this run's networks
    # The data first: a bad root fails in a second, before any model is built.
    loader = build_loader(
        cfg.data, image_size=cfg.model.image_size, views=stage_named(cfg.stage).views, global_batch=cfg.train.global_batch,
        rank=rank, world_size=world, seed=cfg.train.seed, device=device, num_classes=cfg.model.num_classes,
    )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # imported by build_engine, after setup_distributed

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    stage = build_stage(cfg, device, ops)
    compile_networks(cfg, stage)
    engine, optimizer, scheduler = build_engine(cfg, stage, device, world, precision)

    ckpts = Checkpoints(run_dir, cfg.train.keep_last, rank)
    step = 0
    resume = None if cfg.train.resume == "none" else ckpts.latest() if cfg.train.resume == "auto" else Path(cfg.train.resume)
    ckpts.claim(resume)
    if resume is not None:  # verified first (CheckpointError): train.resume=PATH never falls back
        check_same_model(resume, cfg.to_dict())  # another stage or model shape: one line, before DeepSpeed
        changes = config_changes(read_checkpoint(resume).config, cfg.to_dict())  # refused keys raise here
        state = ckpts.load(engine, resume)
        apply_optimiser_settings(optimizer, scheduler, base_lr(cfg), tuple(cfg.optim.betas),
                                 [g["weight_decay"] for g in param_groups(stage.model, cfg.optim)])
        for key, was, now in changes:
            log.info("resume: %s changed %r -> %r (applied)", key, was, now)
        stage.shadow.load_state_dict(state[stage.shadow_key])
        loader.load_state_dict(state["data"])
        step = state["step"]
        log.info("resumed from %s at step %d", resume, step)
    end = cfg.train.stop_after or cfg.train.total_steps
    # Step-time breakdown, traces and memory (epg_fast/profiling.py): phases are timed on a few
    # steps of each logging window and read at the logging step, so other steps do not sync.
    prof = Profiling(cfg.log, run_dir, device, rank, end, engine.module, stage.shadow, optimizer,
                     grad_partitions=world if cfg.train.zero_stage >= 2 else 1)
    train_step = TrainStep(cfg, stage, engine, device, rank, precision, ops, prof, stop_group(world, device),
                           loader.to_device)
    peak = measured_peak_tflops(device)
    if rank == 0:
        startup_block(cfg, world, device, precision, stage, loader, train_step.autocast_dtype, ops, optimizer, peak,
                      comments)
    if step >= end:
        log.info("nothing to do: the run is at step %d of %d (another train.run_dir starts anew)", step, end)
        return 0

    def client_state() -> dict:
        return {"step": step, stage.shadow_key: stage.shadow.state_dict(), "data": loader.state_dict(),
                "config": cfg.to_dict()}

    stop = StopRequest()
    metrics = MetricsWriter(run_dir, rank == 0, cfg.log.tensorboard)
    telemetry = GPUTelemetry(device)
    mfu_peak = cfg.log.peak_tflops or (peak.measured if peak else None)  # the MFU denominator
    flops_per_step = 2 * stage.macs_per_image(cfg) * cfg.train.global_batch
    bar = tqdm(total=end, initial=step, disable=rank != 0 or not (cfg.log.progress and sys.stderr.isatty()),
               dynamic_ncols=True, unit="step")
    window = {"t": time.perf_counter(), "wait": 0.0, "steps": 0}
    batches = iter(loader)
    knn = None
    if cfg.eval.knn_every and rank == 0:  # the k-NN monitor of the live encoder (epg_fast.probe)
        from epg_fast.probe import KNNMonitor

        knn = KNNMonitor(cfg, device)
    log.info("training steps %d -> %d", step, end)
    first = step
    while step < end:
        prof.begin_step(step)
        progress["step"] = step
        t_wait = time.perf_counter()
        with prof.phase("data_wait"):
            batch = next(batches)
        window["wait"] += time.perf_counter() - t_wait
        log_now = prof.is_log_step(step)
        t_step = time.perf_counter()
        loss, parts, gnorm, stop_now = train_step(step, batch, stop.requested, log_now)
        if step == first and cfg.train.compile:
            log.info("torch.compile: the first step took %.1f s on the host (compilation included); "
                     "graph breaks: %d", time.perf_counter() - t_step, graph_breaks())
        step += 1
        window["steps"] += 1
        bar.update(1)

        if log_now:
            with prof.phase("metrics"):
                row = mean_over_ranks({"loss": loss.detach(), **parts}, world)
                elapsed = time.perf_counter() - window["t"]
                imgs = window["steps"] * cfg.train.global_batch / elapsed
                row.update({
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": gnorm if train_step.own_grad_norm else engine.get_global_grad_norm(),
                    "param_norm": param_norm(engine.module, cfg.train.zero_stage),
                    "img_per_s": imgs, "step_time_s": elapsed / window["steps"],
                    "data_wait_frac": window["wait"] / elapsed, "data_skipped": loader.skipped,
                    "epoch": loader.state_dict()["epoch"], "nonfinite_steps": train_step.guard.read(step, log),
                })
                if device.type == "cuda":
                    tflops = flops_per_step * window["steps"] / elapsed / world / 1e12
                    row.update({"tflops_per_gpu": tflops, "gpu/max_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30})
                    if mfu_peak:
                        row["mfu"] = tflops / mfu_peak
                    row.update(telemetry.sample())
                row.update(prof.shares())
                metrics.write(step, row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{imgs:.1f}")
                if bar.disable:
                    details = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k in parts and k != "loss")
                    log.info("step %d/%d loss %.4f (%s) lr %.2e %.1f img/s data wait %.0f%% %s",
                             step, end, row["loss"], details, row["lr"], imgs, 100 * row["data_wait_frac"],
                             format_breakdown(row))
                window = {"t": time.perf_counter(), "wait": 0.0, "steps": 0}

        if knn is not None and step % cfg.eval.knn_every == 0:
            top1 = knn(engine.module.encoder)
            metrics.write(step, {"knn_top1": top1})
            log.info("step %d: k-NN top-1 %.2f%% on the held-out set", step, 100 * top1)
        if stage.sampling and rank == 0 and cfg.train.sample_every and step % cfg.train.sample_every == 0:
            with prof.phase("sampling"):
                out = run_dir / "samples" / f"step_{step:08d}.png"
                nfe = write_sample_grid(stage.shadow, out, cfg, stage.sampling)
            log.info("EMA samples: %s (%d network evaluations per image)", out, nfe)
        if step % cfg.train.save_every == 0 or step == end or stop_now:
            train_step.guard.read(step, log)  # too many non-finite steps in a row: stop, the last checkpoint kept
            with prof.phase("checkpoint"):
                ckpts.save(engine, step, client_state())
        prof.end_step(step - 1)
        if stop_now:
            log.warning("stopped at step %d on request; resume with train.resume=auto", step)
            break
    bar.close()
    prof.close()
    metrics.close()
    if cfg.train.zero_stage < 3:  # under ZeRO-3 every rank holds a different shard
        check_replicas_identical(engine.module, world)
    if loader.skipped:
        log.warning("data: %d unreadable files were skipped during this run", loader.skipped)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg, rc = None, None
    try:
        cfg = load_config(args.config, args.overrides, stage=args.stage)
        comments = preset_comments(args.config, args.stage)
        if args.print_config:
            print(describe_config(cfg, comments))
            return 0
        rc = train(cfg, comments)
        return rc
    except ConfigError as err:
        print(f"epg_fast: config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"epg_fast: data error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"epg_fast: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if "Timed out" not in str(err) or progress["step"] is None:  # gloo's words for a collective timeout
            raise
        print(f"epg_fast: step {progress['step']}: no answer from another rank for train.dist_timeout="
              f"{cfg.train.dist_timeout} min (hung or dead): {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    except (CheckpointError, CheckpointWriteError) as err:
        print(f"epg_fast: checkpoint error: {err}", file=sys.stderr)
        return 2
    finally:
        teardown_distributed(finished=rc == 0)


if __name__ == "__main__":
    sys.exit(main())

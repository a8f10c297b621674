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
import math
import platform
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from epg_fast.checkpoint import CheckpointError, Checkpoints, CheckpointWriteError, check_same_model, check_writable
from epg_fast.config import STAGES, Config, ConfigError, check_world
from epg_fast.data import DataError, build_loader
from epg_fast.distributed import setup_distributed, teardown_distributed
from epg_fast.metrics import GPUTelemetry, MetricsWriter, peak_tflops
from epg_fast.ops import Ops
from epg_fast.profiling import Profiling, format_breakdown
from epg_fast.sample import write_sample_grid
from epg_fast.stages import Stage, build_stage, load_config, stage_named

log = logging.getLogger("epg_fast")


# ---------------------------------------------------------------------------------------
# Setup


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, default="pretrain")
    p.add_argument("--config", default=None, help="YAML preset (default: configs/<stage>/demo.yaml)")
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


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """All parameters decay, except pos_embed and cls tokens when optim.decay_tokens=false."""
    tokens = {"encoder.pos_embed", "encoder.cls_token"}
    decay = [p for n, p in model.named_parameters() if cfg.optim.decay_tokens or n not in tokens]
    no_decay = [p for n, p in model.named_parameters() if not cfg.optim.decay_tokens and n in tokens]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}]
    return groups + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])


def warmup_cosine(warmup: int, total: int):
    """lr factor at scheduler step k: linear warmup to 1 over `warmup` steps, cosine to 0 at `total`."""

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        progress = min(1.0, (k - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


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


def sync_step_decisions(draws: tuple[int, ...], stop: bool, device: torch.device) -> tuple[tuple[int, ...], bool]:
    """Rank 0's draws (pre-training's level index) reach every rank, and a stop request on
    any rank stops all, in one all-reduce."""
    own = draws if dist.get_rank() == 0 else (0,) * len(draws)
    t = torch.tensor([*own, int(stop)], device=device, dtype=torch.int64)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return tuple(int(v) for v in t[:-1]), bool(t[-1])


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


def startup_block(cfg: Config, world: int, device: torch.device, precision: str, stage: Stage, loader,
                  autocast_dtype, ops: Ops) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    lines = [
        "resolved config:",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        f"stage        {cfg.stage}",
        f"parameters   {stage.describe()}",
        f"world size   {world} ({'nccl' if device.type == 'cuda' else 'gloo'}), device {device} [{name}]",
        f"precision    {precision}; attention {ops.attention_backend(device, autocast_dtype)}; "
        f"kernels {ops.kernels_for(device)}; ZeRO stage {cfg.train.zero_stage}",
        f"data         {loader.num_images:,} images, {loader.num_classes} classes, "
        f"{loader.steps_per_epoch} steps/epoch of {cfg.train.global_batch}; "
        f"loader: {cfg.data.loader} ({type(loader).__module__}.{type(loader).__name__})",
        f"compute      {2 * stage.macs_per_image(cfg) / 1e9:.2f} GFLOP per image per step ({stage.compute()})",
    ]
    log.info("\n".join(lines))


def train(cfg: Config) -> int:
    check_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible")
    rank, world, device = setup_distributed(cfg.train.device, group_of_one=True)  # DeepSpeed needs a group
    run_dir = Path(cfg.train.run_dir)
    check_writable(run_dir)  # before any work: a read-only folder would fail only at the first save
    setup_logging(rank, run_dir)
    precision = resolve_precision(cfg, device)
    ops = Ops.from_config(cfg.model.kernels, cfg.model.attention)  # the one Ops of this run's networks
    # The data first: a bad root fails in a second, before any model is built.
    loader = build_loader(
        cfg.data, image_size=cfg.model.image_size, views=stage_named(cfg.stage).views, global_batch=cfg.train.global_batch,
        rank=rank, world_size=world, seed=cfg.train.seed, device=device,
    )
    import deepspeed  # here, not at the top: setup_distributed chose its accelerator

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    stage = build_stage(cfg, device, ops)
    lr = cfg.optim.lr * (cfg.train.global_batch / 1024 if cfg.optim.scale_lr else 1.0)
    optimizer = torch.optim.AdamW(param_groups(stage.model, cfg), lr=lr, betas=tuple(cfg.optim.betas))
    engine, _, _, scheduler = deepspeed.initialize(
        model=stage.model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(cfg.optim.warmup_steps, cfg.train.total_steps)
        ),
        config=deepspeed_config(cfg, world, precision),
    )
    ema = ShadowEMA(engine.module, stage.shadow, stage.ema_rate, stage.average_buffers, cfg.train.zero_stage, ops)

    ckpts = Checkpoints(run_dir, cfg.train.keep_last, rank)
    step = 0
    resume = None if cfg.train.resume == "none" else ckpts.latest() if cfg.train.resume == "auto" else Path(cfg.train.resume)
    if resume is not None:  # verified first (CheckpointError): train.resume=PATH never falls back
        check_same_model(resume, cfg.to_dict())
        state = ckpts.load(engine, resume)
        if state.get("config", {}).get("stage") != cfg.stage:
            raise ConfigError(f"train.resume: {resume} is a '{state.get('config', {}).get('stage')}' checkpoint, "
                              f"this run is '{cfg.stage}' (use another train.run_dir)")
        stage.shadow.load_state_dict(state[stage.shadow_key])
        loader.load_state_dict(state["data"])
        step = state["step"]
        log.info("resumed from %s at step %d", resume, step)
    end = cfg.train.stop_after or cfg.train.total_steps
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if rank == 0:
        startup_block(cfg, world, device, precision, stage, loader, autocast_dtype, ops)
    if step >= end:
        log.info("nothing to do: the run is at step %d of %d (train.resume=none starts anew)", step, end)
        return 0

    def client_state() -> dict:
        return {"step": step, stage.shadow_key: stage.shadow.state_dict(), "data": loader.state_dict(),
                "config": cfg.to_dict()}

    stop = StopRequest()
    metrics = MetricsWriter(run_dir, rank == 0, cfg.log.tensorboard)
    telemetry = GPUTelemetry(device)
    peak = cfg.log.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    flops_per_step = 2 * stage.macs_per_image(cfg) * cfg.train.global_batch
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    gen = torch.Generator(device=device)
    own_grad_norm = cfg.train.zero_stage == 0 and precision != "fp16"
    bar = tqdm(total=end, initial=step, disable=rank != 0 or not (cfg.log.progress and sys.stderr.isatty()),
               dynamic_ncols=True, unit="step")
    window = {"t": time.perf_counter(), "wait": 0.0, "steps": 0}
    batches = iter(loader)
    knn = None
    if cfg.eval.knn_every and rank == 0:  # the k-NN monitor of the live encoder (epg_fast.probe)
        from epg_fast.probe import KNNMonitor

        knn = KNNMonitor(cfg, device)
    # Step-time breakdown, traces and memory (epg_fast/profiling.py): phases are timed on a few
    # steps of each logging window and read at the logging step, so other steps do not sync.
    prof = Profiling(cfg.log, run_dir, device, rank, end, engine.module, stage.shadow, optimizer,
                     grad_partitions=world if cfg.train.zero_stage >= 2 else 1)
    log.info("training steps %d -> %d", step, end)
    while step < end:
        prof.begin_step(step)
        t_wait = time.perf_counter()
        with prof.phase("data_wait"):
            batch = next(batches)
        window["wait"] += time.perf_counter() - t_wait
        with prof.phase("h2d"):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with prof.phase("comm"):
            draws, stop_now = sync_step_decisions(stage.draws(step, step_generator(gen, cfg.train.seed, step, 0)),
                                                  stop.requested, device)
        with prof.phase("forward"), autocast:
            loss, parts = stage.loss(engine, batch, step, draws, step_generator(gen, cfg.train.seed, step, rank + 1))
        with prof.phase("backward"):
            engine.backward(loss)
        log_now = prof.is_log_step(step)
        gnorm = local_grad_norm(engine.module) if log_now and own_grad_norm else None
        with prof.phase("optimizer"):
            engine.step()  # optimiser step (DeepSpeed clips first when optim.grad_clip > 0), then lr step
        with prof.phase("ema"):
            ema.update()
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
                    "grad_norm": gnorm if own_grad_norm else engine.get_global_grad_norm(),
                    "param_norm": param_norm(engine.module, cfg.train.zero_stage),
                    "img_per_s": imgs, "step_time_s": elapsed / window["steps"],
                    "data_wait_frac": window["wait"] / elapsed, "data_skipped": loader.skipped,
                    "epoch": loader.state_dict()["epoch"],
                })
                if device.type == "cuda":
                    tflops = flops_per_step * window["steps"] / elapsed / world / 1e12
                    row.update({"tflops_per_gpu": tflops, "gpu/max_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30})
                    if peak:
                        row["mfu"] = tflops / peak
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
    try:
        cfg = load_config(args.config, args.overrides, stage=args.stage)
        return train(cfg)
    except ConfigError as err:
        print(f"epg_fast: config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"epg_fast: data error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, CheckpointWriteError) as err:
        print(f"epg_fast: checkpoint error: {err}", file=sys.stderr)
        return 2
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())

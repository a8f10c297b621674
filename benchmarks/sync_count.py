"""Host-device synchronisation points in the trainer's steady-state step, per stage.

Builds what epg_fast/train.py builds for a run (a world of one, the stage, the optimiser of
optim.impl, deepspeed.initialize, the profiling of log.*) at a tiny model size, then runs
non-logging steps of the trainer's own step (`epg_fast.train.TrainStep`) under
epg_fast.syncs.SyncCounter and prints the events per step with the source line each comes
from. On CPU every scalar read and every upload with an explicit device counts (what the same
code does with device=cuda); see epg_fast/syncs.py.

    python benchmarks/sync_count.py [--stages pretrain denoise consistency] [--steps 3] [--stacks]
                                    [--set train.zero_stage=1 optim.grad_clip=1.0 ...]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
from contextlib import nullcontext

import torch

from epg_fast.distributed import setup_distributed
from epg_fast.ops import Ops
from epg_fast.profiling import Profiling
from epg_fast.stages import build_stage, load_config
from epg_fast.syncs import SyncCounter, on_host
from epg_fast.train import TrainStep, build_engine, resolve_precision

TINY = ["model.depth=2", "model.dim=32", "model.heads=2", "model.image_size=16", "model.patch_size=4",
        "model.proj_hidden=64", "model.proj_dim=16", "model.decoder_dim=32", "model.decoder_heads=2",
        "train.global_batch=4", "optim.warmup_steps=3", "train.sample_every=0", "log.every=1000"]


@functools.cache
def world_of_one(device: str) -> tuple[int, int, torch.device]:
    """The process group DeepSpeed needs, joined once per process."""
    return setup_distributed(device, group_of_one=True)


def stage_syncs(stage_name: str, steps: int, device_arg: str, overrides: list[str] = ()) -> SyncCounter:
    """Counts over the non-logging steps among `steps` steps of the trainer's step for one
    stage, after one uncounted warm-up step (`.steps`: how many were counted)."""
    no_init = [] if stage_name == "pretrain" else ["init.encoder=null"]
    run_dir = tempfile.mkdtemp(prefix="sync_count_")
    cfg = load_config(None, TINY + no_init + [f"train.device={device_arg}", f"train.run_dir={run_dir}", *overrides],
                      stage=stage_name)
    rank, world, device = world_of_one(cfg.train.device)
    precision = resolve_precision(cfg, device)
    ops = Ops.from_config(cfg.model.kernels, cfg.model.attention)
    torch.manual_seed(cfg.train.seed)
    stage = build_stage(cfg, device, ops)
    engine, optimizer, _ = build_engine(cfg, stage, device, world, precision)
    end = steps + 1  # the last step is a logging step (log.every or not): not counted
    prof = Profiling(cfg.log, run_dir, device, rank, end, engine.module, stage.shadow, optimizer)
    train_step = TrainStep(cfg, stage, engine, device, rank, precision, ops, prof)
    g = torch.Generator().manual_seed(0)
    size, b = cfg.model.image_size, cfg.train.global_batch
    host_batch = {k: torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g) for k in stage.views}
    host_batch["label"] = torch.randint(0, cfg.model.num_classes, (b,), generator=g)
    if device.type == "cuda":
        host_batch = {k: v.pin_memory() for k, v in host_batch.items()}

    if device.type == "cpu" and not optimizer.defaults.get("fused"):
        # torch's AdamW on CPU (foreach) keeps its step counters on the host, wraps its "+ 1" in
        # a CPU tensor and reads the counters: host work by construction. On CUDA (fused) the
        # counters live on the device and nothing is exempted.
        host = on_host()
        optimizer.register_step_pre_hook(lambda *_: host.__enter__())
        optimizer.register_step_post_hook(lambda *_: host.__exit__(None, None, None))
    syncs = SyncCounter(cpu_as_device=device.type == "cpu")
    syncs.steps = 0
    for step in range(end):
        counting = step > 0 and not prof.is_log_step(step)  # step 0 warms up (DeepSpeed's first step, optimiser state)
        prof.begin_step(step)
        with syncs if counting else nullcontext():
            train_step(step, host_batch, stop_requested=False, log_now=False)
        prof.end_step(step)
        syncs.steps += counting
    prof.close()
    return syncs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", default=["pretrain", "denoise", "consistency"])
    ap.add_argument("--steps", type=int, default=3, help="steps per stage after one warm-up step; the last (a logging step) is not counted")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. train.zero_stage=1 optim.grad_clip=1.0 (the XL preset's)")
    ap.add_argument("--stacks", action="store_true", help="print each event's full stack (project frames)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("epg_fast").setLevel(logging.WARNING)
    for name in args.stages:
        syncs = stage_syncs(name, args.steps, args.device, args.set)
        n = max(1, syncs.steps)
        per_step = {k: v / n for k, v in sorted(syncs.counts().items())}
        print(f"\n## {name}: {len(syncs.events) / n:g} syncs per step over {syncs.steps} steps {per_step}")
        for (kind, where), count in sorted(syncs.by_source().items(), key=lambda kv: -kv[1]):
            print(f"  {count / n:g}/step  {kind:<11} {where}")
        if args.stacks:
            seen = set()
            for e in syncs.events:
                if (e.kind, e.where) in seen:
                    continue
                seen.add((e.kind, e.where))
                print(f"  --- {e.kind} at {e.where}")
                for f in e.stack[-8:]:
                    print(f"      {os.path.relpath(f.filename)}:{f.lineno} {f.name}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

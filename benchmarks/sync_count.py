"""Host-device synchronisation points in the trainer's steady-state step, per stage.

Builds what epg_fast/train.py builds for a run (a world of one on gloo, the stage, AdamW,
deepspeed.initialize, the shadow EMA) at a tiny model size, then runs non-logging steps of the
trainer's loop body under epg_fast.syncs.SyncCounter and prints the events per step with the
source line each comes from. On CPU every scalar read and every upload with an explicit
device counts (what the same code does with device=cuda); see epg_fast/syncs.py.

    python benchmarks/sync_count.py [--stages pretrain denoise consistency] [--steps 3] [--stacks]
                                    [--set train.zero_stage=1 optim.grad_clip=1.0 ...]

The loop body below mirrors train.py's; when the trainer's step becomes one callable, time
that instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import nullcontext

import torch

from epg_fast.config import load_config
from epg_fast.stages import build_stage
from epg_fast.syncs import SyncCounter
from epg_fast.train import (ShadowEMA, deepspeed_config, param_groups, resolve_precision, setup_distributed,
                            step_generator, sync_step_decisions, warmup_cosine)

TINY = ["model.depth=2", "model.dim=32", "model.heads=2", "model.image_size=16", "model.patch_size=4",
        "model.proj_hidden=64", "model.proj_dim=16", "model.decoder_dim=32", "model.decoder_heads=2",
        "train.global_batch=4", "optim.warmup_steps=3", "train.sample_every=0", "log.every=1000"]


def stage_syncs(stage_name: str, steps: int, device_arg: str, overrides: list[str] = ()) -> SyncCounter:
    """Counts over `steps` non-logging steps of the trainer's loop for one stage."""
    no_init = [] if stage_name == "pretrain" else ["init.encoder=null"]
    cfg = load_config(None, TINY + no_init + [f"train.device={device_arg}", *overrides], stage=stage_name)
    rank, world, device = setup_distributed(cfg)  # idempotent for a world of one
    import deepspeed

    precision = resolve_precision(cfg, device)
    torch.manual_seed(cfg.train.seed)
    stage = build_stage(cfg, device)
    optimizer = torch.optim.AdamW(param_groups(stage.model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    engine, _, _, _ = deepspeed.initialize(
        model=stage.model, optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.optim.warmup_steps,
                                                                                       cfg.train.total_steps)),
        config=deepspeed_config(cfg, world, precision),
    )
    ema = ShadowEMA(engine.module, stage.shadow, stage.ema_rate, stage.bn_mode, cfg.train.zero_stage)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    gen = torch.Generator(device=device)
    g = torch.Generator().manual_seed(0)
    size, b = cfg.model.image_size, cfg.train.global_batch
    host_batch = {k: torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g) for k in stage.views}
    host_batch["label"] = torch.randint(0, cfg.model.num_classes, (b,), generator=g)
    if device.type == "cuda":
        host_batch = {k: v.pin_memory() for k, v in host_batch.items()}

    syncs = SyncCounter(cpu_as_device=device.type == "cpu")
    for step in range(steps + 1):
        counting = step > 0  # step 0 warms up (DeepSpeed's first-step bookkeeping, optimiser state)
        if step == 1:  # AdamW's step counters stay on the CPU on CUDA too (not fused): host reads
            syncs.treat_as_host(s["step"] for s in optimizer.state.values() if torch.is_tensor(s.get("step")))
        with syncs if counting else nullcontext():
            # ---- train.py's loop body on a non-logging step ----
            batch = {k: v.to(device, non_blocking=True) for k, v in host_batch.items()}
            n, stop_now = sync_step_decisions(stage.draw(step, step_generator(gen, cfg.train.seed, step, 0)),
                                              False, device)
            with autocast:
                loss, parts = stage.loss(engine, batch, step, n, step_generator(gen, cfg.train.seed, step, rank + 1))
            engine.backward(loss)
            engine.step()
            ema.update()
            stage.after_step(step + 1, cfg.train.run_dir, rank)
    return syncs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", default=["pretrain", "denoise", "consistency"])
    ap.add_argument("--steps", type=int, default=3, help="counted steps per stage (after one warm-up step)")
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
        per_step = {k: v / args.steps for k, v in sorted(syncs.counts().items())}
        print(f"\n## {name}: {len(syncs.events) / args.steps:g} syncs per step {per_step}")
        for (kind, where), count in sorted(syncs.by_source().items(), key=lambda kv: -kv[1]):
            print(f"  {count / args.steps:g}/step  {kind:<11} {where}")
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

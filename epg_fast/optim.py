"""The optimiser side of a run: AdamW parameter groups, the learning-rate schedule (linear
warmup, then cosine or steps) and gradient clipping that may start only after warmup.

All three follow the reference implementation's training scripts: the schedule factor at
optimiser step k (0-based) is k / W during warmup, so the first step runs at lr 0; the
token parameters are found by their own names in whichever model is trained; clipping
"after warmup" starts at step W.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from epg_fast.config import Config, OptimConfig
from epg_fast.optimizers import adamw

TOKENS = ("pos_embed", "cls_token")  # exempt from weight decay when optim.decay_tokens=false


def token_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the position embedding and cls tokens in `model`: `encoder.pos_embed` in the
    pre-training network, `pos_embed` in the fine-tuned EPG model."""
    return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in TOKENS]


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """All parameters decay, except pos_embed and the cls tokens when optim.decay_tokens=false."""
    exempt = set() if optim.decay_tokens else set(token_parameters(model))
    decay = [p for n, p in model.named_parameters() if n not in exempt]
    no_decay = [p for n, p in model.named_parameters() if n in exempt]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}]
    return groups + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW of `optim.impl` (epg_fast.optimizers) over the parameter groups, at optim.lr
    (scaled by global_batch / 1024 with optim.scale_lr)."""
    return adamw(param_groups(model, cfg.optim), cfg.optim.impl, base_lr(cfg), tuple(cfg.optim.betas), device)


def base_lr(cfg: Config) -> float:
    """optim.lr, scaled by global_batch / 1024 with optim.scale_lr."""
    return cfg.optim.lr * (cfg.train.global_batch / 1024 if cfg.optim.scale_lr else 1.0)


def lr_factor(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """lr / optim.lr at optimiser step k (0-based): k / W over the W = optim.warmup_steps
    warmup steps, then
    - "cosine": 0.5 (1 + cos(pi (k - W) / (K - W))), 0 from K = total_steps on;
    - "step": 1, then optim.factors[i] once k > optim.milestones[i] (the reference's
      consistency schedule: x0.3 after step 400k, x0.08 after 500k)."""
    warmup = optim.warmup_steps

    def factor(k: int) -> float:
        if k < warmup:
            return k / warmup
        if optim.schedule == "step":
            passed = [f for m, f in zip(optim.milestones, optim.factors) if k > m]
            return passed[-1] if passed else 1.0
        progress = min(1.0, (k - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(cfg: Config) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """DeepSpeed's lr_scheduler argument; it steps after every optimiser step."""
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.optim, cfg.train.total_steps))


class GradClip:
    """optim.grad_clip as the max global gradient norm, from step 0, or with
    optim.clip_after_warmup only from step optim.warmup_steps on (the reference's denoising
    fine-tuning). DeepSpeed reads its clipping value from its config at every step (ZeRO 0:
    the engine clips; ZeRO 1-3 and fp16: its optimiser wrapper's clip_grad), so `apply` sets
    both before the step; deepspeed 0.19.8 holds no other copy."""

    def __init__(self, optim: OptimConfig) -> None:
        self.max_norm, self.after = optim.grad_clip, optim.warmup_steps if optim.clip_after_warmup else 0

    def at(self, step: int) -> float:
        return self.max_norm if step >= self.after else 0.0

    def apply(self, engine, step: int) -> None:
        if not self.after:  # clipping is the same at every step: DeepSpeed's config holds it
            return
        value = self.at(step)
        engine._config.gradient_clipping = value
        if hasattr(engine.optimizer, "clip_grad"):
            engine.optimizer.clip_grad = value

"""What differs between the training stages; train.py holds the one loop they share.

A stage builds its online network and its shadow copy (pre-training: the EMA target f- the
loss uses; fine-tuning: the EMA weights that samples are drawn from), computes the loss of
one step from a batch, and knows its cost in FLOPs. Everything stateful (DeepSpeed,
checkpoints, logging) stays in the trainer.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from epg_fast import schedule
from epg_fast.config import Config, ConfigError
from epg_fast.data import normalize
from epg_fast.flops import finetune_step_macs, pretrain_step_macs
from epg_fast.models.encoder import PretrainEncoder, build_pretrain_encoder
from epg_fast.models.epg import EPG, load_encoder_from_pretrain
from epg_fast.objectives.consistency import consistency_loss
from epg_fast.objectives.denoise import denoise_loss
from epg_fast.objectives.pretrain import levels, pretrain_loss

log = logging.getLogger("epg_fast")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class PretrainStage:
    """Encoder + projector; contrastive + representation-consistency objective."""

    views = ("x", "y1", "y2")
    shadow_key = "target"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.model = build_pretrain_encoder(cfg.model).to(device)
        self.shadow = copy.deepcopy(self.model)  # f- starts equal to f
        self.ema_rate, self.bn_mode = cfg.pretrain.target_ema, cfg.pretrain.target_bn

    def describe(self) -> str:
        enc, proj = count(self.model.encoder), count(self.model.projection_head)
        return f"{enc + proj:,} (encoder {enc:,}, projector {proj:,})"

    def macs_per_image(self) -> int:
        return pretrain_step_macs(self.cfg.model)

    def compute(self) -> str:
        return "six encoder forwards, three with grad"

    def draw(self, step: int, gen: torch.Generator) -> int:
        """The step's level index n, uniform in {0, ..., N(k) - 2} (rank 0's draw is used)."""
        p = self.cfg.pretrain
        num_levels = schedule.curriculum_steps(step, self.cfg.train.total_steps, p.s0, p.s1)
        return int(torch.randint(num_levels - 1, (1,), generator=gen, device=gen.device))

    def loss(self, engine, batch: dict[str, Tensor], step: int, n: int, gen: torch.Generator) -> tuple[Tensor, dict]:
        cfg, p = self.cfg, self.cfg.pretrain
        x, y1, y2 = (normalize(batch[k], cfg.data.normalization) for k in self.views)
        num_levels = schedule.curriculum_steps(step, cfg.train.total_steps, p.s0, p.s1)
        lv = levels(n, num_levels, cfg.model.image_size)
        noise = torch.randn(x.shape, generator=gen, device=x.device)  # one e for every noisy input
        loss, parts = pretrain_loss(engine, self.shadow, x, y1, y2, noise, lv, p.tau_contrastive,
                                    p.tau_consistency, p.consistency_target)
        return loss, {**parts, "N": num_levels, "n": n, "t_n": lv.t_n,
                      "tau_contrastive": p.tau_contrastive, "tau_consistency": p.tau_consistency}

    def after_step(self, step: int, run_dir: Path, rank: int) -> None:
        pass


def load_pretrained_encoder(path: str, weights: str = "module") -> dict[str, Tensor]:
    """The PretrainEncoder state dict (our names) of a pre-training checkpoint folder of ours,
    or of a state-dict file in our or the reference's naming (see epg_fast.convert)."""
    from epg_fast.convert import convert, unwrap

    source = Path(path)
    if source.is_dir():
        if not (source / "COMPLETE").is_file():
            raise ConfigError(f"init.encoder={source} is not a completed checkpoint folder")
        (states,) = source.glob("*mp_rank_00_model_states.pt")
        state = torch.load(states, map_location="cpu", weights_only=False)
        stage = state.get("config", {}).get("stage")
        if stage != "pretrain":
            raise ConfigError(f"init.encoder={source} is a '{stage}' checkpoint, not a pre-training one")
        return state[weights]
    if not source.is_file():
        raise ConfigError(f"init.encoder={source} does not exist: run the pre-training first, or set "
                          "init.encoder=null to start from random weights")
    sd, _ = unwrap(torch.load(source, map_location="cpu", weights_only=False))
    if not any(k.startswith("encoder.") for k in sd):
        kind, sd = convert(sd, to="ours")
        if kind != "pretrain":
            raise ConfigError(f"init.encoder={source} holds a full EPG model, not a pre-training encoder")
    return sd


def perceptual_features(cfg: Config, pretrained: dict[str, Tensor], device: torch.device):
    """The consistency stage's perceptual feature map, as the reference's (`forward_features`
    of the pre-training model in eval mode): the frozen pre-trained network's projector output
    z of an image seen at the cleanest level s * sigma_min, its BatchNorm layers normalising
    with the checkpoint's running statistics."""
    m = cfg.model
    encoder = PretrainEncoder(
        proj_hidden=pretrained["projection_head.0.weight"].shape[0], proj_dim=pretrained["projection_head.6.weight"].shape[0],
        image_size=m.image_size, patch_size=m.patch_size, dim=m.dim, depth=m.depth, heads=m.heads,
        mlp_ratio=m.mlp_ratio, cls_tokens=m.cls_tokens,
    )
    encoder.load_state_dict(pretrained)
    encoder = encoder.to(device).eval().requires_grad_(False)
    t0 = schedule.resolution_shift(m.image_size) * schedule.SIGMA_MIN

    def features(images: Tensor) -> Tensor:
        return encoder.perceptual_features(images, torch.full((images.shape[0],), t0, device=images.device))

    return features


class FinetuneStage:
    """EPG (encoder + decoder), fine-tuned into a diffusion (`denoise`) or one-step
    consistency (`consistency`) model; EMA weights for sampling."""

    views = ("x",)
    shadow_key = "ema"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, m = cfg, cfg.model
        model = EPG(m.image_size, m.patch_size, m.dim, m.depth, m.heads, m.decoder_dim, m.decoder_heads,
                    m.num_classes, m.mlp_ratio, m.cls_tokens, m.dropout)
        self.perceptual = None
        if cfg.init.encoder:
            pretrained = load_pretrained_encoder(cfg.init.encoder)
            missing, unexpected = load_encoder_from_pretrain(model, pretrained)
            log.info("encoder initialised from %s (projector dropped); missing keys: %s; unexpected keys: %s",
                     cfg.init.encoder, missing or "none", unexpected or "none")
            if cfg.stage == "consistency" and cfg.consistency.perceptual_weight > 0:
                self.perceptual = (perceptual_features(cfg, pretrained, device), cfg.consistency.perceptual_weight)
        else:
            log.warning("init.encoder is not set: the encoder starts from random weights")
        self.model = model.to(device)
        self.shadow = copy.deepcopy(self.model)
        self.ema_rate, self.bn_mode = cfg.finetune.ema, "initial"  # no BatchNorm in EPG

    def describe(self) -> str:
        m = self.model
        enc = sum(count(getattr(m, k)) for k in ("patch_embed", "blocks", "norm")) + m.cls_token.numel() + m.pos_embed.numel()
        return f"{count(m):,} (encoder {enc:,}, decoder and heads {count(m) - enc:,})"

    def macs_per_image(self) -> int:
        return finetune_step_macs(self.cfg.model, self.cfg.stage)

    def compute(self) -> str:
        return "one forward with grad" + (" + one target forward" if self.cfg.stage == "consistency" else "")

    def draw(self, step: int, gen: torch.Generator) -> int:
        return 0

    def loss(self, engine, batch: dict[str, Tensor], step: int, n: int, gen: torch.Generator) -> tuple[Tensor, dict]:
        cfg, f = self.cfg, self.cfg.finetune
        x, y = normalize(batch["x"], cfg.data.normalization), batch["label"]
        common: dict[str, Any] = dict(image_size=cfg.model.image_size, generator=gen,
                                      label_dropout=f.label_dropout, num_classes=cfg.model.num_classes)
        if cfg.stage == "denoise":
            d = cfg.denoise
            return denoise_loss(engine, x, y, p_mean=d.p_mean, p_std=d.p_std, levels=d.levels, **common)
        c = cfg.consistency
        return consistency_loss(engine, x, y, step=step, p_mean=c.p_mean, p_std=c.p_std, q=c.q, k=c.k, b=c.b,
                                round_steps=c.round_steps, round_offset=c.round_offset, huber_c=c.huber_c,
                                perceptual=self.perceptual, **common)

    def after_step(self, step: int, run_dir: Path, rank: int) -> None:
        """Every train.sample_every steps rank 0 writes a grid of EMA samples."""
        every = self.cfg.train.sample_every
        if rank != 0 or not every or step % every:
            return
        from epg_fast.sample import write_sample_grid

        out = run_dir / "samples" / f"step_{step:08d}.png"
        nfe = write_sample_grid(self.shadow, out, self.cfg, seed=self.cfg.train.seed)
        log.info("EMA samples: %s (%d network evaluations per image)", out, nfe)


def build_stage(cfg: Config, device: torch.device) -> PretrainStage | FinetuneStage:
    return PretrainStage(cfg, device) if cfg.stage == "pretrain" else FinetuneStage(cfg, device)

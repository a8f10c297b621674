"""Pre-training: the encoder + projector, trained with the contrastive and the
representation-consistency terms against an EMA target network (EPG_SPEC section 3)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from epg_fast import schedule
from epg_fast.config import Config
from epg_fast.data import normalize
from epg_fast.flops import pretrain_step_macs
from epg_fast.models.encoder import ENCODER_PRESETS, build_pretrain_encoder
from epg_fast.objectives.pretrain import levels, pretrain_loss
from epg_fast.ops import Ops
from epg_fast.stages.base import check_architecture, count, resolve_architecture

ARCHITECTURE = ("depth", "dim", "heads")  # the fields of an encoder preset


class PretrainStage:
    """Encoder + projector; contrastive + representation-consistency objective. The shadow is
    the target network f- of the loss."""

    name = "pretrain"
    views = ("x", "y1", "y2")  # the image and its two augmented views
    shadow_key = "target"
    shadow_in_loss = True
    sampling = None

    @classmethod
    def configure(cls, cfg: Config) -> None:
        resolve_architecture(cfg, ARCHITECTURE, ENCODER_PRESETS)
        check_architecture(cfg.model, ARCHITECTURE)

    def __init__(self, cfg: Config, device: torch.device, ops: Ops) -> None:
        self.cfg, p = cfg, cfg.pretrain
        self.model = build_pretrain_encoder(cfg.model, ops).to(device)
        self.shadow = copy.deepcopy(self.model).requires_grad_(False)  # f- starts equal to f
        # The target projector's BatchNorm (pretrain.target_bn): "initial" (the reference)
        # keeps the target in eval mode with its running statistics as built (mean 0, var 1);
        # "ema" averages them like the weights; "batch" normalises with batch statistics.
        self.shadow.train(p.target_bn == "batch")
        self.ema_rate, self.average_buffers = p.target_ema, p.target_bn == "ema"

    def describe(self) -> str:
        enc, proj = count(self.model.encoder), count(self.model.projection_head)
        return f"{enc + proj:,} (encoder {enc:,}, projector {proj:,})"

    @classmethod
    def macs_per_image(cls, cfg: Config) -> int:
        return pretrain_step_macs(cfg.model)

    def compute(self) -> str:
        return "six encoder forwards, three with grad"

    def num_levels(self, step: int) -> int:
        p = self.cfg.pretrain
        return schedule.curriculum_steps(step, self.cfg.train.total_steps, p.s0, p.s1)

    def draws(self, step: int, gen: torch.Generator) -> tuple[int]:
        """The step's level index n, uniform in {0, ..., N(k) - 2}."""
        return (int(torch.randint(self.num_levels(step) - 1, (1,), generator=gen, device=gen.device)),)

    def loss(self, online: nn.Module, batch: Mapping[str, Tensor], step: int, draws: Sequence[int],
             gen: torch.Generator) -> tuple[Tensor, dict]:
        cfg, p = self.cfg, self.cfg.pretrain
        (n,) = draws
        x, y1, y2 = (normalize(batch[k], cfg.data.normalization) for k in self.views)
        num_levels = self.num_levels(step)
        lv = levels(n, num_levels, cfg.model.image_size)
        noise = torch.randn(x.shape, generator=gen, device=x.device)  # one e for every noisy input
        loss, parts = pretrain_loss(online, self.shadow, x, y1, y2, noise, lv, p.tau_contrastive,
                                    p.tau_consistency, p.consistency_target)
        return loss, {**parts, "N": num_levels, "n": n, "t_n": lv.t_n,
                      "tau_contrastive": p.tau_contrastive, "tau_consistency": p.tau_consistency}

"""Fine-tuning: the pre-trained encoder joined with a decoder (the EPG model), trained end to
end into a diffusion model (`denoise`) or a one-step consistency model (`consistency`),
EPG_SPEC section 4. The shadow is the EMA of the weights, the model samples are drawn from."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from epg_fast import schedule
from epg_fast.checkpoint import CheckpointError, load_file, read_checkpoint
from epg_fast.config import Config, ConfigError, ModelConfig
from epg_fast.convert import ConvertError, convert, unwrap
from epg_fast.data import normalize
from epg_fast.flops import finetune_step_macs
from epg_fast.models.encoder import PretrainEncoder
from epg_fast.models.epg import EPG, EPG_PRESETS, load_encoder_from_pretrain
from epg_fast.objectives.consistency import consistency_loss
from epg_fast.objectives.denoise import denoise_loss
from epg_fast.ops import Ops
from epg_fast.stages.base import Sampling, check_architecture, count, resolve_architecture
from epg_fast.stages.pretrain import PretrainStage

log = logging.getLogger("epg_fast")
ARCHITECTURE = ("depth", "dim", "heads", "decoder_dim", "decoder_heads")  # the fields of an EPG preset


def epg_from_config(m: ModelConfig, ops: Ops) -> EPG:
    """The EPG model of a resolved model config, computing through `ops`."""
    return EPG(image_size=m.image_size, patch_size=m.patch_size, dim=m.dim, depth=m.depth, heads=m.heads,
               decoder_dim=m.decoder_dim, decoder_heads=m.decoder_heads, num_classes=m.num_classes,
               mlp_ratio=m.mlp_ratio, cls_tokens=m.cls_tokens, dropout=m.dropout, ops=ops)


def load_pretrained_encoder(path: str) -> dict[str, Tensor]:
    """The PretrainEncoder state dict (our names) of a pre-training checkpoint folder of ours,
    or of a state-dict file in our or the reference's naming (see epg_fast.convert)."""
    source = Path(path)
    if source.is_dir():
        try:
            saved = read_checkpoint(source)
        except CheckpointError as err:
            raise ConfigError(f"init.encoder: {err}") from None
        if saved.stage != PretrainStage.name:
            raise ConfigError(f"init.encoder={source} is a '{saved.stage}' checkpoint, not a pre-training one")
        return dict(saved.weights)
    if not source.is_file():
        raise ConfigError(f"init.encoder={source} does not exist: run the pre-training first, or set "
                          "init.encoder=null to start from random weights")
    try:
        sd, _ = unwrap(load_file(source))  # weights_only: a file from elsewhere runs no code
    except CheckpointError as err:
        raise ConfigError(f"init.encoder: {err}") from None
    except ConvertError as err:
        raise ConfigError(f"init.encoder={source}: {err}") from None
    if not any(k.startswith("encoder.") for k in sd):
        try:
            kind, sd = convert(sd, to="ours")
        except ConvertError as err:
            raise ConfigError(f"init.encoder={source}: {err}") from None
        if kind == "epg":
            raise ConfigError(f"init.encoder={source} holds a full EPG model, not a pre-training encoder")
    return sd


class FinetuneStage:
    """What both fine-tunings share: the EPG model (its encoder from init.encoder), the EMA
    shadow, the label-dropout and sampling settings."""

    views = ("x",)  # the image; its class label comes with it
    shadow_key = "ema"
    shadow_in_loss = False
    sampling: Sampling
    target_forward: bool  # the loss runs a second forward without gradients

    @classmethod
    def configure(cls, cfg: Config) -> None:
        m, f = cfg.model, cfg.finetune
        resolve_architecture(cfg, ARCHITECTURE, {k: tuple(v)[: len(ARCHITECTURE)] for k, v in EPG_PRESETS.items()})
        # A custom decoder defaults to the encoder's width.
        m.decoder_dim = m.decoder_dim if m.decoder_dim is not None else m.dim
        m.decoder_heads = m.decoder_heads if m.decoder_heads is not None else m.heads
        check_architecture(m, ARCHITECTURE)
        if cfg.eval.knn_every:
            raise ConfigError("eval.knn_every monitors the pre-training encoder: set it in --stage pretrain")
        if not (0.0 <= f.label_dropout < 1.0 and 0.0 <= f.ema < 1.0):
            raise ConfigError("finetune.label_dropout and finetune.ema must be in [0, 1)")
        if m.num_classes <= 0 or cfg.train.sample_every < 0 or f.sample_count <= 0 or f.sample_steps < 1:
            raise ConfigError("model.num_classes, finetune.sample_count and finetune.sample_steps must be > 0, "
                              "train.sample_every >= 0")

    def __init__(self, cfg: Config, device: torch.device, ops: Ops) -> None:
        self.cfg = cfg
        model = epg_from_config(cfg.model, ops)
        self.pretrained = None
        if cfg.init.encoder:
            self.pretrained = load_pretrained_encoder(cfg.init.encoder)
            try:
                missing, unexpected = load_encoder_from_pretrain(model, self.pretrained)
            except ValueError as err:  # a shape mismatch: another width or patch size
                raise ConfigError(f"init.encoder={cfg.init.encoder} does not fit this model: {err}") from None
            if (missing or unexpected) and not cfg.init.allow_partial:  # e.g. an encoder of another depth
                raise ConfigError(f"init.encoder={cfg.init.encoder} does not fit this model: {len(missing)} missing "
                                  f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]} keys "
                                  "(init.allow_partial=true loads what matches)")
            log.info("encoder initialised from %s (projector dropped); missing keys: %s; unexpected keys: %s",
                     cfg.init.encoder, missing or "none", unexpected or "none")
        else:
            log.warning("init.encoder is not set: the encoder starts from random weights")
        self.model = model.to(device)
        # The EMA weights average the parameters; EPG has no buffers, and samples are drawn
        # in eval mode.
        self.shadow = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.ema_rate, self.average_buffers = cfg.finetune.ema, False

    def describe(self) -> str:
        m = self.model
        enc = sum(count(getattr(m, k)) for k in ("patch_embed", "blocks", "norm")) + m.cls_token.numel() + m.pos_embed.numel()
        return f"{count(m):,} (encoder {enc:,}, decoder and heads {count(m) - enc:,})"

    @classmethod
    def macs_per_image(cls, cfg: Config) -> int:
        return finetune_step_macs(cfg.model, cls.target_forward)

    def compute(self) -> str:
        return "one forward with grad" + (" + one target forward" if self.target_forward else "")

    def draws(self, step: int, gen: torch.Generator) -> tuple[()]:
        return ()  # every decision of a fine-tuning step is per sample, from the rank's generator

    def common(self, gen: torch.Generator) -> dict[str, Any]:
        """The loss arguments both fine-tunings take."""
        cfg = self.cfg
        return dict(image_size=cfg.model.image_size, generator=gen, label_dropout=cfg.finetune.label_dropout,
                    num_classes=cfg.model.num_classes)


class DenoiseStage(FinetuneStage):
    """A diffusion model: the network predicts the clean image (x0) at a sampled level."""

    name = "denoise"
    sampling = Sampling(prediction="x0", grid_sampler="heun")
    target_forward = False

    @classmethod
    def configure(cls, cfg: Config) -> None:
        super().configure(cfg)
        if cfg.denoise.levels < 2:
            raise ConfigError("denoise.levels must be >= 2")

    def loss(self, online: nn.Module, batch: Mapping[str, Tensor], step: int, draws: Sequence[int],
             gen: torch.Generator) -> tuple[Tensor, dict]:
        d = self.cfg.denoise
        x = normalize(batch["x"], self.cfg.data.normalization)
        return denoise_loss(online, x, batch["label"], p_mean=d.p_mean, p_std=d.p_std, levels=d.levels,
                            **self.common(gen))


class ConsistencyStage(FinetuneStage):
    """A one-step generator by easy consistency tuning (ECT), with the EDM parameterisation;
    optionally a perceptual term on frozen pre-trained encoder features."""

    name = "consistency"
    sampling = Sampling(prediction="edm", grid_sampler="onestep")
    target_forward = True

    @classmethod
    def configure(cls, cfg: Config) -> None:
        super().configure(cfg)
        c = cfg.consistency
        if c.perceptual_weight > 0 and not cfg.init.encoder:
            raise ConfigError("consistency.perceptual_weight > 0 needs init.encoder (the frozen feature network)")
        if c.round_steps <= 0 or c.huber_c <= 0:
            raise ConfigError("consistency.round_steps and consistency.huber_c must be > 0")

    def __init__(self, cfg: Config, device: torch.device, ops: Ops) -> None:
        super().__init__(cfg, device, ops)
        weight = cfg.consistency.perceptual_weight
        self.perceptual = (perceptual_features(cfg, self.pretrained, device, ops), weight) if weight > 0 else None

    def loss(self, online: nn.Module, batch: Mapping[str, Tensor], step: int, draws: Sequence[int],
             gen: torch.Generator) -> tuple[Tensor, dict]:
        c = self.cfg.consistency
        x = normalize(batch["x"], self.cfg.data.normalization)
        return consistency_loss(online, x, batch["label"], step=step, p_mean=c.p_mean, p_std=c.p_std, q=c.q, k=c.k,
                                b=c.b, round_steps=c.round_steps, round_offset=c.round_offset, huber_c=c.huber_c,
                                perceptual=self.perceptual, **self.common(gen))


def perceptual_features(cfg: Config, pretrained: dict[str, Tensor], device: torch.device,
                        ops: Ops) -> Callable[[Tensor], Tensor]:
    """The consistency stage's perceptual feature map, as the reference's (`forward_features`
    of the pre-training model in eval mode): the frozen pre-trained network's projector output
    z of an image seen at the cleanest level s * sigma_min, its BatchNorm layers normalising
    with the checkpoint's running statistics."""
    m = cfg.model
    encoder = PretrainEncoder(
        proj_hidden=pretrained["projection_head.0.weight"].shape[0], proj_dim=pretrained["projection_head.6.weight"].shape[0],
        image_size=m.image_size, patch_size=m.patch_size, dim=m.dim, depth=m.depth, heads=m.heads,
        mlp_ratio=m.mlp_ratio, cls_tokens=m.cls_tokens, ops=ops,
    )
    encoder.load_state_dict(pretrained)
    encoder = encoder.to(device).eval().requires_grad_(False)
    t0 = schedule.resolution_shift(m.image_size) * schedule.SIGMA_MIN

    def features(images: Tensor) -> Tensor:
        return encoder.perceptual_features(images, torch.full((images.shape[0],), t0, device=images.device))

    return features

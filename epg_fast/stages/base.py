"""The protocol every training stage implements, and the config checks stages share.

A stage is what differs between pre-training and the two fine-tunings; the trainer
(epg_fast/train.py) runs one loop for all of them, the throughput benchmark times the same
step, the sampler reads a stage's parameterisation, and the loader fills the stage's views.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from epg_fast.config import Config, ConfigError, ModelConfig
from epg_fast.ops import Ops


class Sampling(NamedTuple):
    """How a fine-tuned model is sampled from."""

    prediction: str  # the parameterisation of D: "x0" or "edm" (see models.epg.denoise)
    grid_sampler: str  # the trainer's sample grids with finetune.sample_sampler=auto


class Stage(Protocol):
    """One training stage. Class attributes describe it; an instance holds its networks."""

    name: ClassVar[str]  # the registry's name, the config's `stage`
    views: ClassVar[tuple[str, ...]]  # the image views of a sample the loader fills: ("x",) or ("x", "y1", "y2")
    shadow_key: ClassVar[str]  # where a checkpoint keeps the shadow (one of checkpoint.SHADOW_KEYS)
    shadow_in_loss: ClassVar[bool]  # the loss reads the shadow (pre-training's target network)
    sampling: ClassVar[Sampling | None]  # None: the stage's model does not generate images

    model: nn.Module  # the online network: the optimiser trains it
    shadow: nn.Module  # its EMA copy, without gradients, in the mode the stage uses it in
    ema_rate: float  # shadow <- rate * shadow + (1 - rate) * online after every step
    average_buffers: bool  # the EMA also averages the floating-point buffers

    @classmethod
    def configure(cls, cfg: Config) -> None:
        """Fill the stage's defaults into a freshly read config and check its own keys;
        raises ConfigError. Runs before the checks every stage shares."""

    def __init__(self, cfg: Config, device: torch.device, ops: Ops) -> None: ...

    def draws(self, step: int, gen: torch.Generator) -> tuple[int, ...]:
        """The step's random decisions every rank must share (rank 0's are used): drawn from
        `gen`, which depends on (seed, step) only. () when there are none."""

    def loss(self, online: nn.Module, batch: Mapping[str, Tensor], step: int, draws: Sequence[int],
             gen: torch.Generator) -> tuple[Tensor, dict]:
        """(scalar loss, metrics) of one step on this rank's batch; `gen` is this rank's."""

    @classmethod
    def macs_per_image(cls, cfg: Config) -> int:
        """Multiply-adds of one training step per image (forward and backward)."""

    def describe(self) -> str:
        """The parameter count, split into the network's parts."""

    def compute(self) -> str:
        """What one step computes, in words."""


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def resolve_architecture(cfg: Config, keys: tuple[str, ...], presets: Mapping[str, Sequence[int]]) -> None:
    """Expand model.preset into `keys`, the preset table's leading fields, in its order."""
    m: ModelConfig = cfg.model
    if m.preset != "custom":
        if m.preset not in presets:
            close = difflib.get_close_matches(m.preset, list(presets), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown model.preset '{m.preset}' for stage {cfg.stage}{hint} (known: custom, {', '.join(presets)})"
            )
        for key, value in zip(keys, presets[m.preset]):
            if getattr(m, key) not in (None, value):
                raise ConfigError(
                    f"model.{key}={getattr(m, key)} conflicts with model.preset={m.preset} ({value}); "
                    "use model.preset=custom to set it"
                )
            setattr(m, key, value)


def check_architecture(m: ModelConfig, keys: tuple[str, ...]) -> None:
    """Every architecture key set and > 0, every (width, heads) pair split into heads of 8k
    channels."""
    for key in keys:
        if getattr(m, key) is None:
            raise ConfigError(f"model.{key} must be set when model.preset=custom")
    for key in keys:
        if getattr(m, key) <= 0:
            raise ConfigError(f"'model.{key}' must be > 0, got {getattr(m, key)}")
    for width in ("dim", "decoder_dim"):
        if width not in keys:
            continue
        heads_key = width.replace("dim", "heads")
        dim, heads = getattr(m, width), getattr(m, heads_key)
        if dim <= 0 or heads <= 0 or dim % heads:
            raise ConfigError(f"model.{width}={dim} is not divisible by model.{heads_key}={heads}")
        if (dim // heads) % 8:
            raise ConfigError(f"head dim model.{width}/model.{heads_key}={dim // heads} must be a multiple of 8")

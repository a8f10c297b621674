"""The training stages, by name: the one place that maps `stage` to what it does.

    pretrain     PretrainStage     encoder + projector against an EMA target (EPG_SPEC section 3)
    denoise      DenoiseStage      EPG fine-tuned into a diffusion model (section 4)
    consistency  ConsistencyStage  EPG fine-tuned into a one-step consistency model (section 4)

Each implements the protocol `Stage` (stages/base.py). `load_config` is the full config
loader: the file and overrides (epg_fast.config), the stage's own defaults and checks, then
the checks every stage shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from epg_fast.config import Config, ConfigError, check_config, read_config
from epg_fast.ops import Ops
from epg_fast.stages.base import Sampling, Stage
from epg_fast.stages.finetune import ConsistencyStage, DenoiseStage, epg_from_config, load_pretrained_encoder
from epg_fast.stages.pretrain import PretrainStage

REGISTRY: dict[str, type[Stage]] = {s.name: s for s in (PretrainStage, DenoiseStage, ConsistencyStage)}

__all__ = ["REGISTRY", "Sampling", "Stage", "epg_from_config", "build_stage", "load_config", "load_pretrained_encoder",
           "resolve_config", "stage_named", "stage_sampled_as"]


def stage_named(name: str) -> type[Stage]:
    if name not in REGISTRY:
        raise ConfigError(f"unknown stage {name!r} (known: {', '.join(REGISTRY)})")
    return REGISTRY[name]


def stage_sampled_as(prediction: str) -> type[Stage]:
    """The fine-tuning stage whose model has this parameterisation ("x0" or "edm")."""
    for stage in REGISTRY.values():
        if stage.sampling is not None and stage.sampling.prediction == prediction:
            return stage
    raise ValueError(f"no stage predicts {prediction!r}")


def build_stage(cfg: Config, device: torch.device, ops: Ops) -> Stage:
    """The stage of `cfg`, its networks computing through `ops` (the run's, from the config)."""
    return stage_named(cfg.stage)(cfg, device, ops)


def load_config(path: str | Path | None, overrides: Sequence[str] = (), stage: str | None = None) -> Config:
    """Defaults <- YAML preset <- dotted overrides, then the stage's defaults and checks, then
    the checks every stage shares; raises ConfigError (one line)."""
    return resolve_config(read_config(path, overrides, stage))


def resolve_config(cfg: Config) -> Config:
    """A config as read (or built in code) made ready to run: the stage's defaults and
    checks, then the checks every stage shares."""
    stage_named(cfg.stage).configure(cfg)
    check_config(cfg)
    return cfg

"""The AdamW implementation behind `optim.impl`: one update rule (decoupled weight decay), three
kernels to run it.

- `torch`: torch.optim.AdamW, `fused=True` on CUDA (one kernel for all parameters), `foreach`
  elsewhere (multi-tensor ops; CPU has no faster path worth a special case);
- `deepspeed`: DeepSpeed's FusedAdam (adam_w_mode), JIT-built on first use (CUDA with nvcc, CPU
  with a C++ compiler; both need ninja);
- `apex`: NVIDIA apex's FusedAdam, when importable (it ships in NGC containers; this project
  never installs it), CUDA only.

An impl that cannot run raises a one-line ConfigError; none falls back to another.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from epg_fast.config import ConfigError

log = logging.getLogger("epg_fast")

OPTIMIZER_IMPLS = ("torch", "deepspeed", "apex")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def adamw(
    param_groups: Iterable[dict] | Iterable[torch.nn.Parameter],
    impl: str,
    lr: float,
    betas: tuple[float, float],
    device: torch.device,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over `param_groups` (each group's own weight_decay wins over `weight_decay`) with
    the kernel named by `impl`, for parameters living on `device`."""
    groups = list(param_groups)
    betas = (float(betas[0]), float(betas[1]))
    cuda = device.type == "cuda"
    if impl == "torch":
        # fused/foreach change the kernel, not the update: both match the for-loop AdamW.
        kernel = {"fused": True} if cuda else {"foreach": True}
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kernel)
        log.info("optimiser: torch.optim.AdamW (%s)", "fused" if cuda else "foreach")
        return optimizer
    if impl == "deepspeed":
        try:
            from deepspeed.ops.adam import FusedAdam
        except ImportError as err:
            raise ConfigError(f"optim.impl=deepspeed: deepspeed.ops.adam does not import: {_first_line(err)}") from None
        try:  # the op is JIT-built here, on first construction
            optimizer = FusedAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
        except Exception as err:
            raise ConfigError(
                f"optim.impl=deepspeed: DeepSpeed's FusedAdam op could not be built or loaded "
                f"(needs ninja and {'nvcc' if cuda else 'a C++ compiler'}): {_first_line(err)}"
            ) from None
        log.info("optimiser: deepspeed.ops.adam.FusedAdam (adam_w_mode, %s op)", device.type)
        return optimizer
    if impl == "apex":
        if not cuda:
            raise ConfigError(f"optim.impl=apex needs CUDA (apex's FusedAdam is a CUDA kernel); device is {device}")
        try:
            from apex.optimizers import FusedAdam
        except ImportError as err:
            raise ConfigError(
                f"optim.impl=apex: apex is not importable ({_first_line(err)}); it ships in NVIDIA's NGC "
                f"containers, else use optim.impl=torch"
            ) from None
        optimizer = FusedAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
        log.info("optimiser: apex.optimizers.FusedAdam (adam_w_mode)")
        return optimizer
    raise ConfigError(f"optim.impl must be one of {', '.join(OPTIMIZER_IMPLS)}, got {impl!r}")

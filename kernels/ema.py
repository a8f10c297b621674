"""Multi-tensor EMA: target = rate * target + (1 - rate) * online, for every tensor pair.

The reference is PyTorch's multi-tensor `_foreach_lerp_` (a few launches for the whole
model); the fused kernel replaces it when present.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def ema_reference(targets: list[Tensor], onlines: list[Tensor], rate: float) -> None:
    if not targets:
        return
    # lerp(t, o, w) = t + w (o - t) = (1 - w) t + w o, with w = 1 - rate.
    online = [o.to(t.dtype) for t, o in zip(targets, onlines)]
    torch._foreach_lerp_(targets, online, 1.0 - rate)

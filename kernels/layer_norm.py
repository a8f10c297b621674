"""LayerNorm with optional AdaLN modulation: y = LN(x) * (1 + scale) + shift.

x: [B, T, D]; weight, bias: [D] or None; shift, scale: [B, D] (broadcast over tokens) or
None, in which case this is the encoder's plain LayerNorm. Statistics are computed in fp32
whatever the input dtype (spec section 2), and the output has the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_norm_reference(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), x.shape[-1:], w, b, eps)
    if scale is not None:
        y = y * (1 + scale.float().unsqueeze(1))
    if shift is not None:
        y = y + shift.float().unsqueeze(1)
    return y.to(x.dtype)

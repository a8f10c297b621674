"""Patch embedding: patchify + linear (+ bias), optionally with the per-sample
preconditioning scale `c_in` on the input and the position embedding added to the output.

x: [B, C, H, W]; weight: [D, C, p, p] (the layout of a Conv2d with kernel = stride = p, so
checkpoints of the reference load as they are); bias: [D]; c_in: [B] or None;
pos: [1, L, D] or None. Returns [B, L, D] with patches in row-major order.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def patch_embed_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    c_in: Tensor | None = None,
    pos: Tensor | None = None,
) -> Tensor:
    if c_in is not None:
        x = x * c_in.view(-1, 1, 1, 1).to(x.dtype)
    y = F.conv2d(x, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    return y if pos is None else y + pos

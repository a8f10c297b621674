"""Noise levels, preconditioning, time embedding and the discretisation curriculum
(EPG_SPEC sections 1 and 3). Pure functions of tensors and numbers: no devices, no I/O.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
SIGMA_DATA = 0.5


def resolution_shift(image_size: int) -> float:
    """Noise shift s = R / 64 ("simple diffusion"): every sigma fed to the data is s * sigma."""
    return image_size / 64.0


def karras_sigmas(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """N unshifted Karras levels, index 0 = sigma_max (noisiest) ... N-1 = sigma_min."""
    if n < 2:
        raise ValueError(f"a Karras grid needs at least 2 levels, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return ((hi + i / (n - 1) * (lo - hi)) ** RHO).to(dtype)


def karras_sigma(i: int, n: int) -> float:
    """Level i of `karras_sigmas(n)` as a Python float, computed on the host (a training step
    reads its levels without touching a device tensor)."""
    if n < 2 or not 0 <= i < n:
        raise ValueError(f"level {i} of a {n}-level Karras grid")
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return (hi + i / (n - 1) * (lo - hi)) ** RHO


def c_in(t: Tensor) -> Tensor:
    """Input scale for a noisy input at shifted level t."""
    return 1.0 / torch.sqrt(t**2 + SIGMA_DATA**2)


def c_skip(t: Tensor, t_min: float) -> Tensor:
    return SIGMA_DATA**2 / ((t - t_min) ** 2 + SIGMA_DATA**2)


def c_out(t: Tensor, t_min: float) -> Tensor:
    return (t - t_min) * SIGMA_DATA / torch.sqrt(t**2 + SIGMA_DATA**2)


def c_noise(t: Tensor) -> Tensor:
    """Scalar time condition 250 * ln(t); the 1e-44 keeps t = 0 finite."""
    return 250.0 * torch.log(t + 1e-44)


def time_embedding(cond: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of a [B] condition into [B, dim]: cos half first, then sin,
    frequencies exp(-ln(10000) * k / (dim/2)), computed in fp32."""
    half = dim // 2
    k = torch.arange(half, device=cond.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * k / half)
    args = cond.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def curriculum_steps(k: int, total_steps: int, s0: int = 20, s1: int = 1280) -> int:
    """N(k): number of levels at training step k of K (spec section 3; note the ceils:
    N is s0 + 1 only at k = 0, then doubles every K' steps up to s1 + 1)."""
    k_prime = math.ceil(total_steps / math.log2(math.ceil(s1 / s0) + 1))
    return min(s0 * 2 ** math.ceil(k / k_prime), s1) + 1

"""The EPG pre-training objective (EPG_SPEC section 3): a symmetric contrastive term against
the EMA target at the cleanest level, plus representation consistency between adjacent
points of one PF-ODE trajectory, both as InfoNCE with negatives gathered from all ranks.

Free of DeepSpeed, devices and I/O: the trainer hands in the networks, the views, the level
index and the shared noise, and gets back the loss and its metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from epg_fast import schedule


def gather_rows_own_first(v: Tensor) -> Tensor:
    """All ranks' rows of v, this rank's first (so positives sit on the diagonal), no grad."""
    v = v.detach()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return v
    parts = [torch.empty_like(v) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, v.contiguous())
    rank = dist.get_rank()
    return torch.cat([parts[rank]] + parts[:rank] + parts[rank + 1 :])


def nce(u: Tensor, v: Tensor, tau: float) -> Tensor:
    """Per-sample InfoNCE, [B]: logsumexp_j(u_i.v_j / tau) - u_i.v_i / tau on L2-normalised
    rows, in fp32; v gathered from every rank, without gradient."""
    u = F.normalize(u.float(), dim=-1)
    v = gather_rows_own_first(F.normalize(v.float(), dim=-1))
    logits = (u @ v.T) / tau
    positives = logits.diagonal()[: u.shape[0]]
    return torch.logsumexp(logits, dim=1) - positives


@dataclass
class Levels:
    """The three shifted levels of one step: t_n, t_{n+1} (one step cleaner), t0 (cleanest)."""

    t_n: float
    t_next: float
    t0: float


def levels(n: int, num_levels: int, image_size: int) -> Levels:
    """Host floats from the grid's formula: no device tensor is read in a step."""
    s = schedule.resolution_shift(image_size)
    t = lambda i: schedule.karras_sigma(i, num_levels) * s
    return Levels(t(n), t(n + 1), t(num_levels - 1))


def pretrain_loss(
    online: nn.Module,
    target: nn.Module,
    x: Tensor,
    y1: Tensor,
    y2: Tensor,
    noise: Tensor,
    lv: Levels,
    tau_contrastive: float = 0.2,
    tau_consistency: float = 0.1,
    consistency_target: str = "no_grad",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss = mean over the batch of Lc + Lrc, with one shared noise tensor for all inputs.

    online(x_t, t, views, projected, project_rest) -> (z, h) as PretrainEncoder.forward. The
    online pass stacks [a1, a2, b] (and b' when consistency_target="detach", which is what the
    reference pays: a graph built and then thrown away); the target pass stacks [a2, a1].
    The online projector runs on a1, a2, b, b' in this order, as the reference's four calls,
    so its BatchNorm running statistics take four updates per step; only z(a1) and z(a2)
    enter the loss (b and b' are projected without gradient).
    """
    B = x.shape[0]
    a1, a2 = y1 + lv.t0 * noise, y2 + lv.t0 * noise
    b, b_next = x + lv.t_n * noise, x + lv.t_next * noise

    def levels_for(*ts: float) -> Tensor:  # filled on the device from host floats: no upload
        return torch.cat([x.new_full((B,), t, dtype=torch.float32) for t in ts])

    if consistency_target == "detach":
        z, h = online(torch.cat([a1, a2, b, b_next]), levels_for(lv.t0, lv.t0, lv.t_n, lv.t_next), 4, 2, True)
        h_b, h_next = h[2 * B : 3 * B], h[3 * B :].detach()
    elif consistency_target == "no_grad":
        z, h = online(torch.cat([a1, a2, b]), levels_for(lv.t0, lv.t0, lv.t_n), 3, 2, True)
        h_b = h[2 * B :]
        with torch.no_grad():
            _, h_next = online(b_next, levels_for(lv.t_next), 1, 0, True)
    else:
        raise ValueError(f"consistency_target must be 'no_grad' or 'detach', got {consistency_target!r}")
    with torch.no_grad():
        z_target, _ = target(torch.cat([a2, a1]), levels_for(lv.t0, lv.t0), 2, 2)
    z1, z2 = z[:B], z[B:]
    contrastive = nce(z1, z_target[:B], tau_contrastive) + nce(z2, z_target[B:], tau_contrastive)
    consistency = nce(h_b, h_next, tau_consistency)
    loss = (contrastive + consistency).mean()
    metrics = {"contrastive": contrastive.mean().detach(), "consistency": consistency.mean().detach()}
    return loss, metrics

"""The `denoise` fine-tuning objective (EPG_SPEC section 4): the pre-trained encoder plus a
fresh decoder trained as an x0-predicting diffusion model.

Per sample: draw sigma log-normally, snap it to the nearest level sigma_i of the unshifted
Karras grid, add noise at the shifted level t = s * sigma_i, and regress the clean image
with weight w_i = 1 / (sigma_i - sigma_{i+1}).

Free of DeepSpeed, devices and I/O, like `pretrain.py`. Every random number comes from the
`generator` argument (a torch.Generator on the data's device), drawn in a fixed, documented
order, so that a step is a function of the generator's seed. The small helpers (label
dropout, log-normal draws, noise) are shared with `consistency.py`.

Reference facts followed here (AMAP-ML/EPG, rcm/rcm_denoiser.py, `DenoiseTuneStep`,
`find_nearest`, `get_weightings`, `get_sigmas`):
- "nearest" is nearest in sigma (argmin of |sigma - sigma_j|, ties to the lower index);
- the weight of the last level extrapolates the Karras formula to index N (see
  `grid_weights`);
- the squared error is averaged over pixels (`F.mse_loss(reduction="none")`, weighted, then
  `.mean()` over everything), so per sample it is w_i * mean over pixels of (D - x)^2.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from epg_fast import schedule
from epg_fast.models.epg import denoise

# Unshifted sigma bounds of the bins reported in the metrics: the reference's CFG interval
# (0.19, 1.61], so the three bins are "detail", "guided" and "layout" levels.
SIGMA_BINS = (0.19, 1.61)


# ---------------------------------------------------------------------------------------
# Randomness shared by both fine-tuning objectives


def drop_labels(y: Tensor, p: float, num_classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Classifier-free-guidance label dropout: each label independently becomes the "no class"
    label `num_classes` with probability p. Returns (labels, dropped mask).

    Draws one uniform per sample even when p = 0, so that the draws after it do not shift
    with the dropout rate.
    """
    dropped = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(dropped, torch.full_like(y, num_classes), y), dropped


def lognormal(batch: int, p_mean: float, p_std: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """EDM's log-normal noise proposal: ln sigma ~ N(p_mean, p_std^2), [batch] in float64
    (the draw itself is float32, as the reference's; float64 keeps the small differences
    between nearby levels exact)."""
    z = torch.randn(batch, generator=generator, device=device)
    return torch.exp(p_mean + p_std * z.double())


def gaussian_like(x: Tensor, generator: torch.Generator) -> Tensor:
    """One standard Gaussian noise image per sample (drawn in float32, cast to x's dtype)."""
    return torch.randn(x.shape, generator=generator, device=x.device).to(x.dtype)


def per_sample(v: Tensor) -> Tensor:
    """[B] view of a per-sample scale, broadcastable against [B, C, H, W] images."""
    return v.view(-1, *([1] * 3))


# ---------------------------------------------------------------------------------------
# The 1280-level grid


@functools.lru_cache(maxsize=8)
def grid_weights(levels: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(sigma_i, w_i) for i = 0..levels-1 on the unshifted Karras grid, float64.

    w_i = 1 / (sigma_i - sigma_{i+1}): the inverse spacing to the next cleaner level. The last
    level has no next one; as the reference, sigma_{levels} comes from the Karras formula at
    index `levels`, i.e. one more step of the same size in sigma^(1/rho) below sigma_min
    (about 0.00195 for 1280 levels), so w_{levels-1} is finite and continues the trend of
    its neighbours instead of jumping to 0 or infinity.
    """
    sigmas = schedule.karras_sigmas(levels)
    root = sigmas ** (1 / schedule.RHO)  # the grid is evenly spaced in sigma^(1/rho)
    beyond = (2 * root[-1] - root[-2]) ** schedule.RHO
    following = torch.cat([sigmas[1:], beyond[None]])
    return sigmas.to(device), (1.0 / (sigmas - following)).to(device)


def snap_to_grid(sigma: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """(index i, sigma_i, w_i) of the grid level nearest to each unshifted sigma [B].

    Nearest in sigma, as the reference's `find_nearest`: draws above sigma_max go to i = 0,
    below sigma_min to i = levels-1. (The reference then clamps i to the grid; an argmin over
    the grid is already inside it.)
    """
    grid, weights = grid_weights(levels, sigma.device)
    index = (sigma.double()[:, None] - grid[None]).abs().argmin(dim=1)
    return index, grid[index], weights[index]


# ---------------------------------------------------------------------------------------
# The objective


def denoise_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    image_size: int,
    generator: torch.Generator,
    num_classes: int,
    p_mean: float = -1.2,
    p_std: float = 2.0,
    levels: int = 1280,
    label_dropout: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss = mean over the batch of w_i * mean_pixels (D(x_t) - x)^2, x0-prediction.

    model(x_t, t, y) -> F [B, 3, R, R] (EPG.forward, or a wrapper of it); F is the denoised
    image. x: clean images [B, 3, R, R]; y: class labels [B] in 0..num_classes-1.

    Draws from `generator`, in this order: one uniform per sample (label dropout), one
    normal per sample (ln sigma), one normal noise image per sample (e). The network sees
    x_t = x + t * e at the shifted level t = s * sigma_i, s = image_size / 64.

    Metrics: loss; sigma (mean unshifted sigma_i); weight (mean w_i); dropped (share of "no
    class" labels); loss_low / loss_mid / loss_high: the loss's parts from samples with
    sigma_i <= 0.19, in (0.19, 1.61], > 1.61 (they sum to loss, so they average correctly
    over steps and ranks even when a bin is empty in one batch).
    """
    B = x.shape[0]
    y, dropped = drop_labels(y, label_dropout, num_classes, generator)
    _, sigma, weight = snap_to_grid(lognormal(B, p_mean, p_std, generator, x.device), levels)
    e = gaussian_like(x, generator)

    s = schedule.resolution_shift(image_size)
    t = (s * sigma).float()
    x_t = x + per_sample(t).to(x.dtype) * e
    d = denoise(model, x_t, t, y, t_min=s * schedule.SIGMA_MIN, prediction="x0")

    # Mean over pixels as the reference (its .mean() runs over batch and pixels at once).
    per_image = weight.float() * (d.float() - x.float()).square().flatten(1).mean(dim=1)
    loss = per_image.mean()

    low, high = SIGMA_BINS
    bins = {"loss_low": sigma <= low, "loss_mid": (sigma > low) & (sigma <= high), "loss_high": sigma > high}
    metrics = {
        "loss": loss.detach(),
        "sigma": sigma.mean().float(),
        "weight": weight.mean().float(),
        "dropped": dropped.float().mean(),
    }
    metrics |= {name: (per_image.detach() * mask).sum() / B for name, mask in bins.items()}
    return loss, metrics

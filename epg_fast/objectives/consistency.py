"""The `consistency` fine-tuning objective (EPG_SPEC section 4): easy consistency tuning
(ECT) of the EPG model into a one-step generator.

Per sample a pair of levels r < t on one noise direction e: the online prediction
D(x + t e) is pulled towards the stop-gradient prediction D-(x + r e) of the same weights,
with a pseudo-Huber distance weighted by 1 / (t - r). As training advances through ECT
rounds r moves towards t, so the pair tightens from denoising to a consistency condition.

Units. The pair is drawn and related in UNSHIFTED sigma, as the reference's sampler
(`LogNormalSamplerECT` in AMAP-ML/EPG rcm/resample.py): t ~ log-normal clamped at sigma_min,
r = t * (1 - q^-round * (1 + k * sigmoid(-b * t))) clamped at sigma_min, the sigmoid seeing
unshifted t. Both are then multiplied by s = image_size / 64 (`ConsisTuneStep`), and
everything after that uses the SHIFTED levels: the noise added (x + t e, x + r e), the EDM
preconditioning with t_min = s * sigma_min, and the weight 1 / (t - r).

Round 0 ("before the first round"): q^-0 = 1 makes the ratio negative, so r = sigma_min,
and the target is the clean image x itself rather than D-(x + t_min e) (= x + t_min e by the
boundary condition): a denoising warm-up, weight 1 / (t - t_min). No target pass runs and
the perceptual term is off, as the reference (`ect_sample_stage == 0`). With the reference's
released config (round offset `delta` = 1) round 0 never happens; `round_offset` reproduces it.
(We say "ECT round" for what ECT calls its stage, to keep "stage" for the training stage.)

Pseudo-Huber: d2 = sum over pixels of (D - D-)^2 and loss d2 / sg(sqrt(d2 + c^2)) with c NOT
scaled by the dimension (reference `pseudo_huber_c`, used as is). A sample whose t equals r
(t clamped at sigma_min) gets weight 0, as the reference's `get_weightings`.

The target D- is the current weights with stop-gradient: the same model under no_grad (the
reference runs a copy synced to the online weights every step, i.e. the same values), the
same labels after dropout and the same noise e. As the reference, the device RNG state is
restored before the target pass, so with model dropout (`model.dropout`; the reference's
consistency script sets 0.5) both passes draw the same masks.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from epg_fast import schedule
from epg_fast.models.epg import denoise
from epg_fast.objectives.denoise import drop_labels, gaussian_like, lognormal, per_sample
from epg_fast.objectives.pretrain import nce

Perceptual = tuple[Callable[[Tensor], Tensor], float]


def ect_round(step: int, round_steps: int, round_offset: int = 0) -> int:
    """ECT round at optimiser step `step` (0-based): `round_offset` (the reference's `delta`)
    up to and including step `round_steps` (ECT's d), then one more every d steps:
    offset + step // d for step > d. This is the reference's rule for its d = (d0, d1) with
    d0 = d1; note step d itself still belongs to the first round."""
    return round_offset + (step // round_steps if step > round_steps else 0)


def ect_r(t: Tensor, ect_round: int, q: float = 4.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's partner level r < t for unshifted t: r = t * (1 - q^-round * (1 + k sigmoid(-b t))),
    clamped at sigma_min. Large t (sigmoid -> 0) gets a relative gap of q^-round, small t up to
    (1 + k / 2) times more; each round shrinks the gap by q."""
    ratio = 1 - q ** (-ect_round) * (1 + k * torch.sigmoid(-b * t))
    return (t * ratio).clamp_min(schedule.SIGMA_MIN)


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def consistency_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    step: int,
    image_size: int,
    generator: torch.Generator,
    num_classes: int,
    round_steps: int,
    round_offset: int = 0,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    q: float = 4.0,
    k: float = 8.0,
    b: float = 1.0,
    huber_c: float = 0.08,
    label_dropout: float = 0.1,
    perceptual: Perceptual | None = None,
    perceptual_tau: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss = mean over the batch of d2 / sg(sqrt(d2 + c^2)) / (t - r) [+ perceptual term].

    model(x_t, t, y) -> F (EPG.forward or a wrapper); D = c_skip x_t + c_out F (EDM).
    x: clean images [B, 3, R, R]; y: labels [B] in 0..num_classes-1; step: the optimiser
    step (same on every rank), which sets the ECT round.

    Draws from `generator`, in this order: one uniform per sample (label dropout), one
    normal per sample (ln t), one normal noise image per sample (e).

    perceptual = (f, weight): f maps images [B, 3, R, R] to features [B, F] (the frozen
    pre-training network's projector output at t_min with BatchNorm running statistics,
    PretrainEncoder.perceptual_features(img, full(t_min)) in eval mode). Adds
    weight * NCE(f(D(x_t)), sg(f(x)); tau) per sample, unweighted by 1/(t - r), from round 1
    on, as the reference (which uses weight 1 and tau 0.1). NCE gathers across ranks.

    Metrics: loss, ect_round, t (mean shifted t), t_minus_r (mean shifted t - r), d2 (mean),
    weight (mean 1/(t - r)), dropped (share of "no class" labels), and perceptual (mean NCE,
    0 at round 0) when the term is given.
    """
    B = x.shape[0]
    ect_round_now = ect_round(step, round_steps, round_offset)
    y, dropped = drop_labels(y, label_dropout, num_classes, generator)
    t_unshifted = lognormal(B, p_mean, p_std, generator, x.device).clamp_min(schedule.SIGMA_MIN)
    r_unshifted = ect_r(t_unshifted, ect_round_now, q, k, b)
    e = gaussian_like(x, generator)

    s = schedule.resolution_shift(image_size)
    t_min = s * schedule.SIGMA_MIN
    t, r = s * t_unshifted, s * r_unshifted  # float64: late rounds make t - r tiny
    weight = torch.where(t > r, 1.0 / (t - r), torch.zeros_like(t)).float()

    t32, r32 = t.float(), r.float()
    rng = _rng_state(x.device)  # dropout, if the model had any, repeats in the target pass
    d_online = denoise(model, x + per_sample(t32).to(x.dtype) * e, t32, y, t_min, prediction="edm")
    if ect_round_now == 0:
        target = x  # the denoising warm-up: the clean image is the target
    else:
        _set_rng_state(rng, x.device)
        with torch.no_grad():
            target = denoise(model, x + per_sample(r32).to(x.dtype) * e, r32, y, t_min, prediction="edm")

    d2 = (d_online.float() - target.float()).square().flatten(1).sum(dim=1)
    # Gradient of the pseudo-Huber metric sqrt(d2 + c^2) - c, up to a factor 2.
    per_image = weight * d2 / torch.sqrt(d2.detach() + huber_c**2)

    metrics = {
        "ect_round": float(ect_round_now),  # a host number: the same on every rank
        "t": t.mean().float(),
        "t_minus_r": (t - r).mean().float(),
        "d2": d2.detach().mean(),
        "weight": weight.mean(),
        "dropped": dropped.float().mean(),
    }
    if perceptual is not None:
        metrics["perceptual"] = torch.zeros((), device=x.device)
        if ect_round_now > 0:
            features, perceptual_weight = perceptual
            with torch.no_grad():
                clean = features(x)
            term = nce(features(d_online), clean, perceptual_tau)
            per_image = per_image + perceptual_weight * term
            metrics["perceptual"] = term.detach().mean()

    loss = per_image.mean()
    metrics["loss"] = loss.detach()
    return loss, metrics

"""The fine-tuning objectives (spec section 4): grid snapping and weights against numpy, the
`denoise` and `consistency` losses against the formulas recomputed here from the same
generator draws (the network is called here, all other arithmetic is numpy), label dropout,
the ECT round schedule, the stop-gradient target and the optional perceptual term."""

import math

import numpy as np
import pytest
import torch

from epg_fast.models.epg import EPG
from epg_fast.objectives.consistency import consistency_loss, ect_r, ect_round
from epg_fast.objectives.denoise import denoise_loss, drop_labels, grid_weights, snap_to_grid

SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5
NUM_CLASSES, R, B = 10, 16, 6
SHIFT = R / 64


# ---------------------------------------------------------------------------------------
# Independent numpy versions of the formulas


def karras_np(i, n):
    """Karras level at (possibly out-of-grid) index i of an n-level grid."""
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return (hi + np.asarray(i, dtype=np.float64) / (n - 1) * (lo - hi)) ** RHO


def snap_np(sigma, n):
    grid = karras_np(np.arange(n), n)
    idx = np.abs(np.asarray(sigma, dtype=np.float64)[:, None] - grid[None]).argmin(axis=1)
    return idx, grid[idx], 1.0 / (grid[idx] - karras_np(idx + 1, n))


def edm_np(x_t, F, t):
    """D = c_skip x_t + c_out F with t_min = s * sigma_min (numpy, float64)."""
    t_min = SHIFT * SIGMA_MIN
    t = t[:, None, None, None]
    c_skip = SIGMA_DATA**2 / ((t - t_min) ** 2 + SIGMA_DATA**2)
    c_out = (t - t_min) * SIGMA_DATA / np.sqrt(t**2 + SIGMA_DATA**2)
    return c_skip * x_t + c_out * F


def ect_r_np(t, ect_round, q, k, b):
    return np.maximum(t * (1 - q ** (-float(ect_round)) * (1 + k / (1 + np.exp(b * t)))), SIGMA_MIN)


def nce_np(u, v, tau):
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    logits = u @ v.T / tau
    m = logits.max(axis=1, keepdims=True)
    return (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))) - np.diag(logits)


def redraw(seed, batch, shape):
    """The objectives' documented draw order: uniform [B] (dropout), normal [B] (ln sigma or
    ln t), normal images (noise)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, generator=g)
    z = torch.randn(batch, generator=g)
    e = torch.randn(shape, generator=g)
    return u.numpy(), z.double().numpy(), e


# ---------------------------------------------------------------------------------------
# A tiny model whose every path carries signal, and a wrapper that records its calls


def tiny_model() -> EPG:
    torch.manual_seed(0)
    model = EPG(image_size=R, patch_size=4, dim=32, depth=2, heads=2, decoder_dim=48, decoder_heads=2,
                num_classes=NUM_CLASSES)
    with torch.no_grad():  # the zero-initialised layers would make F = 0 and most grads 0
        for block in model.decoder_blocks:
            block.adaLN_modulation[1].weight.normal_(std=0.1)
            block.adaLN_modulation[1].bias.normal_(std=0.1)
        model.out.weight.normal_(std=0.1)
        model.out.bias.normal_(std=0.1)
    return model


class Recorder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x_t, t, y):
        self.calls.append((x_t.detach().clone(), t.detach().clone(), y.clone(), torch.is_grad_enabled()))
        return self.model(x_t, t, y)


def data(seed=3):
    torch.manual_seed(seed)
    return torch.randn(B, 3, R, R) * 0.5, torch.randint(0, NUM_CLASSES, (B,))


# ---------------------------------------------------------------------------------------
# Grid snapping


def test_snap_matches_numpy():
    n = 1280
    rng = np.random.default_rng(0)
    grid = karras_np(np.arange(n), n)
    sigma = np.concatenate([
        np.exp(-1.2 + 2.0 * rng.normal(size=500)),
        [1e-6, SIGMA_MIN, 0.0021, 1.0, SIGMA_MAX, 500.0],
        grid[[0, 1, 640, n - 2, n - 1]],
    ])
    idx, level, weight = snap_to_grid(torch.tensor(sigma), n)
    idx_np, level_np, weight_np = snap_np(sigma, n)
    np.testing.assert_array_equal(idx.numpy(), idx_np)
    np.testing.assert_allclose(level.numpy(), level_np, rtol=1e-12)
    np.testing.assert_allclose(weight.numpy(), weight_np, rtol=1e-9)
    assert idx[-5:].tolist() == [0, 1, 640, n - 2, n - 1]  # grid points snap to themselves
    assert idx_np[500] == n - 1 and idx_np[505] == 0  # below / above the grid: clamped ends


def test_last_level_weight_extrapolates_the_grid():
    for n in (21, 1280):
        sigmas, weights = grid_weights(n)
        beyond = karras_np(n, n)  # Karras formula one index past sigma_min
        assert 0 < beyond < SIGMA_MIN
        assert math.isfinite(weights[-1]) and weights[-1] > 0
        assert weights[-1].item() == pytest.approx(1 / (SIGMA_MIN - beyond), rel=1e-9)
        # continues the trend of its neighbours (weights grow towards clean levels)
        assert weights[-3] < weights[-2] < weights[-1]
        if n == 1280:
            assert weights[-1] / weights[-2] < 1.02
        np.testing.assert_allclose(sigmas.numpy(), karras_np(np.arange(n), n), rtol=1e-12)


# ---------------------------------------------------------------------------------------
# denoise


def test_denoise_loss_matches_formula():
    model, (x, y) = Recorder(tiny_model()), data()
    p_mean, p_std, p_drop, n = -1.2, 2.0, 0.5, 1280
    loss, metrics = denoise_loss(
        model, x, y, image_size=R, generator=torch.Generator().manual_seed(7), num_classes=NUM_CLASSES,
        p_mean=p_mean, p_std=p_std, levels=n, label_dropout=p_drop,
    )
    u, z, e = redraw(7, B, x.shape)
    drop = u < p_drop
    y_used = np.where(drop, NUM_CLASSES, y.numpy())
    _, level, w = snap_np(np.exp(p_mean + p_std * z), n)
    t = SHIFT * level
    x_t = x.double().numpy() + t[:, None, None, None] * e.double().numpy()

    (x_seen, t_seen, y_seen, _), = model.calls
    np.testing.assert_array_equal(y_seen.numpy(), y_used)
    np.testing.assert_allclose(t_seen.numpy(), t, rtol=1e-6)
    np.testing.assert_allclose(x_seen.numpy(), x_t, rtol=1e-5, atol=1e-5)

    assert 0 < drop.sum() < B  # this seed drops some labels and keeps others
    with torch.no_grad():
        as32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        F = model.model(as32(x_t), as32(t), torch.tensor(y_used)).double().numpy()
    expected = np.mean(w * ((F - x.double().numpy()) ** 2).reshape(B, -1).mean(axis=1))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["sigma"].item() == pytest.approx(level.mean(), rel=1e-6)
    assert metrics["weight"].item() == pytest.approx(w.mean(), rel=1e-6)
    assert metrics["dropped"].item() == pytest.approx(drop.mean())
    parts = metrics["loss_low"] + metrics["loss_mid"] + metrics["loss_high"]
    assert parts.item() == pytest.approx(loss.item(), rel=1e-5)


def test_denoise_loss_gradients_reach_the_model():
    model, (x, y) = tiny_model(), data()
    loss, _ = denoise_loss(model, x, y, image_size=R, generator=torch.Generator().manual_seed(0),
                           num_classes=NUM_CLASSES)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    for p in (model.patch_embed.proj.weight, model.blocks[0].attn.qkv.weight, model.decoder_blocks[0].mlp.fc1.weight,
              model.out.weight, model.class_embed.weight):
        assert p.grad.abs().sum() > 0


def test_label_dropout_rate_and_label():
    n, p = 40_000, 0.1
    y = torch.randint(0, NUM_CLASSES, (n,))
    out, dropped = drop_labels(y, p, NUM_CLASSES, torch.Generator().manual_seed(0))
    share = dropped.float().mean().item()
    assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert (out[dropped] == NUM_CLASSES).all() and torch.equal(out[~dropped], y[~dropped])
    # the draw count does not depend on the rate, so later draws do not shift with it
    g0, g1 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert not drop_labels(y[:50], 0.0, NUM_CLASSES, g0)[1].any()
    assert drop_labels(y[:50], 1.0, NUM_CLASSES, g1)[1].all()
    assert torch.equal(torch.randn(3, generator=g0), torch.randn(3, generator=g1))


# ---------------------------------------------------------------------------------------
# consistency


def test_ect_round_schedule_and_pairs():
    # The reference's rule with d0 = d1 = d: delta while step <= d, then (step - (d0 - d1)) // d1 + delta.
    assert [ect_round(s, 100) for s in (0, 99, 100, 101, 199, 200, 250, 1000)] == [0, 0, 0, 1, 1, 2, 2, 10]
    assert ect_round(100, 100, round_offset=1) == 1 and ect_round(101, 100, round_offset=1) == 2
    t = torch.exp(torch.linspace(math.log(SIGMA_MIN), math.log(SIGMA_MAX), 200, dtype=torch.float64))
    q, k, b = 4.0, 8.0, 1.0
    assert torch.all(ect_r(t, 0, q, k, b) == SIGMA_MIN)  # round 0: every partner is sigma_min
    gaps = []
    for rnd in range(1, 8):
        r = ect_r(t, rnd, q, k, b)
        np.testing.assert_allclose(r.numpy(), ect_r_np(t.numpy(), rnd, q, k, b), rtol=1e-12)
        assert torch.all(r >= SIGMA_MIN) and torch.all(r[1:] < t[1:])  # t[0] = sigma_min = r
        gaps.append(((t - r) / t)[t > 1].max().item())
    assert all(a > c for a, c in zip(gaps, gaps[1:])) and gaps[-1] < 1e-3  # r -> t


def consistency_expected(model, x, y, *, seed, step, d, p_mean, p_std, q, k, b, c, p_drop):
    """(loss, per-sample pieces) recomputed from the redrawn randomness; the model is only
    called for F, everything else is numpy."""
    rnd = step // d if step > d else 0
    u, z, e = redraw(seed, B, x.shape)
    y_used = torch.tensor(np.where(u < p_drop, NUM_CLASSES, y.numpy()))
    t_u = np.maximum(np.exp(p_mean + p_std * z), SIGMA_MIN)
    r_u = ect_r_np(t_u, rnd, q, k, b)
    t, r = SHIFT * t_u, SHIFT * r_u
    xn, en = x.double().numpy(), e.double().numpy()
    x_t, x_r = xn + t[:, None, None, None] * en, xn + r[:, None, None, None] * en

    def D(x_in, level):
        with torch.no_grad():
            F = model(torch.tensor(x_in, dtype=torch.float32), torch.tensor(level, dtype=torch.float32), y_used)
        return edm_np(x_in, F.double().numpy(), level)

    target = xn if rnd == 0 else D(x_r, r)
    d2 = ((D(x_t, t) - target) ** 2).reshape(B, -1).sum(axis=1)
    w = np.where(t > r, 1 / np.where(t > r, t - r, 1), 0)
    return np.mean(w * d2 / np.sqrt(d2 + c**2)), dict(t=t, r=r, w=w, d2=d2, D_t=D(x_t, t), y=y_used)


ECT = dict(p_mean=-1.1, p_std=2.0, q=4.0, k=8.0, b=1.0)


@pytest.mark.parametrize("step", [250, 30])  # ECT round 2, and round 0 (the warm-up)
def test_consistency_loss_matches_formula(step):
    model, (x, y) = Recorder(tiny_model()), data()
    loss, metrics = consistency_loss(
        model, x, y, step=step, image_size=R, generator=torch.Generator().manual_seed(11), num_classes=NUM_CLASSES,
        round_steps=100, huber_c=0.08, label_dropout=0.5, **ECT,
    )
    expected, parts = consistency_expected(model.model, x, y, seed=11, step=step, d=100, c=0.08, p_drop=0.5, **ECT)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["ect_round"] == step // 100
    assert metrics["t"].item() == pytest.approx(parts["t"].mean(), rel=1e-6)
    assert metrics["t_minus_r"].item() == pytest.approx((parts["t"] - parts["r"]).mean(), rel=1e-6)
    assert metrics["d2"].item() == pytest.approx(parts["d2"].mean(), rel=1e-5)
    # the online pass sees t with grad; the target pass (round > 0 only) sees r without
    assert 0 < (parts["y"] == NUM_CLASSES).sum() < B
    online, *target = model.calls
    np.testing.assert_allclose(online[1].numpy(), parts["t"], rtol=1e-6)
    assert torch.equal(online[2], parts["y"]) and online[3]
    if step // 100 == 0:
        assert target == []  # the clean image is the target: no second pass
        np.testing.assert_allclose(parts["r"], SHIFT * SIGMA_MIN)
        np.testing.assert_allclose(parts["w"], 1 / (parts["t"] - SHIFT * SIGMA_MIN), rtol=1e-9)
    else:
        (_, r_seen, y_seen, grad_enabled), = target
        np.testing.assert_allclose(r_seen.numpy(), parts["r"], rtol=1e-6)
        assert torch.equal(y_seen, parts["y"]) and not grad_enabled
        assert np.all(parts["r"] < parts["t"]) and np.all(parts["r"] >= SHIFT * SIGMA_MIN)


def test_consistency_equal_levels_get_zero_weight():
    model, (x, y) = tiny_model(), data()
    # every t clamps to sigma_min, so r = t: weight 0, a finite zero loss
    loss, metrics = consistency_loss(model, x, y, step=500, image_size=R, generator=torch.Generator().manual_seed(0),
                                     num_classes=NUM_CLASSES, round_steps=100, p_mean=-30.0, p_std=0.1)
    assert metrics["weight"].item() == 0 and loss.item() == 0
    assert metrics["t"].item() == pytest.approx(SHIFT * SIGMA_MIN) and metrics["t_minus_r"].item() == 0


def test_consistency_target_pass_repeats_the_online_randomness():
    """A model with dropout-like randomness draws the same mask in the target pass (the
    reference restores the RNG state), and the target pass runs without grad."""

    class Dropout(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.masks = model, []

        def forward(self, x_t, t, y):
            mask = (torch.rand(x_t.shape) < 0.5).float()
            self.masks.append(mask)
            return self.model(x_t, t, y) * mask

    model, (x, y) = Dropout(tiny_model()), data()
    torch.manual_seed(123)
    consistency_loss(model, x, y, step=150, image_size=R, generator=torch.Generator().manual_seed(0),
                     num_classes=NUM_CLASSES, round_steps=100)
    online, target = model.masks
    assert torch.equal(online, target) and 0.3 < online.mean() < 0.7


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_consistency_gradient_skips_the_target_branch():
    model, (x, y) = tiny_model(), data()
    kw = dict(step=150, image_size=R, num_classes=NUM_CLASSES, round_steps=100, huber_c=0.08, label_dropout=0.1)
    loss, _ = consistency_loss(model, x, y, generator=torch.Generator().manual_seed(5), **kw)
    got = grads(model, loss)

    # The same loss built here from the same draws, in three variants.
    u, z, e = redraw(5, B, x.shape)
    y_used = torch.where(torch.tensor(u) < 0.1, NUM_CLASSES, y)
    t_u = np.maximum(np.exp(-1.1 + 2.0 * z), SIGMA_MIN)
    t = torch.tensor(SHIFT * t_u, dtype=torch.float32)
    r = torch.tensor(SHIFT * ect_r_np(t_u, 1, 4.0, 8.0, 1.0), dtype=torch.float32)
    w = 1 / (t.double() - r.double())

    def D(level):
        x_in = x + level[:, None, None, None] * e
        lt = level[:, None, None, None].double()
        t_min = SHIFT * SIGMA_MIN
        c_skip = SIGMA_DATA**2 / ((lt - t_min) ** 2 + SIGMA_DATA**2)
        c_out = (lt - t_min) * SIGMA_DATA / torch.sqrt(lt**2 + SIGMA_DATA**2)
        return c_skip * x_in.double() + c_out * model(x_in, level, y_used).double()

    def variant(target_grad, stop_denominator):
        target = D(r) if target_grad else D(r).detach()
        d2 = (D(t) - target).square().flatten(1).sum(1)
        denominator = torch.sqrt((d2.detach() if stop_denominator else d2) + 0.08**2)
        return grads(model, (w * d2 / denominator).mean())

    want = variant(target_grad=False, stop_denominator=True)
    assert (want.float() - got).norm() < 1e-4 * got.norm()  # float32 vs float64 arithmetic
    # the check can fail: letting the target or the denominator carry gradient changes it
    for wrong in (variant(target_grad=True, stop_denominator=True), variant(target_grad=False, stop_denominator=False)):
        assert (wrong.float() - got).norm() > 1e-2 * got.norm()


def test_consistency_perceptual_term():
    model, (x, y) = tiny_model(), data()
    torch.manual_seed(4)
    projection = torch.randn(3 * R * R, 8, dtype=torch.float64)
    grad_modes = []

    def features(img):
        grad_modes.append(torch.is_grad_enabled())
        return img.flatten(1).double() @ projection

    kw = dict(image_size=R, num_classes=NUM_CLASSES, round_steps=100, huber_c=0.08, label_dropout=0.1)

    def run(step, perceptual):
        generator = torch.Generator().manual_seed(9)
        return consistency_loss(model, x, y, step=step, generator=generator, perceptual=perceptual, **kw)

    base, base_metrics = run(120, None)
    assert "perceptual" not in base_metrics
    with_term, metrics = run(120, (features, 0.5))
    assert sorted(grad_modes) == [False, True]  # the clean image's features without grad
    _, parts = consistency_expected(model, x, y, seed=9, step=120, d=100, c=0.08, p_drop=0.1, **ECT)
    term = nce_np(features(torch.tensor(parts["D_t"])).numpy(), features(x).numpy(), 0.1)
    assert with_term.item() - base.item() == pytest.approx(0.5 * term.mean(), rel=1e-4)
    assert metrics["perceptual"].item() == pytest.approx(term.mean(), rel=1e-4)
    assert run(120, (features, 0.0))[0].item() == pytest.approx(base.item(), rel=1e-7)
    # off during the round-0 warm-up, as the reference
    assert run(30, (features, 0.5))[0].item() == pytest.approx(run(30, None)[0].item(), rel=1e-7)


def test_perceptual_feature_is_the_projector_output_with_running_statistics():
    """The consistency stage's perceptual feature (stages.perceptual_features) is the
    pre-training network's projector output z at t = s sigma_min, its BatchNorm layers in eval
    mode with the checkpoint's running statistics (the reference's forward_features), written
    out here from BatchNorm's definition."""
    from epg_fast.stages import load_config
    from epg_fast.models.encoder import PretrainEncoder
    from epg_fast.ops import Ops
    from epg_fast.stages.finetune import perceptual_features

    cfg = load_config("configs/consistency/demo.yaml", ["consistency.perceptual_weight=1.0"])
    m = cfg.model
    torch.manual_seed(5)
    net = PretrainEncoder(proj_hidden=64, proj_dim=16, image_size=m.image_size, patch_size=m.patch_size,
                          dim=m.dim, depth=m.depth, heads=m.heads)
    with torch.no_grad():  # a checkpoint's non-trivial statistics and affine parameters
        for i in (1, 4):
            bn = net.projection_head[i]
            bn.running_mean.normal_(std=0.5), bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_(1.0, 0.2), bn.bias.normal_(std=0.2)
    features = perceptual_features(cfg, net.state_dict(), torch.device("cpu"), Ops())
    images = torch.randn(5, 3, m.image_size, m.image_size)
    got = features(images)

    t0 = m.image_size / 64 * SIGMA_MIN
    ph = {k: v.double() for k, v in net.projection_head.state_dict().items() if v.is_floating_point()}

    def bn_eval(u, i):
        return (u - ph[f"{i}.running_mean"]) / torch.sqrt(ph[f"{i}.running_var"] + 1e-5) * ph[f"{i}.weight"] + ph[f"{i}.bias"]

    with torch.no_grad():
        h = net.features(images, torch.full((5,), t0)).double()
    u = torch.relu(bn_eval(h @ ph["0.weight"].T, 1))
    u = torch.relu(bn_eval(u @ ph["3.weight"].T, 4))
    want = u @ ph["6.weight"].T
    assert got.shape == (5, 16)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)

"""Noise grid, preconditioning, time embedding and curriculum against the spec's formulas,
re-derived here with numpy / plain Python."""

import math

import numpy as np
import pytest
import torch

from epg_fast import schedule


def test_karras_grid_matches_formula():
    n = 13
    got = schedule.karras_sigmas(n).numpy()
    want = np.array([(80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(n)])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] == pytest.approx(80.0) and got[-1] == pytest.approx(0.002)
    assert np.all(np.diff(got) < 0)  # noisiest first


def test_resolution_shift():
    assert schedule.resolution_shift(256) == 4.0
    assert schedule.resolution_shift(512) == 8.0


def test_preconditioning_boundaries_and_values():
    t_min = 4 * 0.002
    t = torch.tensor([t_min, 1.3, 50.0], dtype=torch.float64)
    np.testing.assert_allclose(schedule.c_in(t).numpy(), 1 / np.sqrt(t.numpy() ** 2 + 0.25))
    skip, out = schedule.c_skip(t, t_min).numpy(), schedule.c_out(t, t_min).numpy()
    assert skip[0] == pytest.approx(1.0) and out[0] == pytest.approx(0.0)  # identity at t_min
    tt = t.numpy()
    np.testing.assert_allclose(skip, 0.25 / ((tt - t_min) ** 2 + 0.25))
    np.testing.assert_allclose(out, (tt - t_min) * 0.5 / np.sqrt(tt**2 + 0.25))
    np.testing.assert_allclose(schedule.c_noise(t).numpy(), 250 * np.log(tt))


def test_time_embedding_cos_first():
    cond = torch.tensor([0.0, -3.5, 812.25])
    dim = 10
    got = schedule.time_embedding(cond, dim).numpy()
    for b, c in enumerate(cond.tolist()):
        for k in range(dim // 2):
            f = math.exp(-math.log(10000) * k / (dim // 2))
            assert got[b, k] == pytest.approx(math.cos(c * f), abs=1e-4)
            assert got[b, k + dim // 2] == pytest.approx(math.sin(c * f), abs=1e-4)


def test_curriculum_paper_schedule():
    K = 600_000
    k_prime = math.ceil(K / math.log2(65))  # ceil(1280/20) = 64
    assert schedule.curriculum_steps(0, K) == 21  # only at k = 0
    assert schedule.curriculum_steps(1, K) == 41
    assert schedule.curriculum_steps(k_prime, K) == 41
    assert schedule.curriculum_steps(k_prime + 1, K) == 81
    assert schedule.curriculum_steps(5 * k_prime + 1, K) == 1281  # 20 * 2^6 = 1280 is reached ...
    assert schedule.curriculum_steps(K - 1, K) == 1281  # ... and held
    values = [schedule.curriculum_steps(k, K) for k in range(0, K, 997)]
    assert values == sorted(values)
    assert set(values) == {21, 41, 81, 161, 321, 641, 1281}


def test_host_karras_levels_equal_the_grid_in_float32():
    """karras_sigma (host floats, what a training step uses) against karras_sigmas (a
    tensor): equal to the last float64 bit or so, identical once in float32 (the model's)."""
    for n in (2, 21, 41, 1281):
        grid = schedule.karras_sigmas(n)
        host = torch.tensor([schedule.karras_sigma(i, n) for i in range(n)], dtype=torch.float64)
        torch.testing.assert_close(host, grid, rtol=1e-15, atol=0)
        assert torch.equal(host.float(), grid.float())
    with pytest.raises(ValueError):
        schedule.karras_sigma(5, 5)

"""Sampling: levels, NFE accounting (the paper's 75), interval guidance, Heun's last step,
clamping, determinism and rank-split invariance, the command line and its refusals.

NFE counts depend only on the levels, so they run on a stub network that records its calls
(at 256 px, in milliseconds); images come from a tiny EPG with randomised weights.
"""

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from epg_fast import sample, schedule
from epg_fast.data import normalize
from epg_fast.distributed import free_port
from epg_fast.models.epg import EPG, Preset
from epg_fast.stages import REGISTRY
from epg_fast.sample import (
    Churn,
    SampleError,
    choose_labels,
    clamp_bounds,
    generate,
    heun,
    load_generator,
    main,
    sampling_levels,
    shard,
    to_uint8,
    write_sample_grid,
)

TINY = dict(image_size=16, patch_size=4, dim=32, depth=2, heads=2, decoder_dim=48, decoder_heads=2,
            num_classes=10, mlp_ratio=4.0, cls_tokens=1)


class Stub(torch.nn.Module):
    """F = `cond` for a class label, `uncond` for the "no class" label; records every call
    as (batch size, t, labels)."""

    def __init__(self, image_size: int = 256, num_classes: int = 1000, cond: float = 0.3, uncond: float = 0.1):
        super().__init__()
        self.image_size, self.num_classes, self.cond, self.uncond = image_size, num_classes, cond, uncond
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # generate() reads the device from it
        self.calls = []

    def forward(self, x, t, y):
        assert torch.all(t == t[0])
        self.calls.append((x.shape[0], float(t[0]), y.tolist()))
        value = torch.where(y == self.num_classes, self.uncond, self.cond).to(x.dtype)
        return value.view(-1, 1, 1, 1).expand_as(x)


def tiny_epg(seed: int = 0) -> EPG:
    """The decoder's output layer is zero-initialised: randomise everything so images vary."""
    torch.manual_seed(seed)
    model = EPG(**TINY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def guided_levels(steps: int, lo: float = 0.19, hi: float = 1.61) -> int:
    return sum(1 for sigma in schedule.karras_sigmas(steps).tolist() if lo < sigma <= hi)


# ---------------------------------------------------------------------------------------
# Levels and NFE


def test_levels_are_the_shifted_karras_grid_then_zero():
    for size, s in ((256, 4.0), (512, 8.0), (16, 0.25)):
        levels = sampling_levels(32, size)
        assert len(levels) == 33 and levels[-1] == 0.0
        assert levels[0] == pytest.approx(s * 80)
        assert levels[-2] == pytest.approx(s * 0.002)
        assert all(a > b for a, b in zip(levels, levels[1:]))


def test_guided_levels_at_32_by_hand():
    # Karras grid, 32 levels: ... 2.1739, 1.6086 | 1.1743, 0.8446, 0.5977, 0.4154, 0.2830 | 0.1886 ...
    sigmas = schedule.karras_sigmas(32).tolist()
    inside = [round(v, 4) for v in sigmas if 0.19 < v <= 1.61]
    assert inside == [1.6086, 1.1743, 0.8446, 0.5977, 0.4154, 0.283]


@pytest.mark.parametrize(
    "sampler, guidance, expected",
    [
        ("euler", 1.0, 32), ("euler", 2.5, 32 + 6),  # one evaluation per level; 6 levels guided
        ("heun", 1.0, 63), ("heun", 2.5, 63 + 12),  # 31 Heun steps + the Euler step to 0
        ("onestep", 1.0, 1), ("onestep", 2.5, 1),  # s * 80 is outside the interval
    ],
)
def test_nfe_by_hand_at_256(sampler, guidance, expected):
    stub = Stub()
    _, nfe = generate(stub, torch.tensor([3]), sampler=sampler, steps=32, guidance=guidance, prediction="x0")
    assert nfe == expected
    assert sum(2 if batch == 2 else 1 for batch, _, _ in stub.calls) == expected


def test_heun_32_levels_with_the_interval_is_the_papers_75_nfe():
    stub = Stub()
    _, nfe = generate(stub, torch.tensor([207]), sampler="heun", steps=32, guidance=2.5, interval=(0.19, 1.61))
    assert nfe == 75
    guided = sorted({round(t / 4, 4) for batch, t, _ in stub.calls if batch == 2})
    assert guided == [0.283, 0.4154, 0.5977, 0.8446, 1.1743, 1.6086]


@pytest.mark.parametrize("steps", [8, 18, 32, 50, 64])
def test_nfe_formula(steps):
    # The interval is in unshifted sigma: the count does not depend on the resolution.
    k = guided_levels(steps)
    for sampler, plain in (("euler", steps), ("heun", 2 * steps - 1)):
        per_level = 1 if sampler == "euler" else 2  # no guided level is the first or the last one
        _, nfe = generate(Stub(image_size=16), torch.tensor([1]), sampler=sampler, steps=steps, guidance=2.0)
        assert nfe == plain + per_level * k


def test_nfe_is_per_image_whatever_the_batch():
    _, nfe = generate(Stub(), torch.arange(5), sampler="heun", steps=32, guidance=2.5, batch_size=2)
    assert nfe == 75


def test_edm_churn_moves_levels_and_nfe_counts_where_it_evaluates():
    stub = Stub()
    _, nfe = generate(stub, torch.tensor([1]), sampler="edm", steps=32, guidance=2.5, churn=Churn(40, 0.05, 50, 1.003))
    assert nfe == sum(2 if batch == 2 else 1 for batch, _, _ in stub.calls)
    gamma = min(40 / 32, 2**0.5 - 1)
    levels = sampling_levels(32, 256)
    first_levels = [t for _, t, _ in stub.calls[::2]][: len(levels) - 1]  # each step's first evaluation
    for t, called in zip(levels, first_levels):
        assert called == pytest.approx(t * (1 + gamma) if 0.05 <= t <= 50 else t)
    # Without churn the edm sampler is heun.
    a, _ = generate(tiny_epg(), torch.arange(2), sampler="edm", steps=4, churn=Churn(0, 0, 0, 1))
    b, _ = generate(tiny_epg(), torch.arange(2), sampler="heun", steps=4)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Guidance, Heun's last step, clamping


def test_guidance_combines_cond_and_uncond_inside_the_interval():
    # onestep evaluates at s * 80 once: inside (0, inf], outside the default interval.
    stub = Stub(cond=0.3, uncond=0.1)
    x, nfe = generate(stub, torch.tensor([4, 5]), sampler="onestep", guidance=2.0, interval=(0.0, float("inf")))
    assert nfe == 2 and torch.allclose(x, torch.full_like(x, 0.1 + 2.0 * (0.3 - 0.1)))
    assert stub.calls == [(4, 320.0, [4, 5, 1000, 1000])]  # one forward: conditional half, then "no class"
    x, nfe = generate(Stub(cond=0.3, uncond=0.1), torch.tensor([4]), sampler="onestep", guidance=2.0)
    assert nfe == 1 and torch.allclose(x, torch.full_like(x, 0.3))


def test_interval_is_lower_exclusive_upper_inclusive_in_unshifted_sigma():
    sigmas = schedule.karras_sigmas(8).tolist()
    stub = Stub(image_size=16, num_classes=10)  # s = 1/4: shifting is exact
    generate(stub, torch.tensor([1]), sampler="euler", steps=8, guidance=3.0, interval=(sigmas[5], sigmas[2]))
    assert [batch for batch, _, _ in stub.calls] == [1, 1, 2, 2, 2, 1, 1, 1]
    assert [t for _, t, _ in stub.calls] == pytest.approx([0.25 * v for v in sigmas])


def test_guidance_one_is_conditional_only():
    stub = Stub()
    generate(stub, torch.tensor([1]), sampler="heun", steps=8, guidance=1.0, interval=(0.0, float("inf")))
    assert all(batch == 1 for batch, _, _ in stub.calls)


def test_heun_last_step_is_an_euler_step_to_zero():
    stub = Stub(image_size=16, num_classes=10, cond=0.3)
    x, nfe = generate(stub, torch.tensor([1]), sampler="heun", steps=4)
    t = sampling_levels(4, 16)
    assert [c[1] for c in stub.calls] == pytest.approx([t[0], t[1], t[1], t[2], t[2], t[3], t[3]])
    assert nfe == 7 and 0.0 not in [c[1] for c in stub.calls]
    # D is constant: the Euler step from t[3] to 0 lands on D exactly (up to rounding).
    assert torch.allclose(x, torch.full_like(x, 0.3), atol=1e-5)


def test_denoised_predictions_are_clamped():
    x, _ = generate(Stub(cond=5.0), torch.tensor([1]), sampler="onestep")
    assert torch.equal(x, torch.ones_like(x))
    x, _ = generate(Stub(image_size=16, num_classes=10, cond=-7.0), torch.tensor([1]), sampler="heun", steps=4)
    assert torch.allclose(x, -torch.ones_like(x), atol=1e-5)
    # "data": the normalised range of real pixels, per channel.
    lo, hi = clamp_bounds("data", "imagenet")
    x, _ = generate(Stub(cond=5.0), torch.tensor([1]), sampler="onestep", clamp=(lo, hi))
    assert torch.equal(x[0], hi.expand(3, 256, 256))
    assert torch.equal(to_uint8(x, "imagenet"), torch.full((1, 256, 256, 3), 255, dtype=torch.uint8))
    assert clamp_bounds("data", "simple")[0].flatten().tolist() == [-1.0, -1.0, -1.0]


def test_edm_prediction_uses_the_skip_connection():
    # F = 0: D = c_skip(t) x_t; at t = s * sigma_max, c_skip is tiny but not 0.
    stub = Stub(image_size=16, num_classes=10, cond=0.0)
    x, _ = generate(stub, torch.tensor([1]), sampler="onestep", prediction="edm", seed=3)
    t = torch.tensor([0.25 * 80.0])
    x_t = t * sample.ImageNoise(3, [0], (3, 16, 16), torch.device("cpu"))()
    assert torch.allclose(x, (schedule.c_skip(t, 0.25 * 0.002) * x_t).clamp(-1, 1))


# ---------------------------------------------------------------------------------------
# Determinism and rank splits


def test_same_seed_same_images_other_seed_other_images():
    model, labels = tiny_epg(), torch.arange(4)
    a, _ = generate(model, labels, steps=4, guidance=2.0, interval=(0, float("inf")), seed=1, batch_size=2)
    b, _ = generate(model, labels, steps=4, guidance=2.0, interval=(0, float("inf")), seed=1, batch_size=2)
    c, _ = generate(model, labels, steps=4, guidance=2.0, interval=(0, float("inf")), seed=2, batch_size=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.std() > 0.01 and not torch.allclose(a[0], a[1])


def test_shards_are_whole_batches_covering_every_image_once():
    for num, batch, world in ((10, 3, 2), (16, 16, 2), (50, 4, 8), (7, 2, 3), (64, 8, 8)):
        parts = [shard(num, batch, r, world) for r in range(world)]
        assert [i for part in parts for i in part] == list(range(num))
        assert all(part.start % batch == 0 for part in parts)
        assert len(parts[0]) > 0  # rank 0 reports the NFE and writes the grid


@pytest.mark.parametrize("sampler", ["heun", "edm"])
def test_rank_split_gives_the_same_images(sampler):
    model, labels = tiny_epg(), choose_labels("random", 10, 10, seed=0)
    common = dict(sampler=sampler, steps=4, guidance=1.5, interval=(0.0, float("inf")), seed=7, batch_size=3)
    whole, _ = generate(model, labels, **common)
    for world in (2, 3):
        parts = [shard(10, 3, r, world) for r in range(world)]
        split = [generate(model, labels[p.start : p.stop], first_index=p.start, **common)[0] for p in parts if len(p)]
        assert torch.equal(torch.cat(split), whole)


def test_to_uint8_inverts_normalize():
    u8 = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16)
    for mode in ("imagenet", "simple"):
        back = to_uint8(normalize(u8, mode), mode)
        assert back.shape == (1, 16, 16, 3) and torch.equal(back, u8.permute(0, 2, 3, 1))


def test_labels():
    assert torch.equal(choose_labels("random", 8, 10, seed=1), choose_labels("random", 8, 10, seed=1))
    assert choose_labels("balanced", 5, 3, seed=0).tolist() == [0, 1, 2, 0, 1]
    assert choose_labels("207,3", 5, 1000, seed=0).tolist() == [207, 3, 207, 3, 207]
    with pytest.raises(SampleError, match="class 11 is outside 0..10"):
        choose_labels("1,11", 4, 10, seed=0)


# ---------------------------------------------------------------------------------------
# Loading and the command line


def write_checkpoint(run_dir: Path, stage: str = "denoise", step: int = 10, complete: bool = True,
                     model_args: dict = TINY) -> Path:
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    online, ema = tiny_epg(0).state_dict(), tiny_epg(1).state_dict()
    config = {"stage": stage, "model": {"preset": "custom", **model_args}, "data": {"normalization": "imagenet"}}
    torch.save({"module": online, "ema": ema, "config": config, "step": step}, folder / "mp_rank_00_model_states.pt")
    if complete:
        (folder / "COMPLETE").write_text(f'{{"step": {step}}}')
    return folder


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_end_to_end(tmp_path, capsys):
    folder = write_checkpoint(tmp_path / "run")
    rc, out, err = run_cli(capsys, folder, "--out", tmp_path / "out", "--num", 5, "--batch-size", 2, "--steps", 4,
                           "--guidance", 2.0, "--interval", "0,inf", "--device", "cpu", "--seed", 3)
    assert rc == 0, err
    with np.load(tmp_path / "out" / "samples_5x16x16x3.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == choose_labels("random", 5, 10, seed=3).tolist()
    assert Image.open(tmp_path / "out" / "grid.png").size == (3 * 16, 2 * 16)
    assert "NFE per image: 14" in out and "images/s" in out  # heun, 4 levels, every level guided: 7 x 2
    assert "4 levels, paper grid (then 0)" in out
    rc, out, err = run_cli(capsys, folder, "--out", tmp_path / "ref", "--num", 1, "--steps", 4, "--guidance", 2.0,
                           "--interval", "0,inf", "--device", "cpu", "--grid", "reference")
    assert rc == 0, err  # 3 Heun steps, every level guided: 6 x 2, and the grid it used
    assert "NFE per image: 12" in out and "4 levels, reference grid (ending at s*sigma_min = 0.0005)" in out

    # The same images as generate() with the EMA weights, and other ones from the online weights.
    model, info = load_generator(folder)
    described = (info.stage, info.prediction, info.weights, info.step, info.normalization)
    assert described == ("denoise", "x0", "ema", 10, "imagenet")
    expected, _ = generate(model, torch.from_numpy(labels), steps=4, guidance=2.0, interval=(0, float("inf")),
                           seed=3, batch_size=2)
    assert np.array_equal(to_uint8(expected, "imagenet").numpy(), images)
    rc, _, _ = run_cli(capsys, tmp_path / "run", "--out", tmp_path / "online", "--num", 5, "--batch-size", 2,
                       "--steps", 4, "--guidance", 2.0, "--interval", "0,inf", "--seed", 3, "--weights", "online")
    with np.load(tmp_path / "online" / "samples_5x16x16x3.npz") as f:
        assert rc == 0 and not np.array_equal(f["arr_0"], images)


def test_run_folder_means_its_newest_completed_checkpoint(tmp_path):
    write_checkpoint(tmp_path, step=10)
    write_checkpoint(tmp_path, step=20, stage="consistency")
    write_checkpoint(tmp_path, step=30, complete=False)
    _, info = load_generator(tmp_path)
    assert (info.step, info.stage, info.prediction) == (20, "consistency", "edm")


def test_state_dict_file_with_a_preset(tmp_path, monkeypatch):
    tiny = Preset(TINY["depth"], TINY["dim"], TINY["heads"], TINY["decoder_dim"], TINY["decoder_heads"], 0)
    monkeypatch.setitem(sample.EPG_PRESETS, "EPG-tiny", tiny)
    torch.save(tiny_epg(1).state_dict(), tmp_path / "epg.pth")
    model, info = load_generator(tmp_path / "epg.pth", preset="EPG-tiny", image_size=16, patch_size=4, num_classes=10,
                                 prediction="edm", normalization="simple")
    described = (info.stage, info.prediction, info.normalization, info.weights)
    assert described == ("consistency", "edm", "simple", "state dict")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_epg(1).state_dict().values()))


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (lambda d: write_checkpoint(d, stage="pretrain"), [], "is a 'pretrain' checkpoint"),
        (lambda d: write_checkpoint(d, complete=False), [], "no COMPLETE marker"),
        (lambda d: d / "nothing_here.pth", [], "does not exist"),
        (lambda d: write_checkpoint(d, model_args={**TINY, "decoder_dim": 64}), [],
         "'encoder_to_decoder.weight': checkpoint [48, 32], the model of step_00000010's config expects [64, 32]"),
        (lambda d: write_checkpoint(d), ["--preset", "EPG-XL"], "are for a state-dict file"),
        (lambda d: torch.save(tiny_epg().state_dict(), d / "x.pth") or d / "x.pth",
         ["--preset", "EPG-XL", "--image-size", 256, "--patch-size", 16, "--prediction", "x0",
          "--normalization", "imagenet"],
         "'cls_token': checkpoint [1, 1, 32], EPG-XL at 256 px, patch 16, 1000 classes expects [1, 1, 768]"),
        (lambda d: torch.save(tiny_epg().state_dict(), d / "x.pth") or d / "x.pth", ["--preset", "EPG-XL"],
         "a state-dict file needs --image-size, --patch-size, --prediction, --normalization"),
        (lambda d: write_checkpoint(d), ["--labels", "1,x"], "--labels must be random, balanced or comma-separated"),
    ],
)
def test_refusals_are_one_line_with_exit_2(tmp_path, capsys, make, extra, message):
    target = make(tmp_path)
    rc, out, err = run_cli(capsys, target, "--out", tmp_path / "out", "--steps", 2, "--num", 1, *extra)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_trainer_sample_grid(tmp_path):
    """The trainer's grids: the auto sampler follows the stage."""
    finetune = SimpleNamespace(sample_count=6, sample_sampler="auto", sample_steps=4, sample_guidance=1.0)
    for stage, expected_nfe in (("denoise", 7), ("consistency", 1)):
        cfg = SimpleNamespace(finetune=finetune, model=SimpleNamespace(num_classes=10),
                              data=SimpleNamespace(normalization="simple"), train=SimpleNamespace(seed=0))
        model = tiny_epg().train()
        out = tmp_path / stage / "step_00000100.png"
        assert write_sample_grid(model, out, cfg, REGISTRY[stage].sampling) == expected_nfe
        assert Image.open(out).size == (3 * 16, 2 * 16) and model.training  # mode restored


def test_two_ranks_write_the_same_file_as_one(tmp_path, capsys):
    """Two gloo processes (as torchrun would start them): parts, barrier, merge in order."""
    folder = write_checkpoint(tmp_path / "run")
    args = ["--num", 7, "--batch-size", 2, "--steps", 2, "--sampler", "edm", "--guidance", 2.0, "--interval", "0,inf",
            "--labels", "balanced", "--device", "cpu"]
    assert run_cli(capsys, folder, "--out", tmp_path / "one", *args)[0] == 0
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "epg_fast.sample", str(folder), "--out", str(tmp_path / "two"), *map(str, args)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert "NFE per image" in results[0][0] and results[1][0] == ""
    assert sorted(os.listdir(tmp_path / "two")) == ["grid.png", "samples_7x16x16x3.npz"]  # parts removed
    name = "samples_7x16x16x3.npz"
    with np.load(tmp_path / "one" / name) as a, np.load(tmp_path / "two" / name) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / "grid.png")),
                          np.asarray(Image.open(tmp_path / "two" / "grid.png")))


# ---------------------------------------------------------------------------------------
# The reference implementation's grid (issue 10, item 9)


def test_reference_grid_ends_at_shifted_sigma_min_without_zero():
    rho, lo, hi = 7.0, 0.002 ** (1 / 7), 80 ** (1 / 7)
    want = [4 * (hi + i / 31 * (lo - hi)) ** rho for i in range(32)]
    got = sampling_levels(32, 256, "reference")
    assert got == pytest.approx(want, rel=1e-12) and got[-1] == pytest.approx(4 * 0.002)
    assert sampling_levels(32, 256, "paper") == pytest.approx(want + [0.0], rel=1e-12)


def test_reference_grid_heun_is_the_references_74_nfe():
    """31 Heun steps (the last one too: it ends at s sigma_min, not 0) = 62, plus the 6 guided
    levels, each evaluated twice by Heun: 74, the reference's count."""
    stub = Stub()
    _, nfe = generate(stub, torch.tensor([207]), sampler="heun", steps=32, guidance=2.5, grid="reference")
    assert nfe == 74 and sum(2 if batch == 2 else 1 for batch, _, _ in stub.calls) == 74
    assert min(t for _, t, _ in stub.calls) == pytest.approx(4 * 0.002)


def _analytic(x, t):
    """A smooth stand-in denoiser (the exact D of data N(0, 0.25 I))."""
    return x * 0.25 / (0.25 + t * t)


def _reference_edm(x, sigmas, churn, noises):
    """Karras Algorithm 2 as the reference's stochastic sampler runs it, written out: gamma =
    min(S_churn / len(sigmas), sqrt 2 - 1) inside [S_min, S_max], Heun except on the last step."""
    n = len(sigmas)
    for i in range(n - 1):
        t, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(churn.amount / n, math.sqrt(2) - 1) if churn.t_min <= t <= churn.t_max else 0.0
        t_hat = t + gamma * t
        x_hat = x + math.sqrt(t_hat**2 - t**2) * churn.noise * noises[i]
        d = (x_hat - _analytic(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if i < n - 2:
            d2 = (x - _analytic(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
    return x


def test_reference_grid_edm_sampler_matches_algorithm_2_with_a_last_euler_step():
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    churn = Churn(10.0, 0.05, 50.0, 1.003)  # gamma 10/8 capped at sqrt 2 - 1 on [0.05, 50]
    levels = sampling_levels(8, 256, "reference")
    noises = [torch.randn_like(x0) for _ in range(len(levels))]
    # our sampler draws only where it churns; hand it the reference's per-step draws in order
    churned = [i for i, t in enumerate(levels[:-1]) if churn.t_min <= t <= churn.t_max]
    draws = iter([noises[i] for i in churned])
    got = heun(_analytic, x0 * levels[0], levels, churn, lambda: next(draws))
    want = _reference_edm(x0 * levels[0], levels, churn, noises)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the deterministic Heun sampler on the reference grid corrects every step, the last too
    plain = heun(_analytic, x0 * levels[0], levels)
    assert not torch.allclose(plain, _reference_edm(x0 * levels[0], levels, Churn(0, 0, 0, 1), noises))

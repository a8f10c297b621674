"""Sampling from a fine-tuned EPG model (EPG_SPEC section 6).

    python -m epg_fast.sample CKPT --out DIR [--sampler heun|euler|edm|onestep] [--steps 32]
        [--guidance 1.0] [--interval 0.19,1.61] [--labels random|balanced|3,7,...] [--num 16]
        [--batch-size 16] [--seed 0] [--weights ema|online] [--device auto|cpu|cuda]
        [--precision fp32|bf16] [--clamp reference|data] [--churn 40,0.05,50,1.003]
        [--grid paper|reference]
    a .pth state dict (e.g. a converted published checkpoint) also needs
        --preset EPG-XL --image-size 256 --patch-size 16 [--num-classes 1000]
        --prediction x0|edm --normalization imagenet|simple
    several GPUs:  torchrun --nproc_per_node 8 -m epg_fast.sample CKPT --out DIR --num 50000 ...

CKPT is a fine-tuning checkpoint folder (run_dir/checkpoints/step_XXXXXXXX), a run folder (its
newest completed checkpoint) or a plain EPG state dict. The command writes
DIR/samples_<N>x<R>x<R>x3.npz in ADM's layout (arr_0: uint8 [N, R, R, 3], arr_1: int64 labels),
the input of `python -m epg_fast.fid`, and DIR/grid.png (the first min(N, 64) images).

Levels (`--grid paper`, the default): `steps` Karras levels shifted by s = R/64, then 0;
sampling starts at x = s*sigma_max*e. `--grid reference` is the reference implementation's
grid: the same levels without the 0, so the samplers stop at s*sigma_min.
The samplers integrate the probability-flow ODE dx/dt = (x - D(x, t)) / t:
- euler: one evaluation per level;
- heun: Karras et al. (2022) Algorithm 1; the step to level 0 is a plain Euler step;
- edm: heun with the stochastic "churn" of their Algorithm 2;
- onestep: D(x_T), for consistency models.
D is clamped to [-1, 1] before use, as the reference does; with "imagenet" normalisation that
range cuts off bright blues, greens and reds (e.g. blue > 218/255), which `--clamp data`
(the normalised range of real pixels, per channel) avoids.

Classifier-free guidance acts only at levels whose UNSHIFTED sigma lies in (lo, hi] (default
(0.19, 1.61], the reference's interval): there D = D_u + w (D_c - D_u), the conditional and
unconditional ("no class" label) halves in one forward of 2B; elsewhere D = D_c. NFE counts
network evaluations per image as spent, a guided forward counting 2. At 256 px with the
default interval 6 of the 32 levels (1.61 ... 0.28) are guided, each evaluated twice by Heun:
63 + 12 = 75, the paper's "75 NFE". (The reference's grid has no final 0 and its last step
ends at s*sigma_min: 62 + 12 = 74 evaluations for the same setting; `--grid reference`.)
The edm sampler takes its last step with Euler on either grid, as the reference's.

Noise is a function of (seed, global image index) only, and ranks take contiguous runs of
whole batches, so with a given --batch-size the images do not depend on the number of ranks.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor

from epg_fast import schedule
from epg_fast.checkpoint import CheckpointError, CheckpointWriteError, check_writable, load_file, read_checkpoint
from epg_fast.config import Config
from epg_fast.data.views import IMAGENET_MEAN, IMAGENET_STD, normalize
from epg_fast.distributed import cli_device, setup_distributed, teardown_distributed
from epg_fast.models.epg import EPG, EPG_PRESETS, denoise
from epg_fast.ops import Ops
from epg_fast.stages import REGISTRY, Sampling, stage_sampled_as

SAMPLERS = ("euler", "heun", "edm", "onestep")
GRIDS = ("paper", "reference")
DEFAULT_INTERVAL = (0.19, 1.61)  # reference scripts/sample_dm_in256.sh: cfg_sigma_low, cfg_sigma_high
GRID_MAX = 64
MODEL_KEYS = ("image_size", "patch_size", "dim", "depth", "heads", "decoder_dim", "decoder_heads",
              "num_classes", "mlp_ratio", "cls_tokens")


class SampleError(ValueError):
    """A checkpoint or request the sampler refuses; the message is one line."""


class Churn(NamedTuple):
    """EDM stochastic sampling (Karras et al. 2022, Algorithm 2): at shifted levels t in
    [t_min, t_max] the noise is first raised to t_hat = t (1 + gamma) with
    gamma = min(amount / steps, sqrt(2) - 1), the added noise scaled by `noise`. The defaults
    are the reference's `edm_sde_param`, which also compares t_min/t_max with shifted levels."""

    amount: float = 40.0
    t_min: float = 0.05
    t_max: float = 50.0
    noise: float = 1.003


# ---------------------------------------------------------------------------------------
# Levels, noise and the guided denoiser


def sampling_levels(steps: int, image_size: int, grid: str = "paper") -> list[float]:
    """The sampler's shifted levels, noisiest first: s * (Karras grid of `steps` levels), then
    0 ("paper": the last step lands on the data, 75 NFE for the paper's Heun setting) or
    nothing ("reference": the reference's grid, which ends at s * sigma_min: 74 NFE)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r} (known: {', '.join(GRIDS)})")
    s = schedule.resolution_shift(image_size)
    if steps == 1:  # one step (onestep sampler): from sigma_max straight to 0
        return [s * schedule.SIGMA_MAX, 0.0]
    return [*(schedule.karras_sigmas(steps) * s).tolist(), *([0.0] if grid == "paper" else [])]


def image_seed(seed: int, index: int) -> int:
    """The 64-bit seed of global image `index`: well mixed, so nearby (seed, index) pairs do
    not share noise streams."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


class ImageNoise:
    """Standard normal noise per image: image i draws from its own CPU generator seeded with
    image_seed(seed, i), so its noise does not depend on batches, ranks or the device."""

    def __init__(self, seed: int, indices: Iterable[int], shape: tuple[int, ...], device: torch.device) -> None:
        self.generators = [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]
        self.shape, self.device = shape, device

    def __call__(self) -> Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


class Denoiser:
    """(x, t) -> D(x, t) for one batch with fixed labels: guided inside the interval, clamped.

    `nfe` counts network evaluations per image as spent: a guided call runs one forward of
    2B images (conditional and unconditional halves) and counts 2.
    """

    def __init__(self, model: EPG, labels: Tensor, guidance: float, interval: tuple[float, float],
                 image_size: int, prediction: str, clamp: tuple[Tensor | float, Tensor | float]) -> None:
        s = schedule.resolution_shift(image_size)
        self.model, self.labels, self.guidance, self.prediction = model, labels, guidance, prediction
        self.uncond = torch.full_like(labels, model.num_classes)
        # The interval is in unshifted sigma; the levels here are shifted (t = s * sigma).
        self.lo, self.hi = interval[0] * s, interval[1] * s
        self.t_min = s * schedule.SIGMA_MIN
        self.clamp = tuple(torch.as_tensor(c, dtype=torch.float32, device=labels.device) for c in clamp)
        self.nfe = 0

    def guided(self, t: float) -> bool:
        return self.guidance != 1.0 and self.lo < t <= self.hi

    def __call__(self, x: Tensor, t: float) -> Tensor:
        if self.guided(t):
            cond, uncond = self.evaluate(torch.cat([x, x]), t, torch.cat([self.labels, self.uncond])).chunk(2)
            d = uncond + self.guidance * (cond - uncond)
            self.nfe += 2
        else:
            d = self.evaluate(x, t, self.labels)
            self.nfe += 1
        return torch.clamp(d, *self.clamp)

    def evaluate(self, x: Tensor, t: float, y: Tensor) -> Tensor:
        level = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        return denoise(self.model, x, level, y, self.t_min, self.prediction).float()


# ---------------------------------------------------------------------------------------
# Samplers: (denoiser, x_T, levels) -> x_0


def euler(denoiser: Callable[[Tensor, float], Tensor], x: Tensor, levels: Sequence[float]) -> Tensor:
    for t, t_next in zip(levels, levels[1:]):
        x = x + (t_next - t) * (x - denoiser(x, t)) / t
    return x


def heun(denoiser: Callable[[Tensor, float], Tensor], x: Tensor, levels: Sequence[float],
         churn: Churn | None = None, noise: Callable[[], Tensor] | None = None) -> Tensor:
    """Karras Algorithm 1, or Algorithm 2 with `churn` (and `noise` drawing fresh noise).

    The second-order correction is skipped where it is undefined (a step to 0) and, with
    `churn`, on the last step (the reference's stochastic sampler ends with Euler; with the
    paper grid that step goes to 0 anyway). Churn's gamma divides by the number of nonzero
    levels, as the reference's."""
    steps = sum(1 for t in levels if t > 0)
    last = len(levels) - 2
    for i, (t, t_next) in enumerate(zip(levels, levels[1:])):
        if churn is not None and churn.amount > 0 and churn.t_min <= t <= churn.t_max:
            t_hat = t * (1 + min(churn.amount / steps, math.sqrt(2) - 1))
            x = x + math.sqrt(t_hat**2 - t**2) * churn.noise * noise()
            t = t_hat
        d = (x - denoiser(x, t)) / t
        x_next = x + (t_next - t) * d
        if t_next > 0 and not (churn is not None and i == last):  # the slope at 0 is undefined
            d_next = (x_next - denoiser(x_next, t_next)) / t_next
            x_next = x + (t_next - t) * (d + d_next) / 2
        x = x_next
    return x


def onestep(denoiser: Callable[[Tensor, float], Tensor], x: Tensor, levels: Sequence[float]) -> Tensor:
    return denoiser(x, levels[0])


@torch.no_grad()
def generate(
    model: EPG,
    labels: Tensor,
    *,
    sampler: str = "heun",
    steps: int = 32,
    guidance: float = 1.0,
    interval: tuple[float, float] = DEFAULT_INTERVAL,
    image_size: int | None = None,
    prediction: str = "x0",
    seed: int = 0,
    first_index: int = 0,
    batch_size: int = 16,
    churn: Churn = Churn(),
    clamp: tuple[Tensor | float, Tensor | float] = (-1.0, 1.0),
    grid: str = "paper",
) -> tuple[Tensor, int]:
    """Images for `labels` [N] (0..num_classes; num_classes = unconditional) -> (images
    [N, 3, R, R] float32 on the CPU in the data's normalised space, NFE per image).

    Image j is global image first_index + j: its noise comes from image_seed(seed, that
    index). `prediction` is "x0" (stage denoise) or "edm" (stage consistency); `clamp` the
    bounds of D (see `clamp_bounds`); `churn` is used by the "edm" sampler only; `grid` see
    `sampling_levels`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    if len(labels) == 0:
        raise ValueError("generate() needs at least one label")
    size = image_size or model.image_size
    device = next(model.parameters()).device
    levels = sampling_levels(steps, size, grid)
    was_training = model.training
    model.eval()
    images, evaluations = [], 0
    try:
        for start in range(0, len(labels), batch_size):
            y = labels[start : start + batch_size].to(device)
            first = first_index + start
            noise = ImageNoise(seed, range(first, first + len(y)), (3, size, size), device)
            denoiser = Denoiser(model, y, guidance, interval, size, prediction, clamp)
            x = levels[0] * noise()
            if sampler == "edm":
                x = heun(denoiser, x, levels, churn, noise)
            else:
                x = {"euler": euler, "heun": heun, "onestep": onestep}[sampler](denoiser, x, levels)
            images.append(x.float().cpu())
            evaluations += denoiser.nfe * len(y)
    finally:
        model.train(was_training)
    return torch.cat(images), evaluations // len(labels)


# ---------------------------------------------------------------------------------------
# Pixels


def _imagenet_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return mean, std


def to_uint8(images: Tensor, normalization: str) -> Tensor:
    """[N, 3, R, R] in the normalised space -> uint8 [N, R, R, 3] (ADM's layout): undo
    data.normalize ("imagenet": v = x * 2 std + mean; "simple": v = (x + 1) / 2), clamp, round."""
    if normalization == "imagenet":
        mean, std = _imagenet_stats(images.device)
        v = images * (2 * std) + mean
    elif normalization == "simple":
        v = (images + 1) / 2
    else:
        raise ValueError(f"unknown normalization {normalization!r}; use 'imagenet' or 'simple'")
    return (v * 255).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def clamp_bounds(mode: str, normalization: str) -> tuple[Tensor | float, Tensor | float]:
    """Bounds of D: "reference" [-1, 1]; "data" the normalised values of pixels 0 and 255,
    per channel (equal to [-1, 1] for "simple")."""
    if mode == "reference":
        return -1.0, 1.0
    if mode != "data":
        raise ValueError(f"unknown clamp mode {mode!r}; use 'reference' or 'data'")
    ends = normalize(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1), normalization)
    return ends[0], ends[1]


def save_grid(images: np.ndarray, path: Path) -> None:
    """The first min(N, 64) uint8 [N, R, R, 3] images as a near-square grid PNG."""
    images = images[:GRID_MAX]
    n, r = len(images), images.shape[1]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * r, cols * r, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, cols)
        canvas[row * r : (row + 1) * r, col * r : (col + 1) * r] = image
    Image.fromarray(canvas).save(path)


def write_npz(path: Path, chunks: Iterable[np.ndarray], labels: np.ndarray, image_size: int) -> np.ndarray:
    """ADM's sample file, as np.savez lays it out (arr_0 uint8 [N, R, R, 3], arr_1 int64 [N]),
    written chunk by chunk so that no process holds all N images; written to a temporary
    name, then renamed. Returns the first GRID_MAX images (for the grid)."""
    n, head, written = len(labels), [], 0
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (n, image_size, image_size, 3)}
            np.lib.format.write_array_header_1_0(f, header)
            for chunk in chunks:
                if chunk.shape[1:] != (image_size, image_size, 3):
                    raise ValueError(f"a chunk of shape {chunk.shape} in a file of {image_size} px images")
                f.write(np.ascontiguousarray(chunk, dtype=np.uint8).tobytes())
                if written < GRID_MAX:
                    head.append(chunk[: GRID_MAX - written])
                written += len(chunk)
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, labels.astype(np.int64))
    if written != n:
        tmp.unlink()
        raise RuntimeError(f"wrote {written} images into {path}, expected {n}")
    os.replace(tmp, path)
    return np.concatenate(head)


# ---------------------------------------------------------------------------------------
# Loading a generator


@dataclass
class GeneratorInfo:
    source: str  # the file the weights came from
    stage: str  # a fine-tuning stage (one whose Stage.sampling is set)
    prediction: str  # "x0" or "edm" (see models.epg.denoise)
    normalization: str  # "imagenet" or "simple" (see data.normalize)
    image_size: int
    num_classes: int
    weights: str  # "ema", "online" or "state dict"
    step: int | None  # training step of a checkpoint folder


def _build(model_args: Mapping[str, object], state: Mapping[str, Tensor], described: str,
           device: torch.device | str) -> EPG:
    """EPG(**model_args) holding `state`, checked key by key and shape by shape first."""
    with torch.device("meta"):
        model = EPG(**model_args, ops=Ops.from_config())  # the auto modes; EPG_KERNELS wins
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise SampleError(f"'{key}' is missing from the checkpoint ({described})")
        if tuple(state[key].shape) != tuple(value.shape):
            raise SampleError(f"'{key}': checkpoint {list(state[key].shape)}, {described} expects {list(value.shape)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise SampleError(f"'{unexpected[0]}' is not a weight of {described} ({len(unexpected)} unexpected keys)")
    model.load_state_dict(state, assign=True)  # the meta model takes the loaded tensors as they are
    return model.to(device=device, dtype=torch.float32).eval()


def _load_folder(path: Path, weights: str, device: torch.device | str) -> tuple[EPG, GeneratorInfo]:
    try:
        saved = read_checkpoint(path)
    except CheckpointError as err:
        raise SampleError(str(err)) from None
    config, stage = saved.config, saved.stage
    sampling = REGISTRY[stage].sampling if stage in REGISTRY else None
    if sampling is None:
        generators = ", ".join(name for name, s in REGISTRY.items() if s.sampling)
        raise SampleError(f"{saved.folder} is a '{stage}' checkpoint: only fine-tuned ({generators}) models sample")
    missing = [k for k in MODEL_KEYS if config["model"].get(k) is None]
    if missing:
        raise SampleError(f"{saved.file}: config.model lacks {', '.join(missing)}")
    state = {"ema": saved.shadow, "online": saved.weights}[weights]
    if not isinstance(state, Mapping):
        raise SampleError(f"{saved.file} holds no {weights} weights")
    model_args = {k: config["model"][k] for k in MODEL_KEYS}
    model = _build(model_args, state, f"the model of {saved.folder.name}'s config", device)
    normalization = config.get("data", {}).get("normalization")
    if normalization not in ("imagenet", "simple"):
        raise SampleError(f"{saved.file}: config.data.normalization is {normalization!r}, not imagenet or simple")
    info = GeneratorInfo(str(saved.file), stage, sampling.prediction, normalization,
                         model.image_size, model.num_classes, weights, saved.step)
    return model, info


def _load_state_dict_file(path: Path, device: torch.device | str, preset: str | None, image_size: int | None,
                          patch_size: int | None, num_classes: int | None, prediction: str | None,
                          normalization: str | None) -> tuple[EPG, GeneratorInfo]:
    needed = {"--preset": preset, "--image-size": image_size, "--patch-size": patch_size,
              "--prediction": prediction, "--normalization": normalization}
    absent = [flag for flag, value in needed.items() if value is None]
    if absent:
        raise SampleError(f"a state-dict file needs {', '.join(absent)} (a checkpoint folder carries its config)")
    if preset not in EPG_PRESETS:
        raise SampleError(f"unknown preset '{preset}' (known: {', '.join(EPG_PRESETS)})")
    try:
        state = load_file(path)  # weights_only: a file from elsewhere runs no code
    except CheckpointError as err:
        raise SampleError(str(err)) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        hint = ": a DeepSpeed model-states file? pass its checkpoint folder" if isinstance(state, Mapping) else ""
        raise SampleError(f"{path} is not a plain state dict{hint}")
    num_classes = 1000 if num_classes is None else num_classes
    arch = EPG_PRESETS[preset]
    model_args = dict(image_size=image_size, patch_size=patch_size, dim=arch.dim, depth=arch.depth, heads=arch.heads,
                      decoder_dim=arch.decoder_dim, decoder_heads=arch.decoder_heads, num_classes=num_classes)
    described = f"{preset} at {image_size} px, patch {patch_size}, {num_classes} classes"
    model = _build(model_args, state, described, device)
    info = GeneratorInfo(str(path), stage_sampled_as(prediction).name, prediction, normalization, image_size, num_classes, "state dict", None)
    return model, info


def load_generator(
    path: str | Path,
    *,
    weights: str = "ema",
    device: torch.device | str = "cpu",
    preset: str | None = None,
    image_size: int | None = None,
    patch_size: int | None = None,
    num_classes: int | None = None,
    prediction: str | None = None,
    normalization: str | None = None,
) -> tuple[EPG, GeneratorInfo]:
    """An EPG model in eval mode (float32, on `device`) and what it is.

    `path`: a fine-tuning checkpoint folder (or a run folder: its newest completed
    checkpoint), whose config gives the architecture, stage and normalisation, `weights`
    choosing "ema" (default) or "online"; or a plain EPG state-dict file, which needs preset,
    image_size, patch_size, prediction and normalization (num_classes defaults to 1000).
    Raises SampleError (one line) for anything it refuses.
    """
    path = Path(path)
    file_options = (preset, image_size, patch_size, num_classes, prediction, normalization)
    if path.is_dir():
        if any(v is not None for v in file_options):
            raise SampleError("--preset, --image-size, --patch-size, --num-classes, --prediction and --normalization "
                              "are for a state-dict file; a checkpoint folder carries its own config")
        return _load_folder(path, weights, device)
    if not path.is_file():
        raise SampleError(f"{path} does not exist")
    return _load_state_dict_file(path, device, *file_options)


def write_sample_grid(model: EPG, out: Path, cfg: Config, sampling: Sampling) -> int:
    """The trainer's periodic grid of `cfg.finetune.sample_count` images (labels 0, 1, 2, ...,
    the same noise, from train.seed, every time) written to `out`; returns the NFE per image."""
    f = cfg.finetune
    sampler = f.sample_sampler if f.sample_sampler != "auto" else sampling.grid_sampler
    labels = torch.arange(f.sample_count) % cfg.model.num_classes
    images, nfe = generate(model, labels, sampler=sampler, steps=f.sample_steps, guidance=f.sample_guidance,
                           prediction=sampling.prediction, seed=cfg.train.seed, batch_size=f.sample_count)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(to_uint8(images, cfg.data.normalization).numpy(), out)
    return nfe


# ---------------------------------------------------------------------------------------
# Command line


def choose_labels(spec: str, num: int, num_classes: int, seed: int) -> Tensor:
    """"random": uniform over the classes from a generator seeded by `seed`; "balanced":
    image i gets class i mod num_classes; "3,7,...": the list repeated to `num` images
    (num_classes itself is the "no class" label: unconditional samples)."""
    if spec == "random":
        return torch.randint(num_classes, (num,), generator=torch.Generator().manual_seed(seed))
    if spec == "balanced":
        return torch.arange(num) % num_classes
    try:
        given = [int(v) for v in spec.split(",")]
    except ValueError:
        raise SampleError(f"--labels must be random, balanced or comma-separated classes, got {spec!r}") from None
    bad = [v for v in given if not 0 <= v <= num_classes]
    if bad:
        raise SampleError(f"--labels: class {bad[0]} is outside 0..{num_classes} ({num_classes} = no class)")
    return torch.tensor(given).repeat(math.ceil(num / len(given)))[:num]


def shard(num: int, batch_size: int, rank: int, world: int) -> range:
    """This rank's global image indices: a contiguous run of whole batches, so that every
    image is generated in the same batch whatever the number of ranks."""
    batches = math.ceil(num / batch_size)
    per_rank, extra = divmod(batches, world)  # the first `extra` ranks take one batch more
    lo = rank * per_rank + min(rank, extra)
    hi = lo + per_rank + (rank < extra)
    return range(lo * batch_size, min(hi * batch_size, num))


def _floats(text: str, count: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def _interval_arg(text: str) -> tuple[float, float]:
    lo, hi = _floats(text, 2, "LO,HI with LO <= HI")
    if not lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO,HI with LO <= HI, got {text!r}")
    return lo, hi


def _churn_arg(text: str) -> Churn:
    return Churn(*_floats(text, 4, "S_churn,S_tmin,S_tmax,S_noise"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m epg_fast.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="checkpoint folder, run folder, or EPG state-dict file (.pth)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sampler", default="heun", choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=32, help="Karras levels before the final 0")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--interval", type=_interval_arg, default=DEFAULT_INTERVAL,
                   help="guide where unshifted sigma is in (lo, hi]; 0,inf = everywhere")
    p.add_argument("--labels", default="random", help="random, balanced, or a comma-separated list of classes")
    p.add_argument("--num", type=int, default=16, help="number of images")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward (per rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="ema", choices=("ema", "online"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast the network")
    p.add_argument("--clamp", default="reference", choices=("reference", "data"),
                   help="bounds of D: [-1, 1] (reference) or the normalised pixel range")
    p.add_argument("--churn", type=_churn_arg, default=Churn(), help="edm sampler: S_churn,S_tmin,S_tmax,S_noise")
    p.add_argument("--grid", default="paper", choices=GRIDS,
                   help="paper: Karras levels then 0 (75 NFE); reference: ending at s*sigma_min, as AMAP-ML/EPG (74)")
    g = p.add_argument_group("state-dict files")
    g.add_argument("--preset", choices=tuple(EPG_PRESETS))
    g.add_argument("--image-size", type=int)
    g.add_argument("--patch-size", type=int)
    g.add_argument("--num-classes", type=int)
    g.add_argument("--prediction", choices=("x0", "edm"))
    g.add_argument("--normalization", choices=("imagenet", "simple"))
    return p


def _part_images(parts: list[Path]) -> Iterable[np.ndarray]:
    for part in parts:
        with np.load(part) as f:
            yield f["arr_0"]


def _sample(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    if args.num < 1 or args.batch_size < 1 or args.seed < 0 or (args.steps < 2 and args.sampler != "onestep"):
        raise SampleError("--num and --batch-size must be >= 1, --seed >= 0, and --steps >= 2 (except onestep)")
    if not math.isfinite(args.guidance):
        raise SampleError(f"--guidance must be a finite number, got {args.guidance}")
    try:
        check_writable(args.out)  # before the model is loaded and the images drawn
    except CheckpointWriteError as err:
        raise SampleError(f"--out: {err}") from None
    model, info = load_generator(
        args.ckpt, weights=args.weights, device=device, preset=args.preset, image_size=args.image_size,
        patch_size=args.patch_size, num_classes=args.num_classes, prediction=args.prediction,
        normalization=args.normalization,
    )
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{info.source}: stage {info.stage} ({info.prediction} prediction), {info.weights} weights"
        f"{'' if info.step is None else f', step {info.step}'}, {info.image_size} px, {info.num_classes} classes, "
        f"{info.normalization} normalisation")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = choose_labels(args.labels, args.num, info.num_classes, args.seed)
    mine = shard(args.num, args.batch_size, rank, world)
    clamp = clamp_bounds(args.clamp, info.normalization)
    start, chunks, nfe = time.perf_counter(), [], 0
    batches = range(mine.start, mine.stop, args.batch_size)
    every = max(1, len(batches) // 20)  # about 20 progress lines
    for b, i in enumerate(batches):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            images, nfe = generate(
                model, labels[i : i + args.batch_size], sampler=args.sampler, steps=args.steps,
                guidance=args.guidance, interval=args.interval, prediction=info.prediction, seed=args.seed,
                first_index=i, batch_size=args.batch_size, churn=args.churn, clamp=clamp, grid=args.grid,
            )
        chunks.append(to_uint8(images, info.normalization).numpy())
        if (b + 1) % every == 0 or b + 1 == len(batches):
            say(f"  {i + len(images) - mine.start}/{len(mine)} images on rank 0", flush=True)
    final = out / f"samples_{args.num}x{info.image_size}x{info.image_size}x3.npz"
    if world == 1:
        head = write_npz(final, chunks, labels.numpy(), info.image_size)
    else:
        mine_images = np.concatenate(chunks) if chunks else np.zeros((0, info.image_size, info.image_size, 3), np.uint8)
        np.savez(out / f"part_rank{rank}.npz", arr_0=mine_images, arr_1=labels[mine.start : mine.stop].numpy())
        dist.barrier()
        if rank == 0:
            parts = [out / f"part_rank{r}.npz" for r in range(world)]
            head = write_npz(final, _part_images(parts), labels.numpy(), info.image_size)
            for p in parts:
                p.unlink()
    seconds = time.perf_counter() - start
    if rank == 0:
        save_grid(head, out / "grid.png")
        lo, hi = args.interval
        guided = f"guidance {args.guidance} in sigma ({lo}, {hi}]" if args.guidance != 1 else "no guidance"
        t_min = schedule.resolution_shift(info.image_size) * schedule.SIGMA_MIN
        end = "then 0" if args.grid == "paper" else f"ending at s*sigma_min = {t_min:g}"
        levels = "" if args.sampler == "onestep" else f", {args.steps} levels, {args.grid} grid ({end})"
        print(f"NFE per image: {nfe} ({args.sampler}{levels}, {guided})")
        print(f"{args.num} images in {seconds:.1f} s: {args.num / seconds:.2f} images/s on {world} rank(s)")
        print(f"wrote {final} and {out / 'grid.png'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cli_device(args.device, SampleError)  # "cuda" without a visible device: one line
        rank, world, device = setup_distributed(args.device, group_of_one=False)
        _sample(args, rank, world, device)
        return 0
    except SampleError as err:
        print(f"epg_fast.sample: error: {err}", file=sys.stderr)
        return 2
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())

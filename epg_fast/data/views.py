"""The three views of spec section 5 with PIL (the reference pipeline), and `normalize`.

All randomness comes from the `numpy.random.Generator` passed in, so one sample's views are
a pure function of (image, generator state). Views are PIL RGB images of size R x R; the
loader copies them into uint8 CHW batch tensors and `normalize` runs on the training device.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# y1 and y2 differ only in how often they are blurred and solarized (BYOL-style asymmetry).
Y1 = {"blur_p": 1.0, "solarize_p": 0.0}
Y2 = {"blur_p": 0.1, "solarize_p": 0.2}
FLIP_P = 0.5
JITTER_P = 0.8
JITTER = (0.4, 0.4, 0.2, 0.1)  # colour-jitter strengths: brightness, contrast, saturation, hue
GRAY_P = 0.2
BLUR_SIGMA = (0.1, 2.0)

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(path: str) -> Image.Image:
    """Decode a file fully (so truncation fails here, not later) and convert it to RGB."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as the reference's `convert("RGB")`: alpha and palette transparency are dropped
    (transparent pixels show their stored colour), CMYK/grey/1-bit are converted.

    16-bit grey (and 32-bit "I", read as 0..65535) is scaled to 0..255 by its full range;
    PIL's own conversion clips every value above 255 to white.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        v = np.asarray(img).astype(np.float32) / 257.0  # 65535 / 255
        img = Image.fromarray(np.clip(np.rint(v), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM center crop: box-halve while the short side >= 2*size, bicubic-resize the short
    side to `size`, crop the center square. Smaller images are upsampled."""
    if img.size == (size, size):
        return img
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def center_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The region (left, top, right, bottom) of a width x height image that center_crop turns
    into its size x size view, in source pixels: its halving and rounding steps replayed.
    Each PIL resize maps the whole image onto the whole output, so a resized pixel spans
    width / resized_width source pixels. (Decode-small and the DALI loader crop with it.)"""
    w, h = width, height
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
    scale = size / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    left, top = (rw - size) // 2, (rh - size) // 2
    sx, sy = width / rw, height / rh
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def hflip(img: Image.Image, rng: np.random.Generator, p: float = FLIP_P) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else img


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback: the whole image, with its aspect ratio clamped into `ratio`, centered.
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (width - w) // 2, (height - h) // 2, w, h


def _adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` turns (torchvision's PIL path: uint8 H channel wraps)."""
    delta = int(shift * 255)
    h, s, v = img.convert("HSV").split()
    h = h.point([(i + delta) % 256 for i in range(256)])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


@dataclass(frozen=True)
class YDraw:
    """The random decisions behind one SSL view; `draw_y` draws them, `apply_y` applies them
    (the DALI loader applies the same draws with its own operators)."""

    box: tuple[int, int, int, int]  # (left, top, width, height) in the source image
    jitter: bool
    order: tuple[int, ...]  # jitter ops in application order: 0 brightness, 1 contrast, 2 saturation, 3 hue
    factors: tuple[float, float, float, float]  # brightness, contrast, saturation factors; hue shift (turns)
    gray: bool
    blur: bool
    sigma: float  # 0 when not blurred
    solarize: bool
    flip: bool


def draw_y(width: int, height: int, rng: np.random.Generator, blur_p: float, solarize_p: float) -> YDraw:
    """An SSL view's decisions for a width x height source, in a fixed order: crop box,
    jitter (p=0.8; then torchvision's random op order and the four factors), grey (p=0.2),
    blur (with its sigma), solarize, flip. Every coin is drawn even when p is 0 or 1."""
    box = random_resized_crop_box(width, height, rng)
    jitter = rng.random() < JITTER_P
    order, factors = (0, 1, 2, 3), (1.0, 1.0, 1.0, 0.0)
    if jitter:
        order = tuple(int(k) for k in rng.permutation(4))
        b, c, s, h = JITTER
        factors = (rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s), rng.uniform(-h, h))
    gray = rng.random() < GRAY_P
    blur = rng.random() < blur_p
    sigma = rng.uniform(*BLUR_SIGMA) if blur else 0.0
    solarize = rng.random() < solarize_p
    flip = rng.random() < FLIP_P
    return YDraw(box, jitter, order, factors, gray, blur, sigma, solarize, flip)


def color_jitter(img: Image.Image, order: tuple[int, ...], factors: tuple[float, float, float, float]) -> Image.Image:
    """torchvision ColorJitter with drawn factors, its four ops in the drawn order."""
    for op in order:
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(factors[0])
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(factors[1])
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(factors[2])
        else:
            img = _adjust_hue(img, factors[3])
    return img


def apply_y(img: Image.Image, size: int, d: YDraw) -> Image.Image:
    """An SSL view: random resized crop, jitter, grey, blur, solarize, flip, as drawn."""
    left, top, w, h = d.box
    # Crop first, then resize (as torchvision): the filter never reads outside the crop.
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    if d.jitter:
        img = color_jitter(img, d.order, d.factors)
    if d.gray:
        img = img.convert("L").convert("RGB")
    if d.blur:
        img = img.filter(ImageFilter.GaussianBlur(radius=d.sigma))  # radius = sigma
    if d.solarize:
        img = ImageOps.solarize(img, threshold=128)  # inverts values >= 128
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if d.flip else img


def y_view(
    img: Image.Image, size: int, rng: np.random.Generator, blur_p: float, solarize_p: float
) -> Image.Image:
    """An SSL view: random resized crop, jitter p=0.8, grey p=0.2, blur, solarize, flip."""
    return apply_y(img, size, draw_y(img.width, img.height, rng, blur_p, solarize_p))


def make_views(
    img: Image.Image, size: int, rng: np.random.Generator, with_y: bool, precropped: bool
) -> list[Image.Image]:
    """[x] or [x, y1, y2] of one RGB image, drawing from `rng` in that order.

    x is the ADM center crop + flip. The y views crop the original image, or, for a
    pre-cropped tree, the R x R image itself (the reference setup: its crops never see
    outside the center square).
    """
    base = center_crop(img, size)
    views = [hflip(base, rng)]
    if with_y:
        src = base if precropped else img
        views += [y_view(src, size, rng, **Y1), y_view(src, size, rng, **Y2)]
    return views


@functools.cache
def _imagenet_affine(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with u8 * scale + shift = (u8 / 255 - mean) / (2 * std); cached so a
    training step does not copy the constants to the device every time."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    scale, shift = 1 / (255 * 2 * std), -mean / (2 * std)
    return scale.to(device, torch.float32), shift.to(device, torch.float32)


def normalize(images: torch.Tensor, mode: str) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 on the same device.

    "imagenet": (v - mean) / (2 * std), the reference default; "simple": 2v - 1; v = u8 / 255.
    """
    if images.dtype != torch.uint8 or images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"normalize expects uint8 [..., 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if mode == "simple":
        return images.to(torch.float32).div_(127.5).sub_(1)  # exact at 0 and 255
    if mode == "imagenet":
        scale, shift = _imagenet_affine(images.device)
        return images.to(torch.float32).mul_(scale).add_(shift)
    raise ValueError(f"unknown normalization {mode!r}; use 'imagenet' or 'simple'")

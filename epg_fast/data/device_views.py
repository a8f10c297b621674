"""The SSL views' photometric augmentations, batched in torch on the training device
(`data.augment=device`): the PIL reference (views.apply_y) replayed op by op.

The split: a loader worker decodes, applies the crop geometry (x: the ADM center crop; y: the
drawn box resized to R x R, exactly views.apply_y's first step) and draws every decision with
views.draw_y from the sample's generator, as the PIL path does; `pack_y` turns the decisions
into a few small tensors. On the device, `augment_y` applies colour jitter (the four ops in
the drawn order), grey, blur, solarize and flip to a whole batch, without a Python loop over
samples and without a host synchronisation (samples that skip an op get an identity
parameter or a `torch.where`), and `augment_views` does it for a loader batch.

Each op reproduces Pillow's integer semantics (Pillow 9-13, libImaging), so the views equal
the PIL path's, bit for bit, up to rare float-rounding ties (tests/test_device_views.py):
- brightness, contrast, saturation: `Image.blend(degenerate, img, f)` = trunc(clip(d + f*(img - d)))
  in float32, with f cast to float32; degenerate = black, the grey image's rounded mean, the
  grey image. Grey = (19595 R + 38470 G + 7471 B + 2^15) >> 16 (ITU-R 601-2, Pillow's "L").
- hue: Pillow's RGB->HSV->RGB with 8-bit H, S, V and its float/double mix (rgb2hsv, hsv2rgb),
  H shifted by int(shift * 255) with wrap-around (views._adjust_hue).
- blur: Pillow's GaussianBlur is not a Gaussian but three passes of a box filter with a
  fractional radius (Gwosdek et al. 2011), each pass rounded to uint8, horizontal then
  vertical, edges replicated. The box taps (integers scaled by 2^24) are computed on the host
  from sigma with Pillow's float32 arithmetic (`box_blur_taps`), the passes run in int64.
- solarize: v >= 128 -> 255 - v. Flip: left-right.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from epg_fast.data.views import BLUR_SIGMA, FLIP_P, Y1, Y2, YDraw, center_crop, draw_y

_BLUR_PASSES = 3
_ONE = 1 << 24  # Pillow's box-blur fixed point


# ---------------------------------------------------------------------------------------
# Host side: decisions -> tensors


def _box_radius(sigma: float) -> np.float32:
    """Pillow's _gaussian_blur_radius: the fractional box radius giving `sigma` over 3 passes
    (float32 as in C; the sqrt and floor in double, as C's sqrt/floor of a float)."""
    radius = np.float32(sigma)
    sigma2 = radius * radius / np.float32(_BLUR_PASSES)
    length = np.float32(np.sqrt(12.0 * np.float64(sigma2) + 1.0))
    whole = np.float32(np.floor((np.float64(length) - 1.0) / 2.0))
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
    frac /= 6 * (sigma2 - (whole + 1) * (whole + 1))
    return whole + frac


MAX_BOX_RADIUS = int(_box_radius(BLUR_SIGMA[1]))  # 1: the widest box views.draw_y can ask for
BLUR_TAPS = 2 * MAX_BOX_RADIUS + 3  # offsets -r-1 .. r+1


def box_blur_taps(sigma: float) -> np.ndarray:
    """int64 [BLUR_TAPS]: one box pass for `sigma` (0 = identity), Pillow's ImagingHorizontalBoxBlur
    weights: `ww` on offsets -r..r, `fw` on -r-1 and r+1, out = (sum + 2^23) >> 24."""
    taps = np.zeros(BLUR_TAPS, np.int64)
    if sigma == 0:
        taps[BLUR_TAPS // 2] = _ONE
        return taps
    radius = _box_radius(sigma)
    r = int(radius)
    if r > MAX_BOX_RADIUS:
        raise ValueError(f"blur sigma {sigma} needs a box radius above {MAX_BOX_RADIUS}")
    ww = int(np.float32(_ONE) / (radius * 2 + 1))  # C: (UINT32)(1 << 24) / (float) -> float, truncated
    fw = (_ONE - (2 * r + 1) * ww) // 2
    mid = BLUR_TAPS // 2
    taps[mid - r : mid + r + 1] = ww
    taps[mid - r - 1] = taps[mid + r + 1] = fw
    return taps


def pack_y(draws: Sequence[YDraw]) -> dict[str, torch.Tensor]:
    """One y view's decisions for a batch, as CPU tensors (pinnable, a few bytes per sample).

    Samples without jitter get identity factors (1, 1, 1) and no hue; their order is unused."""
    jitter = [d.jitter for d in draws]
    return {
        "jitter": torch.tensor(jitter, dtype=torch.bool),
        "order": torch.tensor([d.order for d in draws], dtype=torch.int64),
        "factors": torch.tensor([d.factors[:3] if d.jitter else (1.0, 1.0, 1.0) for d in draws], dtype=torch.float32),
        "hue_delta": torch.tensor([int(d.factors[3] * 255) for d in draws], dtype=torch.int64),  # as views._adjust_hue
        "gray": torch.tensor([d.gray for d in draws], dtype=torch.bool),
        "blur_taps": torch.from_numpy(np.stack([box_blur_taps(d.sigma if d.blur else 0.0) for d in draws])),
        "solarize": torch.tensor([d.solarize for d in draws], dtype=torch.bool),
        "flip": torch.tensor([d.flip for d in draws], dtype=torch.bool),
        "box": torch.tensor([d.box for d in draws], dtype=torch.int64),  # for crop_resize
    }


def crop_y(img: Image.Image, size: int, d: YDraw) -> Image.Image:
    """The geometric part of views.apply_y: the drawn box, resized to size x size."""
    left, top, w, h = d.box
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)


def draw_views(
    width: int, height: int, size: int, rng: np.random.Generator, with_y: bool, precropped: bool
) -> tuple[bool, list[YDraw]]:
    """views.make_views's decisions for a width x height image, in its order: x's flip (views.hflip's
    coin), then y1's and y2's, drawn on the image or, pre-cropped, on the size x size center crop."""
    x_flip = bool(rng.random() < FLIP_P)
    if not with_y:
        return x_flip, []
    src = (size, size) if precropped else (width, height)
    return x_flip, [draw_y(*src, rng, **Y1), draw_y(*src, rng, **Y2)]


def geometric_views(
    img: Image.Image, size: int, rng: np.random.Generator, with_y: bool, precropped: bool
) -> tuple[list[Image.Image], bool, list[YDraw]]:
    """The worker's share of views.make_views: ([x, y1, y2] unflipped and un-jittered, x's flip,
    [y1's, y2's decisions]), drawing from `rng` exactly as make_views does."""
    x_flip, draws = draw_views(img.width, img.height, size, rng, with_y, precropped)
    base = center_crop(img, size)
    src = base if precropped else img
    return [base] + [crop_y(src, size, d) for d in draws], x_flip, draws


# ---------------------------------------------------------------------------------------
# Device side: batched ops on float32 [B, 3, H, W] images holding integers 0..255


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


_PRECISION = 22  # Pillow's resampling fixed point (PRECISION_BITS = 32 - 8 - 2)


def _bilinear_taps(lengths: torch.Tensor, size: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for a bilinear resize of a
    length-`lengths[b]` span to `size`: (first source index [B, size], integer weights
    [B, size, K]), in double as in C. K covers spans up to max_length (known on the host,
    so no device synchronisation): 3 when no span is longer than size."""
    f64 = torch.float64
    scale = lengths.to(f64).unsqueeze(1) / size  # [B, 1]
    filterscale = scale.clamp(min=1.0)
    support = filterscale  # bilinear support 1, stretched when downsampling
    taps = 2 * max(1, -(-max_length // size)) + 1
    center = (torch.arange(size, device=lengths.device, dtype=f64) + 0.5) * scale  # in0 = 0 (the crop's origin)
    first = torch.trunc(center - support + 0.5).clamp(min=0)
    last = torch.minimum(torch.trunc(center + support + 0.5), lengths.to(f64).unsqueeze(1))
    k = torch.arange(taps, device=lengths.device, dtype=f64)
    x = ((k + first.unsqueeze(2) - center.unsqueeze(2) + 0.5) / filterscale.unsqueeze(2)).abs()
    w = torch.where((x < 1.0) & (k < (last - first).unsqueeze(2)), 1.0 - x, 0.0)
    total = torch.zeros_like(center)
    for j in range(taps):  # summed in C's order
        total = total + w[..., j]
    w = w / torch.where(total == 0, 1.0, total).unsqueeze(2)
    return first.to(torch.int64), torch.trunc(0.5 + w * (1 << _PRECISION)).to(torch.int32)


def _resample(img: torch.Tensor, start: torch.Tensor, length: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """One Pillow bilinear pass along `dim` (2 rows or 3 columns) of int32 images: the span
    [start, start + length) of each sample resized to `size`, rounded to 0..255."""
    first, weights = _bilinear_taps(length, size, img.shape[dim])
    acc = torch.full((), 1 << (_PRECISION - 1), dtype=torch.int32, device=img.device)
    shape = [img.shape[0], 1, 1, 1]
    shape[dim] = size
    out_shape = list(img.shape)
    out_shape[dim] = size
    for j in range(weights.shape[2]):
        # Taps past the span have weight 0; clamp their index into it.
        idx = start.unsqueeze(1) + torch.minimum(first + j, length.unsqueeze(1) - 1)
        picked = torch.gather(img, dim, idx.view(shape).expand(out_shape))
        acc = acc + picked * weights[..., j].view(shape)
    return (acc >> _PRECISION).clamp_(0, 255)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """views.apply_y's geometry on the device: each sample's (left, top, width, height) box
    cropped and resized to size x size with Pillow's bilinear filter, horizontal pass first,
    each pass rounded to uint8 as Pillow does. uint8 [B, 3, H, W] -> uint8 [B, 3, size, size].

    Exact for boxes no larger than size (the y crops of a pre-cropped R x R source, always),
    and for boxes that shrink on both axes. Pillow >= 12 runs the vertical pass first for some
    boxes that shrink on one axis only, which rounds differently (one level on ~20% of the
    pixels); the loader cuts such crops (non-pre-cropped sources) in the worker instead."""
    img = images.to(torch.int32)
    left, top, width, height = boxes.unbind(1)
    img = _resample(img, left, width, size, dim=3)
    img = _resample(img, top, height, size, dim=2)
    return img.to(torch.uint8)


def _grey(img: torch.Tensor) -> torch.Tensor:
    """Pillow's "L" of an RGB batch, [B, 1, H, W] (exact in int32)."""
    r, g, b = img.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1).to(img.dtype)


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, img, factor): float32, then truncated and clipped to 0..255.
    A factor of 1 returns img exactly (d + 1 * (img - d) = img in floating point)."""
    return (degenerate + _per_sample(factor) * (img - degenerate)).clamp_(0, 255).floor_()


def _contrast_mean(img: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast's degenerate grey level: the grey image's mean, rounded, [B, 1, 1, 1]."""
    grey = _grey(img).to(torch.int64)
    mean = grey.sum(dim=(1, 2, 3)).double() / grey[0].numel()  # ImageStat's mean, in double
    return _per_sample(torch.floor(mean + 0.5).to(img.dtype))


def _enhance(img: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """One of ImageEnhance's blends per sample, chosen by op: 0 brightness (towards black),
    1 contrast (towards the mean grey), 2 saturation (towards the grey image)."""
    op = _per_sample(op)
    degenerate = torch.where(op == 0, 0.0, torch.where(op == 1, _contrast_mean(img), _grey(img)))
    return _blend(degenerate, img, factor)


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    """C's round() for x >= 0 (ties away from zero; torch.round ties to even)."""
    low = torch.floor(x)
    return torch.where(x - low >= 0.5, low + 1, low)


def _hue(img: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """views._adjust_hue: Pillow's rgb2hsv, H += delta (mod 256), hsv2rgb. Float32 where the C
    code uses float variables, float64 where it computes with double literals."""
    f32, f64 = torch.float32, torch.float64
    r, g, b = img.to(f32).unbind(1)
    maxc = torch.maximum(r, torch.maximum(g, b))
    minc = torch.minimum(r, torch.minimum(g, b))
    grey = maxc == minc
    cr = torch.where(grey, torch.ones_like(maxc), maxc - minc)
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    h = torch.where(
        r == maxc, bc - gc,
        torch.where(g == maxc, (2.0 + rc.to(f64) - bc.to(f64)).to(f32), (4.0 + gc.to(f64) - rc.to(f64)).to(f32)),
    )
    h = torch.fmod(h.to(f64) / 6.0 + 1.0, 1.0).to(f32)
    hue = torch.where(grey, 0.0, torch.floor(h.to(f64) * 255.0))
    sat = torch.where(grey, 0.0, torch.floor(s.to(f64) * 255.0))
    hue = torch.remainder(hue + delta.view(-1, 1, 1).to(f64), 256.0)

    sector = torch.floor(hue * 6.0 / 255.0)
    frac = (hue * 6.0 / 255.0 - sector).to(f32)
    fs = (sat / 255.0).to(f32)
    v = maxc.to(f64)
    p = _round_half_up(v * (1.0 - fs.to(f64)))
    q = _round_half_up(v * (1.0 - (fs * frac).to(f64)))  # fs * f is a float product in C
    t = _round_half_up(v * (1.0 - fs.to(f64) * (1.0 - frac.to(f64))))
    # Per sector (i % 6), which of (v, p, q, t) each output channel takes.
    choice = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=img.device)
    candidates = torch.stack([v, p, q, t], dim=1)  # [B, 4, H, W]
    pick = choice[sector.to(torch.int64) % 6].permute(0, 3, 1, 2)  # [B, 3, H, W]
    rgb = torch.gather(candidates, 1, pick)
    rgb = torch.where((sat == 0).unsqueeze(1), v.unsqueeze(1), rgb)
    return rgb.clamp_(0, 255).to(img.dtype)


def _jitter(img: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """ColorJitter with per-sample op order, without a loop over samples: the hue shift (the
    costly op, and not an identity at shift 0) runs once for all samples, between the blends
    each sample drew before it and those it drew after; at each position a sample runs its
    drawn blend, or one with factor 1 (an exact identity) when the op is elsewhere."""
    order, jitter = p["order"], p["jitter"]
    hue_at = torch.where(jitter, (order == 3).to(torch.int64).argmax(dim=1), 4)  # 4: no hue
    factors = torch.cat([p["factors"], torch.ones_like(p["factors"][:, :1])], dim=1)  # op 3 -> factor 1
    for after_hue in (False, True):
        for k in range(4):
            runs = jitter & ((k > hue_at) if after_hue else (k < hue_at)) & (order[:, k] != 3)
            op = order[:, k].clamp(max=2)
            factor = torch.where(runs, factors.gather(1, order[:, k : k + 1]).squeeze(1), 1.0)
            img = _enhance(img, op, factor)
        if not after_hue:
            img = torch.where(_per_sample(hue_at < 4), _hue(img, p["hue_delta"]), img)
    return img


def _box_pass(img: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    """One box-blur pass along `dim` (int64 image, edges replicated, rounded as Pillow)."""
    pad = BLUR_TAPS // 2
    n = img.shape[dim]
    padded = torch.cat([img.narrow(dim, 0, 1).expand_as(img.narrow(dim, 0, pad)), img,
                        img.narrow(dim, n - 1, 1).expand_as(img.narrow(dim, 0, pad))], dim=dim)
    acc = torch.zeros_like(img)
    for k in range(BLUR_TAPS):
        acc += _per_sample(taps[:, k]) * padded.narrow(dim, k, n)
    return (acc + (1 << 23)) >> 24


def _blur(img: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    out = img.to(torch.int64)
    for dim in (3, 2):  # Pillow: all horizontal passes, then all vertical ones
        for _ in range(_BLUR_PASSES):
            out = _box_pass(out, taps, dim)
    return out.to(img.dtype)


def _solarize(img: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_sample(on) & (img >= 128), 255 - img, img)


def flip(images: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Left-right flip of the samples where `on` (bool [B]) is set."""
    return torch.where(_per_sample(on), images.flip(-1), images)


def augment_y(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """uint8 [B, 3, H, W] geometric y crops + `pack_y` decisions (on the same device) -> the
    views views.apply_y makes: jitter, grey, blur, solarize, flip, as drawn. uint8 out."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"augment_y expects uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    img = images.to(torch.float32)
    img = _jitter(img, params)
    img = torch.where(_per_sample(params["gray"]), _grey(img).expand_as(img), img)
    img = _blur(img, params["blur_taps"])
    img = _solarize(img, params["solarize"])
    return flip(img, params["flip"]).to(torch.uint8)


def augment_views(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """A device-augment loader batch -> the PIL path's batch, on `device`.

    In: uint8 "x" (unflipped center crops), "x_flip" (bool [B]), and in pre-training "y1", "y2"
    (geometric crops) with "y1_params", "y2_params" (`pack_y`); other keys pass through.
    Without "y1"/"y2" but with their params (a pre-cropped source such as raw shards), the
    y crops are cut from x on the device (crop_resize), as make_views(precropped=True) does.
    Out: "x", "y1", "y2" as make_views's views (uint8), ready for views.normalize."""
    out = {k: v for k, v in batch.items() if not k.endswith(("_params", "_flip"))}
    base = batch["x"].to(device, non_blocking=True)
    out["x"] = flip(base, batch["x_flip"].to(device, non_blocking=True))
    for view in ("y1", "y2"):
        if f"{view}_params" in batch:
            params = {k: v.to(device, non_blocking=True) for k, v in batch[f"{view}_params"].items()}
            crops = batch[view].to(device, non_blocking=True) if view in batch else None
            if crops is None:
                crops = crop_resize(base, params["box"], base.shape[-1])
            out[view] = augment_y(crops, params)
    return out

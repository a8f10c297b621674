"""The DALI executor of the batch plan: the torch loader's batches, decoded and augmented by
NVIDIA DALI.

Same images, same order, same random decisions as the torch executor (torch_loader.py):
- the samples are the `BatchPlan`'s (a permutation per (seed, epoch), global batch k, this
  rank's contiguous slice, the hop over unreadable files), walked here in Python;
- every random decision of `views.make_views` is drawn in Python (`draw_views`) from the
  plan's generator for the sample, `default_rng([seed, epoch, index, hop])`, in the same
  order, and reaches DALI as per-sample arguments through `fn.external_source`. DALI's own
  RNG is never used, so a batch is a pure function of its key (epoch, batch), whatever the
  threads or the device, and resuming needs only the key.

The graph; the CPU and GPU versions differ only in the decoder's placement ("cpu" or
"mixed"): every later operator runs where its input lives.

    file bytes -> decode -> resize(region = the reference's center crop, cubic) -> base
    x = flip(base)
    y = slice(crop box) -> resize(R x R, linear) -> [jitter] -> [grey] -> [blur] -> [solarize] -> flip

where [op] is a DALI conditional: only the samples whose drawn decision is true run it, and
the jitter is four such slots, each running the op drawn for that position, so the four ops
run in torchvision's random order.

Deviations from the PIL reference (views.py); tests/test_dali.py measures them:
- x is one antialiased bicubic resize of the center-crop region, not box-halving + bicubic.
  The geometry and the bicubic kernel are the same, so where PIL does not halve (short side
  < 2R, e.g. most of ImageNet at R=256) the two agree within a grey level (> 50 dB PSNR).
  PIL halves an odd size with integer box windows whose phase jumps by one source pixel
  mid-image, which no DALI filter reproduces: on the demo data's sharp synthetic patterns at
  R <= 64 a few images fall to 20-30 dB (over the whole set >= 32 dB).
- Hue: DALI's `hsv` rotates hues by the same angle but linearly around the grey axis (luma
  kept) instead of in PIL's HSV hexcone (max and min kept); the saturation blend uses hsv's
  luma weights (within a level of PIL's). Every op rounds to uint8, as PIL's; PIL's
  GaussianBlur approximates the kernel with box passes, DALI's is exact. Measured on the
  demo data at R=64: y views without jitter median 51-56 dB from the reference's, with
  jitter ~30 dB (~41 dB when the hue shift is small).

Decoding: DALI's CPU decoder gives the same pixels as `views.load_image` for JPEG (CMYK and
grey too), PNG (16-bit, palette, alpha), BMP, WebP and PPM, checked file by file; EXIF
orientation is ignored, as PIL does. GIF (DALI cannot decode it), TIFF (its LA and 32-bit
modes differ or fail) and 32-bit modes are decoded with PIL in the feeder and handed to DALI
as lossless PPM.

Unreadable files: the feeder reads each file and parses its header with PIL (~20 us; it also
gives the size the crop boxes are drawn for and the format); a file that fails is replaced
by the plan's hop and counted in the loader's `skipped`. A file whose header is fine but whose
data is corrupt makes DALI abort the whole pipeline. The executor then decodes the files of
the batches in flight with PIL: those that fail are marked unreadable (the files the torch
loader skips), those that PIL decodes but DALI does not go through PIL from then on; the
pipeline is rebuilt and resumes at the same batch, so the output is what it would have been
had the header check caught the file. Only an error no file explains is raised.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import DataNode, Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
from PIL import Image

from epg_fast.data.plan import BatchPlan, Made, unreadable_reason
from epg_fast.data.views import FLIP_P, Y1, Y2, YDraw, center_crop_box, draw_y, load_image, to_rgb

log = logging.getLogger("epg_fast.data")

# Formats DALI decodes exactly as views.load_image; the rest goes through PIL (see above).
_DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "WEBP", "PPM"})
_PIL_MODES = frozenset({"I", "F"})  # 32-bit grey/float: DALI rejects them or scales differently


# ---------------------------------------------------------------------------------------
# The random decisions, drawn as views.make_views draws them


@dataclass(frozen=True)
class ViewDraws:
    x_flip: bool
    y: tuple[YDraw, ...]  # (y1, y2) in pre-training, () in fine-tuning


def draw_views(
    width: int, height: int, size: int, rng: np.random.Generator, with_y: bool, precropped: bool
) -> ViewDraws:
    """views.make_views's draws for a width x height image: x's flip, then y1's and y2's.

    The y crop boxes are drawn on the original image, or on the R x R center crop for a
    pre-cropped tree, as the reference does."""
    x_flip = rng.random() < FLIP_P
    if not with_y:
        return ViewDraws(x_flip, ())
    src = (size, size) if precropped else (width, height)
    return ViewDraws(x_flip, (draw_y(*src, rng, **Y1), draw_y(*src, rng, **Y2)))


def center_crop_roi(width: int, height: int, size: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """views.center_crop_box as DALI's roi_start / roi_end: ((top, left), (bottom, right))."""
    left, top, right, bottom = center_crop_box(width, height, size)
    return (top, left), (bottom, right)


# ---------------------------------------------------------------------------------------
# The external source: file bytes and decisions, one batch per call

# Per-sample columns handed to DALI: name -> dtype. "encoded" holds the file bytes.
_X_COLUMNS = {"encoded": np.uint8, "label": np.int64, "x_roi_start": np.float32, "x_roi_end": np.float32,
              "x_flip": np.int32}
_Y_COLUMNS = {"anchor": np.int32, "shape": np.int32, "jitter": np.bool_, "order": np.int32,
              "factors": np.float32, "gray": np.bool_, "blur": np.bool_, "sigma": np.float32,
              "solarize": np.bool_, "flip": np.int32}
Y_VIEWS = ("y1", "y2")
_DTYPES = _X_COLUMNS | {f"{v}_{k}": t for v in Y_VIEWS for k, t in _Y_COLUMNS.items()}


def _columns(with_y: bool) -> list[str]:
    return list(_X_COLUMNS) + ([f"{v}_{k}" for v in Y_VIEWS for k in _Y_COLUMNS] if with_y else [])


def _y_row(view: str, d: YDraw) -> dict[str, Any]:
    left, top, w, h = d.box
    values = {
        "anchor": (left, top), "shape": (w, h),  # fn.slice's "WH" axis order
        "jitter": d.jitter, "order": d.order, "factors": (*d.factors[:3], d.factors[3] * 360.0),  # hue in degrees
        "gray": d.gray, "blur": d.blur, "sigma": d.sigma, "solarize": d.solarize, "flip": d.flip,
    }
    return {f"{view}_{k}": v for k, v in values.items()}


@dataclass
class _Fed:
    """One batch handed to DALI, kept until it comes out (or until a failure is explained)."""

    indices: list[int]
    skipped: list[tuple[str, str]]  # (path, reason) of files skipped for this batch
    resized: list[tuple[str, tuple[int, int]]]


class _Feeder:
    """DALI's external source: called once per batch, in order, from `start` on; each call
    executes one batch key of the plan, reading the files (and drawing the decisions) where
    the torch executor decodes them."""

    def __init__(self, plan: BatchPlan, size: int, with_y: bool, precropped: bool, start: tuple[int, int],
                 verdicts: dict[int, str], via_pil: set[int]) -> None:
        self._plan = plan
        self._size = size
        self._with_y = with_y
        self._precropped = precropped
        self._keys = plan.keys(start)
        self._verdicts = verdicts
        self._via_pil = via_pil
        self.columns = _columns(with_y)
        self.in_flight: deque[_Fed] = deque()
        self.failure: Exception | None = None  # DALI may wrap what a callback raises

    def __call__(self) -> tuple[Any, ...]:
        try:
            return self._next_batch()
        except Exception as e:
            self.failure = e
            raise

    def _next_batch(self) -> tuple[Any, ...]:
        plan, size = self._plan, self._size
        epoch, batch = next(self._keys)
        fed = _Fed([], [], [])
        rows: list[dict[str, Any]] = []
        for s in plan.samples(epoch, batch, self._read, self._verdicts, fed.skipped):
            encoded, (width, height) = s.item
            if self._precropped and (width, height) != (size, size) and not fed.resized:
                fed.resized.append((plan.index.path(s.index), (width, height)))
            draws = draw_views(width, height, size, s.rng, self._with_y, self._precropped)
            roi_start, roi_end = center_crop_roi(width, height, size)
            row = {"encoded": encoded, "label": plan.index.labels[s.index], "x_roi_start": roi_start,
                   "x_roi_end": roi_end, "x_flip": draws.x_flip}
            for view, d in zip(Y_VIEWS, draws.y):
                row.update(_y_row(view, d))
            rows.append(row)
            fed.indices.append(s.index)
        self.in_flight.append(fed)
        return tuple(
            [r[c] for r in rows] if c == "encoded" else np.array([r[c] for r in rows], _DTYPES[c])
            for c in self.columns
        )

    def _read(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
        """(file bytes DALI can decode, (width, height) from the header); raises for an
        unreadable file. The header, not the index, gives the size: it is parsed anyway for
        the format, and it is the size of the bytes fed even if the file changed since."""
        with open(self._plan.index.path(i), "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:  # the header only
            size = img.size
            if i in self._via_pil or img.format not in _DALI_FORMATS or img.mode in _PIL_MODES:
                data = _as_ppm(img)
        return np.frombuffer(data, np.uint8), size


def _as_ppm(img: Image.Image) -> bytes:
    """Decode with PIL as the reference does; PPM is lossless and trivial for DALI to read."""
    img.load()
    buf = io.BytesIO()
    to_rgb(img).save(buf, format="PPM")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# The DALI graph


def _jitter(img: DataNode, order: DataNode, factors: DataNode) -> DataNode:
    """views.color_jitter on uint8 images, the ops in the drawn order: slot k runs, for each
    sample, the op drawn for position k. Every op rounds and saturates to uint8, as PIL's."""
    brightness, contrast, saturation, hue_degrees = factors[0], factors[1], factors[2], factors[3]
    for k in range(4):
        op = order[k]
        if op == 0:  # ImageEnhance.Brightness, a blend with black: hsv's value is that product
            img = fn.hsv(img, value=brightness, dtype=types.UINT8)
        elif op == 1:  # ImageEnhance.Contrast: a blend with the image's mean grey level, rounded
            rgb = fn.reductions.mean(img, axes=(0, 1))
            mean = dmath.floor(rgb[0] * 0.299 + rgb[1] * 0.587 + rgb[2] * 0.114 + 0.5)  # mean of L = L of means
            img = fn.cast(mean + contrast * (img - mean), dtype=types.UINT8)  # the cast saturates and rounds
        elif op == 2:  # ImageEnhance.Color, a blend with the grey image: hsv's saturation (within a level)
            img = fn.hsv(img, saturation=saturation, dtype=types.UINT8)
        else:
            img = fn.hsv(img, hue=hue_degrees, dtype=types.UINT8)
    return img


def _y_view(src: DataNode, size: int, p: dict[str, DataNode]) -> DataNode:
    """views.y_view on decoded images; `p` holds the view's columns (draws)."""
    crop = fn.slice(src, start=p["anchor"], shape=p["shape"], axis_names="WH")  # crop first, as torchvision
    img = fn.resize(crop, size=(size, size), interp_type=types.INTERP_LINEAR, antialias=True)
    if p["jitter"]:
        img = _jitter(img, p["order"], p["factors"])
    if p["gray"]:  # convert("L").convert("RGB"): the same weights, three equal channels
        grey = fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)
        img = fn.cat(grey, grey, grey, axis=2)
    if p["blur"]:
        img = fn.gaussian_blur(img, sigma=p["sigma"])
    if p["solarize"]:  # ImageOps.solarize(threshold=128); both branches must stay uint8
        img = fn.cast((img < 128) * img + (img >= 128) * (255 - img), dtype=types.UINT8)
    return _chw(img, p["flip"])


def _chw(img: DataNode, flip: DataNode) -> DataNode:
    """Horizontal flip and HWC -> CHW in one operator."""
    return fn.crop_mirror_normalize(img, mirror=flip, dtype=types.UINT8, output_layout="CHW")


def _decode(encoded: DataNode, decoder: str) -> DataNode:
    # adjust_orientation=False: PIL ignores EXIF orientation, and the crop boxes are drawn
    # for the stored size. Fancy upsampling: the mixed (nvJPEG) decoder's chroma as libjpeg's.
    return fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False,
                             jpeg_fancy_upsampling=True)


@pipeline_def(enable_conditionals=True)
def _graph(feeder: _Feeder, size: int, with_y: bool, precropped: bool, decoder: str):
    p = dict(zip(feeder.columns, fn.external_source(source=feeder, num_outputs=len(feeder.columns), batch=True)))
    images = _decode(p["encoded"], decoder)
    base = fn.resize(images, size=(size, size), roi_start=p["x_roi_start"], roi_end=p["x_roi_end"],
                     interp_type=types.INTERP_CUBIC, antialias=True)
    views = [_chw(base, p["x_flip"])]
    if with_y:
        src = base if precropped else images
        views += [_y_view(src, size, {k: p[f"{v}_{k}"] for k in _Y_COLUMNS}) for v in Y_VIEWS]
    return (*views, p["label"])


@pipeline_def
def _decode_only(data: np.ndarray, decoder: str):
    return _decode(fn.external_source(source=lambda: [data], batch=True), decoder)


# ---------------------------------------------------------------------------------------
# The executor


class DaliBatches:
    """Batches of the plan decoded and augmented by DALI, on `device` (CUDA tensors straight
    from DALI's GPU buffers)."""

    def __init__(self, plan: BatchPlan, image_size: int, with_y: bool, precropped: bool, *, threads: int,
                 prefetch: int, device: torch.device) -> None:
        self._plan = plan
        self._size = image_size
        self._with_y = with_y
        self._precropped = precropped
        self.device = device
        self._threads = threads
        self._prefetch = prefetch
        self._gpu = device.type == "cuda"
        self._device_id = (device.index if device.index is not None else torch.cuda.current_device()) if self._gpu else None
        self._decoder = "mixed" if self._gpu else "cpu"
        self._verdicts: dict[int, str] = {}  # index -> why it is unreadable: one verdict per file
        self.via_pil: set[int] = set()  # files DALI failed on but PIL decodes
        self._names = ("x", "y1", "y2") if with_y else ("x",)

    def _start(self, key: tuple[int, int]) -> tuple[Pipeline, _Feeder]:
        """A pipeline that starts at batch `key`."""
        feeder = _Feeder(self._plan, self._size, self._with_y, self._precropped, key, self._verdicts, self.via_pil)
        pipe = _graph(feeder, self._size, self._with_y, self._precropped, self._decoder,
                      batch_size=self._plan.local_batch, num_threads=self._threads, device_id=self._device_id,
                      prefetch_queue_depth=self._prefetch)
        pipe.build()
        return pipe, feeder

    def batches(self, start: tuple[int, int]) -> Iterator[Made]:
        """The batches from key `start` on; the pipeline is built on the first request."""
        keys = self._plan.keys(start)
        key = next(keys)  # the next batch to hand out
        pipe: Pipeline | None = None
        while True:
            if pipe is None:
                pipe, feeder = self._start(key)
            stream = torch.cuda.current_stream(self.device) if self._gpu else None
            try:
                outputs = pipe.run(stream)
            except Exception as e:  # DALI aborts the whole pipeline on one undecodable file
                if feeder.failure is not None:  # the feeder's own error (e.g. every file bad)
                    raise feeder.failure from e
                self._explain_failure(feeder.in_flight, e)
                pipe = None  # rebuilt at the same position, without the culprits
                continue
            fed = feeder.in_flight.popleft()
            key = next(keys)
            yield Made(self._to_torch(outputs, stream), fed.skipped, fed.resized)

    def _to_torch(self, outputs: tuple[Any, ...], stream: torch.cuda.Stream | None) -> dict[str, torch.Tensor]:
        batch = {}
        for name, out in zip((*self._names, "label"), outputs):
            t = out.as_tensor()
            device = self.device if name != "label" else torch.device("cpu")  # labels stay on DALI's CPU side
            batch[name] = feed_ndarray(t, torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device),
                                       cuda_stream=stream)
        batch["label"] = batch["label"].to(self.device, non_blocking=True)
        return batch

    def _explain_failure(self, in_flight: deque[_Fed], error: Exception) -> None:
        """Find the files of the batches in flight that broke the pipeline, or raise `error`.

        PIL is asked first: a file it cannot decode is what the torch executor skips, so it
        is marked unreadable. If PIL decodes them all, each is tried alone in DALI, and those
        DALI fails on are decoded by PIL from now on."""
        index = self._plan.index
        suspects = sorted({i for fed in in_flight for i in fed.indices})
        found = False
        for i in suspects:
            try:
                load_image(index.path(i))
            except Exception as e:  # decoders raise many types on corrupt input
                self._verdicts[i] = unreadable_reason(e)
                found = True
        if not found:
            for i in suspects:
                if i not in self.via_pil and not self._dali_decodes(index.path(i)):
                    log.info("DALI cannot decode %s; it is decoded with PIL instead", index.path(i))
                    self.via_pil.add(i)
                    found = True
        if not found:
            raise error

    def _dali_decodes(self, path: str) -> bool:
        try:
            pipe = _decode_only(np.fromfile(path, np.uint8), self._decoder, batch_size=1, num_threads=1,
                                device_id=self._device_id)
            pipe.build()
            pipe.run()
            return True
        except Exception:  # DALI raises RuntimeError subclasses with the decoder's message
            return False

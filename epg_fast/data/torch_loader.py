"""The torch executor of the batch plan: DataLoader workers read, decode and make the views.

The sampler hands batch keys to the workers; a worker fills its key's whole batch (the plan
says which images and which generators), so the batches do not depend on the number of
workers or their scheduling.

What a worker does per sample depends on the source and on where the augmentations run:
- files, augment="pil": PIL decode + views.make_views (the reference): final uint8 views;
- files, augment="device": decode (at a reduced scale with `draft`, decode.py) + the crop
  geometry (device_views.geometric_views): unflipped x, the y crops, and the decisions
  ("x_flip", "y1_params", "y2_params"); device_views.augment_views finishes the views on the
  training device, bit-identical to make_views's;
- raw shards (shards.py): no decode; with augment="pil", make_views on the R x R crop; with
  augment="device", only the crop and the decisions: the device also cuts the y crops.
The decisions come from the same per-sample generators in the same order on every path.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from epg_fast.data.decode import reduced_geometric_views
from epg_fast.data.device_views import draw_views, geometric_views, pack_y
from epg_fast.data.plan import BatchPlan, Made
from epg_fast.data.shards import RawShards
from epg_fast.data.views import YDraw, load_image, make_views


class _Keys(Sampler):
    """The plan's batch keys from `start` on, forever."""

    def __init__(self, plan: BatchPlan) -> None:
        self.plan = plan
        self.start = (0, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.plan.keys(self.start)


class _Batches(Dataset):
    """Map-style dataset whose item for key (epoch, batch) is this rank's whole batch."""

    def __init__(self, plan: BatchPlan, image_size: int, with_y: bool, precropped: bool, augment: str,
                 draft: bool) -> None:
        self.plan = plan
        self.size = image_size
        self.with_y = with_y
        self.raw = isinstance(plan.index, RawShards)
        self.precropped = precropped or self.raw  # a shard holds R x R center crops
        self.device_augment = augment == "device"
        self.draft = draft
        # The uint8 views a batch carries; with device augmentation of raw shards the y crops
        # are cut on the device from x.
        self.names = ("x", "y1", "y2") if with_y and not (self.raw and self.device_augment) else ("x",)
        self._verdicts: dict[int, str] = {}  # index -> reason: a bad file is decoded once per worker

    def _read(self, i: int, rng: np.random.Generator) -> Any:
        if self.raw:
            return self.plan.index.image(i)
        path = self.plan.index.path(i)
        if self.draft:  # the decisions first: they choose the decode scale
            return reduced_geometric_views(path, self.size, rng, self.with_y, self.precropped)
        return load_image(path)

    def _views(self, item: Any, rng: np.random.Generator) -> tuple[list, bool, list[YDraw]]:
        """One sample's (views for `names`, x's flip, y decisions); the last two only with
        device augmentation."""
        if not self.device_augment:
            img = Image.fromarray(item) if self.raw else item
            return make_views(img, self.size, rng, self.with_y, self.precropped), False, []
        if self.raw:
            x_flip, draws = draw_views(self.size, self.size, self.size, rng, self.with_y, True)
            return [item], x_flip, draws
        if self.draft:
            crops, x_flip, draws, _ = item
            return crops, x_flip, draws
        return geometric_views(item, self.size, rng, self.with_y, self.precropped)

    def __getitem__(self, key: tuple[int, int]) -> Made:
        epoch, batch = key
        size, b = self.size, self.plan.local_batch
        out = {k: torch.empty((b, 3, size, size), dtype=torch.uint8) for k in self.names}
        arrays = [out[k].numpy() for k in self.names]  # views of the tensors: filled in place
        labels = torch.empty(b, dtype=torch.int64)
        flips, draws = [], []
        made = Made(out, [], [])
        for slot, s in enumerate(self.plan.samples(epoch, batch, self._read, self._verdicts, made.skipped)):
            if isinstance(s.item, Image.Image) and self.precropped and s.item.size != (size, size) and not made.resized:
                made.resized.append((self.plan.index.path(s.index), s.item.size))
            views, x_flip, ys = self._views(s.item, s.rng)
            for arr, view in zip(arrays, views):
                arr[slot] = np.asarray(view).transpose(2, 0, 1)
            labels[slot] = int(self.plan.index.labels[s.index])
            flips.append(x_flip)
            draws.append(ys)
        out["label"] = labels
        if self.device_augment:
            out["x_flip"] = torch.tensor(flips, dtype=torch.bool)
            if self.with_y:
                out["y1_params"] = pack_y([d[0] for d in draws])
                out["y2_params"] = pack_y([d[1] for d in draws])
        return made


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Ctrl-C, Slurm's SIGTERM and the DeepSpeed launcher signal the whole process group or
    tree: a worker killed by them first would crash the trainer before it checkpoints. The
    trainer decides (epg_fast.train.StopRequest) and shuts its workers down as it exits; a
    worker whose trainer died ends on its own (DataLoader's parent watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TorchBatches:
    """Batches of the plan made by `workers` DataLoader processes (0: in this process).
    `augment`: "pil" (final views) or "device" (crops and decisions for
    device_views.augment_views); `draft`: reduced JPEG decoding (device augmentation only)."""

    def __init__(self, plan: BatchPlan, image_size: int, with_y: bool, precropped: bool, *, workers: int,
                 prefetch: int, augment: str = "pil", draft: bool = False) -> None:
        if draft and augment != "device":
            raise ValueError("reduced decoding (draft) needs augment='device'")
        self._keys = _Keys(plan)
        self._loader = DataLoader(
            _Batches(plan, image_size, with_y, precropped, augment, draft),
            batch_size=None,  # the dataset builds whole batches: one key -> one batch
            sampler=self._keys,
            num_workers=workers,
            prefetch_factor=prefetch if workers > 0 else None,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_leave_stop_signals_to_the_trainer,
        )

    def batches(self, start: tuple[int, int]) -> Iterator[Made]:
        """The batches from key `start` on. A later call restarts the shared workers, so the
        loader stops using the earlier iterator (see ImageLoader)."""
        self._keys.start = start
        return iter(self._loader)

"""The torch executor of the batch plan: PIL decodes and augments in DataLoader workers.

The sampler hands batch keys to the workers; a worker fills its key's whole batch (the plan
says which images and which generators), so the batches do not depend on the number of
workers or their scheduling.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from epg_fast.data.plan import BatchPlan, Made
from epg_fast.data.views import load_image, make_views


class _Keys(Sampler):
    """The plan's batch keys from `start` on, forever."""

    def __init__(self, plan: BatchPlan) -> None:
        self.plan = plan
        self.start = (0, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.plan.keys(self.start)


class _PilBatches(Dataset):
    """Map-style dataset whose item for key (epoch, batch) is this rank's whole batch."""

    def __init__(self, plan: BatchPlan, image_size: int, with_y: bool, precropped: bool) -> None:
        self.plan = plan
        self.size = image_size
        self.with_y = with_y
        self.precropped = precropped
        self._verdicts: dict[int, str] = {}  # index -> reason: a bad file is decoded once per worker

    def _read(self, i: int) -> Image.Image:
        return load_image(self.plan.index.path(i))

    def __getitem__(self, key: tuple[int, int]) -> Made:
        epoch, batch = key
        size, b = self.size, self.plan.local_batch
        names = ("x", "y1", "y2") if self.with_y else ("x",)
        out = {k: torch.empty((b, 3, size, size), dtype=torch.uint8) for k in names}
        arrays = [out[k].numpy() for k in names]  # views of the tensors: filled in place
        labels = torch.empty(b, dtype=torch.int64)
        made = Made(out, [], [])
        for slot, s in enumerate(self.plan.samples(epoch, batch, self._read, self._verdicts, made.skipped)):
            if self.precropped and s.item.size != (size, size) and not made.resized:
                made.resized.append((self.plan.index.path(s.index), s.item.size))
            for arr, view in zip(arrays, make_views(s.item, size, s.rng, self.with_y, self.precropped)):
                arr[slot] = np.asarray(view).transpose(2, 0, 1)
            labels[slot] = int(self.plan.index.labels[s.index])
        out["label"] = labels
        return made


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Ctrl-C, Slurm's SIGTERM and the DeepSpeed launcher signal the whole process group or
    tree: a worker killed by them first would crash the trainer before it checkpoints. The
    trainer decides (epg_fast.train.StopRequest) and shuts its workers down as it exits; a
    worker whose trainer died ends on its own (DataLoader's parent watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TorchBatches:
    """Batches of the plan made by `workers` DataLoader processes (0: in this process)."""

    def __init__(self, plan: BatchPlan, image_size: int, with_y: bool, precropped: bool, *, workers: int,
                 prefetch: int) -> None:
        self._keys = _Keys(plan)
        self._loader = DataLoader(
            _PilBatches(plan, image_size, with_y, precropped),
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

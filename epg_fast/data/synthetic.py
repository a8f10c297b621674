"""data.source=synthetic: random images that need no disk, for measuring the trainer where
there is no dataset (the GPU machine of benchmarks/device_suite.sh) and for smoke runs.

`SyntheticLoader` hands out what `ImageLoader` does (uint8 [B, 3, R, R] views and int64
labels, B = this rank's share of the global batch) with the same interface (size, position,
checkpoint state), so the trainer's step is unchanged: the views are normalised by the stage
and copied to the device by the step as real batches are. The pixels come from a small pool
of batches made once from the seed (fresh random pixels every step would cost the host about
0.1 s per 256-image step, more than the step being measured); which pool batch a step gets
and its labels are drawn from (seed, step, rank). On CUDA the pool is in pinned memory, so
the step's copy does not block.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

SYNTHETIC_STEPS_PER_EPOCH = 1000  # an epoch is a bookkeeping unit here: no image repeats matter
POOL = 2  # distinct pixel batches


class SyntheticLoader:
    """Infinite iterator of this rank's synthetic batches, with a resumable position."""

    def __init__(self, image_size: int, views: tuple[str, ...], global_batch: int, num_classes: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, device: torch.device | None = None) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} ranks")
        self.views, self.num_classes = tuple(views), num_classes
        self.classes = [f"class_{i:04d}" for i in range(num_classes)]
        self.batch_size, self.rank, self.seed = global_batch // world_size, rank, seed
        self.steps_per_epoch = SYNTHETIC_STEPS_PER_EPOCH
        self.num_images = self.steps_per_epoch * global_batch
        self.skipped = 0  # nothing to decode, nothing to skip
        self.epoch = self.batch = 0
        pin = device is not None and device.type == "cuda"
        g = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        shape = (self.batch_size, 3, image_size, image_size)
        self._pool = [{v: torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) for v in self.views}
                      for _ in range(POOL)]
        if pin:
            self._pool = [{k: t.pin_memory() for k, t in b.items()} for b in self._pool]
        self._pin = pin

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "source": "synthetic"}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def _step_batch(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 65_537 + self.rank) % 2**63)
        pick = int(torch.randint(POOL, (1,), generator=g))
        labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=g)
        return {**self._pool[pick], "label": labels.pin_memory() if self._pin else labels}

    @property
    def executor(self) -> str:
        return f"{__name__}.{type(self).__name__}"

    def to_device(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            batch = self._step_batch(self.epoch * self.steps_per_epoch + self.batch)
            self.batch += 1
            if self.batch == self.steps_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
            yield batch

"""This rank's loader: a resumable iterator over the batch plan's batches, made by one of
two executors (data.loader): "torch" (PIL in DataLoader workers, torch_loader.py) or "dali"
(NVIDIA DALI, dali.py). Both execute the same `BatchPlan`, so they hold the same samples with
the same random decisions; the position, its checkpoint state and the reports of unreadable
files are kept here, once for both, and `to_device` finishes a batch on the training device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Protocol

import torch

from epg_fast.config import ConfigError, DataConfig
from epg_fast.data.device_views import augment_views
from epg_fast.data.index import DataError, ImageIndex, scan_image_folder
from epg_fast.data.plan import BatchPlan, Made
from epg_fast.data.shards import INDEX as SHARD_INDEX
from epg_fast.data.shards import RawShards
from epg_fast.data.synthetic import SyntheticLoader
from epg_fast.data.torch_loader import TorchBatches

log = logging.getLogger("epg_fast.data")

# The views a loader can hand out: x alone (fine-tuning) or x and the two SSL views
# (pre-training); the labels always come along.
VIEW_SETS = (("x",), ("x", "y1", "y2"))


class BatchSource(Protocol):
    """An executor of the plan: `batches(start)` yields the batches from key `start` on."""

    def batches(self, start: tuple[int, int]) -> Iterator[Made]: ...


class ImageLoader:
    """Infinite iterator of this rank's batches, with a resumable position.

    Batches are dicts of uint8 [B, 3, R, R] tensors (the requested views) and int64 "label".
    `iter(loader)` starts at the current position (0/0, or what `load_state_dict` set); a
    new `iter()` or `load_state_dict()` retires the previous iterator.
    """

    def __init__(self, plan: BatchPlan, source: BatchSource, image_size: int, augment: str = "pil") -> None:
        self.num_images = len(plan.index)
        self.num_classes = len(plan.index.classes)
        self.classes = plan.index.classes  # folder names; label = position
        self.steps_per_epoch = plan.steps_per_epoch
        self.source = source
        self.augment = augment
        self._plan = plan
        self._size = image_size
        self.epoch = 0
        self.batch = 0
        self._generation = 0
        self._bad_paths: set[str] = set()
        self._unreported: list[str] = []
        self._warned_resize = False

    @property
    def skipped(self) -> int:
        """Distinct files that failed to decode so far (in this process's lifetime)."""
        return len(self._bad_paths)

    def state_dict(self) -> dict[str, int]:
        """Position after the batches handed out so far, plus the setup it is valid for."""
        return {"epoch": self.epoch, "batch": self.batch, **self._plan.state()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or batch < 0:
            raise ValueError(f"bad data position epoch={epoch} batch={batch}")
        mine = self._plan.state()
        changed = [k for k in mine if k in state and state[k] != mine[k]]
        if changed:
            log.warning(
                "data position comes from a different setup (%s); the sample order will differ "
                "from the original run", ", ".join(f"{k} {state[k]} -> {mine[k]}" for k in changed),
            )
        epoch, batch = epoch + batch // self.steps_per_epoch, batch % self.steps_per_epoch
        self.epoch, self.batch = epoch, batch
        self._generation += 1

    @property
    def executor(self) -> str:
        """The class that decodes and augments (the torch or the DALI executor of the plan)."""
        return f"{type(self.source).__module__}.{type(self.source).__name__}"

    def to_device(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """A batch on the training device with its final uint8 views: with data.augment=device
        the photometric augmentations (and raw shards' y crops) run here, batched."""
        if self.augment == "device":
            return augment_views(batch, device)
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._generation += 1
        return self._batches(self.source.batches((self.epoch, self.batch)), self._generation)

    def _batches(self, made: Iterator[Made], generation: int) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            # Checked before fetching: a retired iterator may share its executor's workers
            # (or pipeline) with its successor and would steal its batches.
            if generation != self._generation:
                raise RuntimeError("this data iterator was retired by a later iter() or load_state_dict()")
            tensors, skipped, resized = next(made)
            self._note_bad(skipped)
            self._note_resized(resized)
            self.batch += 1
            if self.batch == self.steps_per_epoch:
                self._epoch_summary()
                self.epoch, self.batch = self.epoch + 1, 0
            yield tensors

    def _note_bad(self, bad: list[tuple[str, str]]) -> None:
        for path, reason in bad:
            if path in self._bad_paths:
                continue
            self._bad_paths.add(path)
            if len(self._bad_paths) == 1:
                log.warning(
                    "skipped unreadable image %s (%s); it is replaced by the next image of the "
                    "epoch; further skips are counted in the metrics (loader.skipped)", path, reason,
                )
            else:
                self._unreported.append(path)

    def _note_resized(self, resized: list[tuple[str, tuple[int, int]]]) -> None:
        if resized and not self._warned_resize:
            (path, (w, h)), size = resized[0], self._size
            log.warning(
                "pre-cropped data holds images that are not %dx%d (e.g. %s is %dx%d); they get "
                "the ADM center crop to %d (warned once)", size, size, path, w, h, size,
            )
            self._warned_resize = True

    def _epoch_summary(self) -> None:
        if self._unreported:
            log.warning(
                "epoch %d: %d unreadable images skipped so far, %d new since the last report (e.g. %s)",
                self.epoch, self.skipped, len(self._unreported), ", ".join(self._unreported[:3]),
            )
            self._unreported.clear()


def build_loader(
    cfg: DataConfig, image_size: int, views: tuple[str, ...], global_batch: int,
    rank: int = 0, world_size: int = 1, seed: int = 0, device: torch.device | None = None, num_classes: int = 1000,
) -> ImageLoader | SyntheticLoader:
    """This rank's loader of `views` (("x",) or ("x", "y1", "y2")) and labels; data.loader
    picks the executor: "torch", or "dali" on `device` (CPU operators for a CPU device, GPU
    ones for a CUDA device); data.format the source (image files or raw shards), data.augment
    where the augmentations run. Raises DataError (one line) for an unusable data root and
    ConfigError for a combination the executor does not run.
    data.source=synthetic: random images and labels in 0..num_classes-1 instead (no disk)."""
    if cfg.source == "synthetic":
        log.info("data: synthetic (random pixels and labels, %d classes; data.root and data.loader unused)",
                 num_classes)
        return SyntheticLoader(image_size, views, global_batch, num_classes, rank, world_size, seed, device)
    if cfg.loader == "dali" and (cfg.format != "folder" or cfg.augment != "pil"):
        # DALI decodes and augments in its own graph; raw shards need neither, and the torch
        # loader with device augmentation already reads them at ~0.1 ms per image and core.
        raise ConfigError(f"data.loader=dali runs data.format=folder with data.augment=pil only "
                          f"(got format={cfg.format}, augment={cfg.augment}); use data.loader=torch")
    if cfg.decode_draft and cfg.augment != "device":
        raise ConfigError("data.decode_draft=true needs data.augment=device (the PIL path decodes in full)")
    if cfg.decode_draft and cfg.format == "raw":
        raise ConfigError("data.decode_draft=true does not apply to data.format=raw (nothing to decode)")
    if cfg.loader == "dali":
        from epg_fast.data.dali import DaliBatches  # optional dependency: fails before the scan
    elif cfg.loader != "torch":
        raise ValueError(f"data.loader={cfg.loader!r} is not supported; use 'torch' or 'dali'")
    if tuple(views) not in VIEW_SETS:
        raise ValueError(f"unknown views {views!r}; one of {', '.join(map(str, VIEW_SETS))}")
    if image_size <= 0 or global_batch <= 0 or world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"bad loader shape: image_size={image_size} global_batch={global_batch} "
                         f"rank={rank} world_size={world_size}")
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {world_size} ranks")
    if cfg.root is None:
        from epg_fast.data.demo import ensure_demo_data  # lazy: see data/__init__.py

        root = ensure_demo_data()
    else:
        root = cfg.root
    index = _open_source(cfg, root, image_size)
    plan = BatchPlan(index, global_batch, rank, world_size, seed)
    if plan.steps_per_epoch == 0:
        raise DataError(
            f"{index.root} has {len(index)} images, fewer than one global batch of {global_batch}"
        )
    draft = cfg.decode_draft and not cfg.precropped
    if cfg.decode_draft and cfg.precropped:
        log.info("data.decode_draft: off for a pre-cropped tree (R x R files cannot be decoded smaller)")
    source_kind = "raw shards" if cfg.format == "raw" else "pre-cropped files" if cfg.precropped else "files"
    if cfg.augment == "pil":
        where = "pil, in the loader"
    elif cfg.format == "raw":
        where = "device; the loader copies the crops"
    else:
        where = f"device; the loader decodes{' small' if draft else ''} and crops"
    log.info(
        "data: %d images in %d classes under %s (%s; augment: %s), %d steps per epoch",
        len(index), len(index.classes), index.root, source_kind, where, plan.steps_per_epoch,
    )
    with_y = len(views) > 1
    if cfg.loader == "dali":
        # Threads: max(1, data.workers); queue depth: max(1, data.prefetch) batches.
        source: BatchSource = DaliBatches(plan, image_size, with_y, cfg.precropped, threads=max(1, cfg.workers),
                                          prefetch=max(1, cfg.prefetch), device=device or torch.device("cpu"))
    else:
        source = TorchBatches(plan, image_size, with_y, cfg.precropped, workers=cfg.workers, prefetch=cfg.prefetch,
                              augment=cfg.augment, draft=draft)
    return ImageLoader(plan, source, image_size, cfg.augment)


def _open_source(cfg: DataConfig, root, image_size: int) -> ImageIndex | RawShards:
    """The plan's index: the scanned ImageFolder tree, or a raw-shard folder's own index."""
    if cfg.format == "raw":
        shards = RawShards(root)
        if shards.size != image_size:
            raise DataError(f"{shards.root} holds {shards.size}x{shards.size} crops, the model takes {image_size}; "
                            f"write shards at --size {image_size}")
        return shards
    if os.path.isfile(os.path.join(root, SHARD_INDEX)):
        raise DataError(f"{root} is a raw-shard folder ({SHARD_INDEX}); set data.format=raw")
    return scan_image_folder(root, cache=cfg.index_cache)

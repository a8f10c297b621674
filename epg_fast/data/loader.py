"""The torch loader: deterministic, resumable, rank-sharded batches of uint8 views.

A batch is named by its key (epoch, batch number). The sampler hands keys to the workers;
the key alone fixes which images the batch holds (a permutation seeded by (seed, epoch),
global batch k = perm[k*G:(k+1)*G], this rank's contiguous G/W slice) and every random
draw of its augmentations (a generator per sample seeded by (seed, epoch, image index,
hop)). So the output does not depend on the number of workers or their scheduling, and a
resume only needs (epoch, batch): nothing before it is decoded again.

A file that fails to decode is replaced by the next image in the epoch's permutation that
decodes (`hop` counts the steps taken, so the replacement's augmentations differ from the
copy it duplicates); every rank thus keeps G/W samples, which the NCE loss needs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from epg_fast.config import STAGES, DataConfig
from epg_fast.data.index import DataError, ImageIndex, scan_image_folder
from epg_fast.data.views import load_image, make_views

log = logging.getLogger("epg_fast.data")

_U64 = 2**64


class _BatchKeys(Sampler):
    """Yields (epoch, batch) from `start` on, forever."""

    def __init__(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.start = (0, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, batch = self.start
        while True:
            yield epoch, batch
            batch += 1
            if batch == self.steps_per_epoch:
                epoch, batch = epoch + 1, 0


class _ShardBatches(Dataset):
    """Map-style dataset whose item for key (epoch, batch) is this rank's whole batch."""

    def __init__(
        self, index: ImageIndex, image_size: int, with_y: bool, precropped: bool,
        global_batch: int, rank: int, world_size: int, seed: int,
    ) -> None:
        self.index = index
        self.size = image_size
        self.with_y = with_y
        self.precropped = precropped
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.offset = rank * self.local_batch
        self.seed = seed % _U64  # SeedSequence needs non-negative entropy
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache
        self._bad: dict[int, str] = {}  # index -> reason, so a bad file is decoded once per worker

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            state = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
            g = torch.Generator().manual_seed(int(state))
            self._perm = (epoch, torch.randperm(len(self.index), generator=g).numpy())
        return self._perm[1]

    def _load(self, i: int, bad: list[tuple[str, str]]) -> Image.Image | None:
        path = self.index.path(i)
        reason = self._bad.get(i)
        if reason is None:
            try:
                return load_image(path)
            except Exception as e:  # decoders raise many types on corrupt input (OSError, SyntaxError, ...)
                reason = self._bad[i] = f"{type(e).__name__}: {e}"
        bad.append((path, reason))
        return None

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, batch = key
        perm = self.permutation(epoch)
        n, size, b = len(perm), self.size, self.local_batch
        names = ("x", "y1", "y2") if self.with_y else ("x",)
        out = {k: torch.empty((b, 3, size, size), dtype=torch.uint8) for k in names}
        arrays = [out[k].numpy() for k in names]  # views of the tensors: filled in place
        labels = torch.empty(b, dtype=torch.int64)
        bad: list[tuple[str, str]] = []
        resized: list[tuple[str, tuple[int, int]]] = []
        for slot in range(b):
            pos = batch * self.global_batch + self.offset + slot
            # Walk forward in the permutation until a file decodes; give up after a global
            # batch worth of consecutive failures (the tree is then mostly broken).
            for hop in range(min(n, self.global_batch)):
                i = int(perm[(pos + hop) % n])
                img = self._load(i, bad)
                if img is not None:
                    break
            else:
                path, reason = bad[-1]
                raise DataError(
                    f"{min(n, self.global_batch)} files in a row failed to decode under "
                    f"{self.index.root} (last: {path}: {reason})"
                )
            if self.precropped and img.size != (size, size) and not resized:
                resized.append((self.index.path(i), img.size))
            rng = np.random.default_rng([self.seed, epoch, i, hop])
            for arr, view in zip(arrays, make_views(img, size, rng, self.with_y, self.precropped)):
                arr[slot] = np.asarray(view).transpose(2, 0, 1)
            labels[slot] = int(self.index.labels[i])
        out["label"] = labels
        out["_bad"] = bad  # travels back so the main process can count and log
        out["_resized"] = resized
        return out


class ImageLoader:
    """Infinite iterator of this rank's batches, with a resumable position.

    `iter(loader)` starts at the current position (0/0, or what `load_state_dict` set); a
    new `iter()` or `load_state_dict()` retires the previous iterator.
    """

    def __init__(
        self, dataset: _ShardBatches, steps_per_epoch: int, workers: int, prefetch: int
    ) -> None:
        self.num_images = len(dataset.index)
        self.num_classes = len(dataset.index.classes)
        self.classes = dataset.index.classes  # folder names; label = position
        self.steps_per_epoch = steps_per_epoch
        self._dataset = dataset
        self._sampler = _BatchKeys(steps_per_epoch)
        self._loader = DataLoader(
            dataset,
            batch_size=None,  # the dataset builds whole batches: one key -> one batch
            sampler=self._sampler,
            num_workers=workers,
            prefetch_factor=prefetch if workers > 0 else None,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
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
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self._dataset.seed,
            "num_images": self.num_images,
            "global_batch": self._dataset.global_batch,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or batch < 0:
            raise ValueError(f"bad data position epoch={epoch} batch={batch}")
        mine = self.state_dict()
        changed = [k for k in ("seed", "num_images", "global_batch") if k in state and state[k] != mine[k]]
        if changed:
            log.warning(
                "data position comes from a different setup (%s); the sample order will differ "
                "from the original run", ", ".join(f"{k} {state[k]} -> {mine[k]}" for k in changed),
            )
        epoch, batch = epoch + batch // self.steps_per_epoch, batch % self.steps_per_epoch
        self.epoch, self.batch = epoch, batch
        self._generation += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._generation += 1
        self._sampler.start = (self.epoch, self.batch)
        return self._batches(iter(self._loader), self._generation)

    def _batches(self, it: Iterator[dict[str, Any]], generation: int) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            # Checked before fetching: with persistent workers a retired iterator shares the
            # DataLoader's iterator with its successor and would steal its batches.
            if generation != self._generation:
                raise RuntimeError("this data iterator was retired by a later iter() or load_state_dict()")
            batch = next(it)
            self._note_bad(batch.pop("_bad"))
            self._note_resized(batch.pop("_resized"))
            self.batch += 1
            if self.batch == self.steps_per_epoch:
                self._epoch_summary()
                self.epoch, self.batch = self.epoch + 1, 0
            yield batch

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
            (path, (w, h)), size = resized[0], self._dataset.size
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
    cfg: DataConfig, image_size: int, stage: str, global_batch: int,
    rank: int = 0, world_size: int = 1, seed: int = 0, device: torch.device | None = None,
) -> ImageLoader:
    """This rank's loader (data.loader: "torch", or "dali" on `device`); raises DataError
    (one line) for an unusable data root."""
    if cfg.loader == "dali":
        from epg_fast.data.dali import build_dali_loader  # optional dependency

        return build_dali_loader(cfg, image_size=image_size, stage=stage, global_batch=global_batch, rank=rank,
                                 world_size=world_size, seed=seed, device=device or torch.device("cpu"))
    if cfg.loader != "torch":
        raise ValueError(f"data.loader={cfg.loader!r} is not supported; use 'torch' or 'dali'")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
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
    index = scan_image_folder(root, cache=cfg.index_cache)
    steps = len(index) // global_batch
    if steps == 0:
        raise DataError(
            f"{index.root} has {len(index)} images, fewer than one global batch of {global_batch}"
        )
    log.info(
        "data: %d images in %d classes under %s (%s), %d steps per epoch",
        len(index), len(index.classes), index.root,
        "pre-cropped" if cfg.precropped else "raw", steps,
    )
    dataset = _ShardBatches(
        index, image_size, with_y=stage == "pretrain", precropped=cfg.precropped,
        global_batch=global_batch, rank=rank, world_size=world_size, seed=seed,
    )
    return ImageLoader(dataset, steps, cfg.workers, cfg.prefetch)

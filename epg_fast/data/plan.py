"""The batch plan: which image fills each slot of this rank's batch, which image replaces an
unreadable file, and which random generator each slot draws from. The torch and DALI loaders
both execute it, so they hold the same samples with the same random decisions.

A batch is named by its key (epoch, batch number), and the key alone fixes the batch: a
permutation seeded by (seed, epoch), global batch k = perm[k*G:(k+1)*G], this rank's
contiguous G/W slice, and a generator per sample seeded by (seed, epoch, image index, hop).
So a batch does not depend on the number of workers or threads or their scheduling, and a
resume only needs (epoch, batch): nothing before it is decoded again.

A file that fails to load is replaced by the next image in the epoch's permutation that
loads (`hop` counts the steps taken, so the replacement's augmentations differ from the copy
it duplicates); every rank thus keeps G/W samples, which the NCE loss needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import torch

from epg_fast.data.index import DataError, ImageIndex

_U64 = 2**64
T = TypeVar("T")


def unreadable_reason(error: Exception) -> str:
    """How a failed load is reported: "<exception type>: <message>"."""
    return f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class Sample(Generic[T]):
    """One slot of a batch, as planned and loaded."""

    index: int  # the image (position in the index)
    hop: int  # steps walked past unreadable files to reach it (0: the planned image)
    item: T  # what the loader's `read` returned for it
    # Its augmentations draw from this, in views.make_views's order (a `read` that needs the
    # decisions first, such as the decode-small reader, has drawn them already).
    rng: np.random.Generator


class Made(NamedTuple):
    """One batch as an executor hands it to the loader."""

    tensors: dict[str, torch.Tensor]  # the views ("x", and "y1", "y2" in pre-training) and "label"
    skipped: list[tuple[str, str]]  # (path, reason) of the unreadable files met filling it
    resized: list[tuple[str, tuple[int, int]]]  # a pre-cropped-tree image that was not R x R, at most one


class BatchPlan:
    """This rank's share of every batch key: the plan both loaders execute (picklable, no
    state but a cache of the current epoch's permutation)."""

    def __init__(self, index: ImageIndex, global_batch: int, rank: int, world_size: int, seed: int) -> None:
        self.index = index
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.offset = rank * self.local_batch
        self.seed = seed % _U64  # SeedSequence needs non-negative entropy
        self.steps_per_epoch = len(index) // global_batch
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            state = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
            g = torch.Generator().manual_seed(int(state))
            self._perm = (epoch, torch.randperm(len(self.index), generator=g).numpy())
        return self._perm[1]

    def keys(self, start: tuple[int, int]) -> Iterator[tuple[int, int]]:
        """Batch keys (epoch, batch) from `start` on, forever."""
        epoch, batch = start
        while True:
            yield epoch, batch
            batch += 1
            if batch == self.steps_per_epoch:
                epoch, batch = epoch + 1, 0

    def samples(
        self, epoch: int, batch: int, read: Callable[[int, np.random.Generator], T], verdicts: dict[int, str],
        skipped: list[tuple[str, str]],
    ) -> Iterator[Sample[T]]:
        """This rank's samples of batch (epoch, batch), slot by slot.

        `read(i, rng)` loads image i (it may draw from the sample's generator `rng`) and
        raises on an unreadable file. The plan then records why
        in `verdicts` (index -> reason, the caller's: a file found unreadable is not read
        again) and in `skipped` ((path, reason) of every unreadable file met, for the
        report), and walks on to the next image of the permutation; after a global batch
        worth of consecutive failures (the tree is then mostly broken) it raises DataError."""
        perm = self.permutation(epoch)
        n = len(perm)
        hops = min(n, self.global_batch)
        for slot in range(self.local_batch):
            pos = batch * self.global_batch + self.offset + slot
            for hop in range(hops):
                i = int(perm[(pos + hop) % n])
                reason = verdicts.get(i)
                if reason is None:
                    rng = np.random.default_rng([self.seed, epoch, i, hop])
                    try:
                        item = read(i, rng)
                        break
                    except Exception as e:  # decoders raise many types on corrupt input (OSError, SyntaxError, ...)
                        reason = verdicts[i] = unreadable_reason(e)
                skipped.append((self.index.path(i), reason))
            else:
                path, reason = skipped[-1]
                raise DataError(f"{hops} files in a row failed to decode under {self.index.root} "
                                f"(last: {path}: {reason})")
            yield Sample(i, hop, item, rng)

    def state(self) -> dict[str, int]:
        """The setup a data position is valid for (stored with it in checkpoints)."""
        return {"seed": self.seed, "num_images": len(self.index), "global_batch": self.global_batch}

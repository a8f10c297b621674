"""Raw storage: uint8 R x R center crops in memory-mappable shards, read without decoding.

    DST/shard-00000.npy    uint8 [n, R, R, 3] (numpy's .npy: a small header, then the pixels)
    DST/shard-00000.json   the shard's images: relative source paths, labels, failures
    DST/index.npz          the whole set: classes, labels, paths, (shard, slot) per image, R

Shard k holds the decodable images among source images [k*N, (k+1)*N) of the sorted file
index (N = --per-shard), so a shard is a pure function of its source range: writing is
resumable shard by shard (a shard counts as written when its .json exists; the .npy is
renamed into place first). Images that fail to decode are left out and listed.

Reading: `RawShards(DST).image(i)` is an HxWx3 uint8 view into the memory-mapped shard,
~196 KB per image at R=256 (vs ~40-110 KB for a JPEG), no decode. A shard whose file is
missing, short or whose header disagrees with the index raises ShardError (an OSError, so the
loaders' skip-and-count of unreadable files covers it) for each of its images, once checked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os

import numpy as np

from epg_fast.data.index import DataError, ImageIndex
from epg_fast.data.views import center_crop, load_image

log = logging.getLogger("epg_fast.data")

INDEX = "index.npz"
FORMAT_VERSION = 1


class ShardError(OSError):
    """A shard file is missing, short or does not match the index."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _crop_array(task: tuple[str, int]) -> np.ndarray | str:
    """The R x R center crop of one file as HxWx3 uint8, or "path: reason"."""
    path, size = task
    try:
        img = load_image(path)
    except Exception as e:  # decoders raise many types on corrupt input
        return f"{path}: {type(e).__name__}: {e}"
    return np.asarray(center_crop(img, size))


def _write_shard(dst: str, k: int, size: int, rels: list[str], labels: list[int], results) -> list[str]:
    crops, kept, kept_labels, failures = [], [], [], []
    for rel, label, result in zip(rels, labels, results):
        if isinstance(result, str):
            failures.append(result)
        else:
            crops.append(result)
            kept.append(rel)
            kept_labels.append(label)
    name = os.path.join(dst, shard_name(k))
    pixels = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
    with open(f"{name}.npy.tmp", "wb") as f:
        np.save(f, pixels)
    os.replace(f"{name}.npy.tmp", f"{name}.npy")
    with open(f"{name}.json.tmp", "w") as f:
        json.dump({"size": size, "paths": kept, "labels": kept_labels, "failures": failures}, f)
    os.replace(f"{name}.json.tmp", f"{name}.json")
    return failures


def write_shards(index: ImageIndex, dst: str, size: int, per_shard: int, workers: int) -> tuple[int, list[str]]:
    """Write `index`'s images as raw shards under dst; returns (images indexed, failures)."""
    if per_shard <= 0:
        raise ValueError(f"per_shard must be > 0, got {per_shard}")
    os.makedirs(dst, exist_ok=True)
    n = len(index)
    failures: list[str] = []
    shards = (n + per_shard - 1) // per_shard
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for k in range(shards):
            lo, hi = k * per_shard, min(n, (k + 1) * per_shard)
            meta_path = os.path.join(dst, shard_name(k) + ".json")
            if os.path.exists(meta_path):  # written by an earlier run
                with open(meta_path) as f:
                    meta = json.load(f)
                if meta["size"] != size:
                    raise DataError(f"{dst} holds shards of size {meta['size']}, not {size}; use another folder")
                failures += meta["failures"]
                continue
            tasks = [(index.path(i), size) for i in range(lo, hi)]
            results = pool.imap(_crop_array, tasks, chunksize=16) if pool else map(_crop_array, tasks)
            rels = [index.relpath(i) for i in range(lo, hi)]
            failures += _write_shard(dst, k, size, rels, [int(index.labels[i]) for i in range(lo, hi)], results)
            log.info("raw shards: %d/%d", k + 1, shards)
    _write_index(dst, index.classes, size, shards)
    return n, failures


def _write_index(dst: str, classes: list[str], size: int, shards: int) -> None:
    paths, labels, locations = [], [], []
    for k in range(shards):
        with open(os.path.join(dst, shard_name(k) + ".json")) as f:
            meta = json.load(f)
        paths += meta["paths"]
        labels += meta["labels"]
        locations += [(k, slot) for slot in range(len(meta["paths"]))]
    blob = [os.fsencode(p) for p in paths]
    offsets = np.zeros(len(blob) + 1, np.int64)
    np.cumsum([len(b) for b in blob], out=offsets[1:])
    tmp = os.path.join(dst, INDEX + ".tmp.npz")
    np.savez(
        tmp, version=np.int64(FORMAT_VERSION), size=np.int64(size), classes=np.array(classes, dtype=str),
        labels=np.array(labels, np.int64), locations=np.array(locations, np.int64).reshape(-1, 2),
        shard_counts=np.bincount(np.array([k for k, _ in locations], np.int64), minlength=shards),
        path_blob=np.frombuffer(b"".join(blob), np.uint8), path_offsets=offsets,
    )
    os.replace(tmp, os.path.join(dst, INDEX))


class RawShards:
    """Read-only view of a raw-shard folder. Shards are memory-mapped on first use (per
    process: safe to create before forking DataLoader workers)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        path = os.path.join(self.root, INDEX)
        try:
            with np.load(path) as z:
                meta = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise DataError(f"{self.root} is not a raw-shard folder (no {INDEX}; write one with "
                            f"`python -m epg_fast.data.precrop SRC DST --format raw`)") from None
        except Exception as e:  # a truncated or foreign npz
            raise DataError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
        if int(meta["version"]) != FORMAT_VERSION:
            raise DataError(f"{path}: raw-shard format {int(meta['version'])}, this version reads {FORMAT_VERSION}")
        self.size = int(meta["size"])
        self.classes = [str(c) for c in meta["classes"]]
        self.labels = meta["labels"]
        self._locations = meta["locations"]
        self._shard_counts = meta["shard_counts"]
        self._blob = meta["path_blob"].tobytes()
        self._offsets = meta["path_offsets"]
        self._maps: dict[int, np.ndarray | ShardError] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def relpath(self, i: int) -> str:
        """The source file's path relative to the tree it was written from."""
        return os.fsdecode(self._blob[self._offsets[i] : self._offsets[i + 1]])

    def path(self, i: int) -> str:
        """A name for image i in messages: its shard and source path."""
        k, slot = self._locations[i]
        return f"{os.path.join(self.root, shard_name(int(k)))}.npy[{slot}] ({self.relpath(i)})"

    def _shard(self, k: int) -> np.ndarray:
        shard = self._maps.get(k)
        if shard is None:
            shard = self._maps[k] = self._open(k)
        if isinstance(shard, ShardError):
            raise shard
        return shard

    def _open(self, k: int) -> np.ndarray | ShardError:
        name = os.path.join(self.root, shard_name(k) + ".npy")
        expected = (int(self._shard_counts[k]), self.size, self.size, 3)
        try:
            arr = np.load(name, mmap_mode="r")
        except FileNotFoundError:
            return ShardError(f"{name} is missing")
        except (ValueError, OSError) as e:  # numpy: "mmap length is greater than file size", bad header
            return ShardError(f"{name} is short or damaged ({e})")
        if arr.shape != expected or arr.dtype != np.uint8:
            return ShardError(f"{name} holds {arr.dtype} {arr.shape}, the index expects uint8 {expected}")
        return arr

    def image(self, i: int) -> np.ndarray:
        """Image i as an R x R x 3 uint8 view (no copy, no decode); ShardError if its shard is bad."""
        k, slot = self._locations[i]
        return self._shard(int(k))[slot]

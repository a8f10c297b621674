"""Scan an ImageFolder tree (`root/<class>/<image>`) into a compact, validated, cached file
index, shared by the torch and DALI loaders.

Labels are positions in the sorted list of class folders, as ImageNet checkpoints expect, so
a class folder keeps its label even when it holds no image. Paths are stored as one bytes
blob plus offsets rather than a list of 1.28M Python strings: forked DataLoader workers touch
every object's refcount when reading a list, which copies the pages into each worker.

Validation is a header check of every file in parallel threads (PIL identifies the format
and reads the image size without decoding): non-images, empty and unreadable files are
excluded and reported; a file whose header is fine but whose data is cut short is caught
later, at decode, by the loader. The sizes are kept for the evaluation tools (FID refuses a
set of mixed sizes, the pixel probe takes its resolution from them); the DALI loader parses
each header again when it reads the file (its format picks the decoder, and that size is the
one of the bytes it decodes, even for a file rewritten since the scan). The result is cached, by default next to
the data (`root/.epg_index.npz`) or, when the data is read-only, under the epg_fast cache
folder, and reused while the tree has not changed: adding, removing or renaming a file
changes the modification time of its folder, which is what the cache is keyed on (a file
rewritten in place under the same name is not noticed; delete the cache file to force a
rescan).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

log = logging.getLogger("epg_fast.data")

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
)


class DataError(ValueError):
    """A data problem the user must fix; the message is one line and names the path."""


class DataRootNotFoundError(DataError, FileNotFoundError):
    """The data root does not exist."""


@dataclass(frozen=True, eq=False)
class ImageIndex:
    root: str
    classes: list[str]  # class folder names, sorted; the label is the position here
    labels: np.ndarray  # int64 [N]
    sizes: np.ndarray  # int32 [N, 2]: (width, height) from the header; -1 when not validated
    _blob: bytes  # all relative paths, os.fsencode'd, concatenated
    _offsets: np.ndarray  # int64 [N + 1]: path i is _blob[_offsets[i]:_offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.labels)

    def relpath(self, i: int) -> str:
        """`<class>/.../<file>` of image i, relative to the root."""
        return os.fsdecode(self._blob[self._offsets[i] : self._offsets[i + 1]])

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.relpath(i))


def _raise(err: OSError) -> None:
    raise DataError(f"cannot read {err.filename}: {err.strerror}")


def _walk_class(class_dir: str) -> tuple[list[str], list[str], list[str]]:
    """Image files, other files (both sorted, relative to class_dir) and every folder visited."""
    images, others, folders = [], [], []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True, onerror=_raise):
        dirnames.sort()
        folders.append(dirpath)
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), class_dir)
            (images if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS else others).append(rel)
    return images, others, folders


def _header(path: str) -> tuple[int, int] | str:
    """(width, height) from the image header, or why it cannot be an image."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as e:  # PIL raises many types on bad headers (UnidentifiedImageError, OSError, ...)
        return f"{type(e).__name__}: {e}"


def _fingerprint(folders: list[str]) -> list[int]:
    """Modification times of the folders: they change when an entry is added, removed or renamed."""
    return [os.stat(f).st_mtime_ns for f in folders]


def cache_path(root: str, cache: str) -> str | None:
    """Where the index of `root` is cached: `cache` is "auto" (next to the data when it is
    writable, else under $EPG_CACHE_DIR or ~/.cache/epg_fast), "none", or a file path."""
    if cache == "none":
        return None
    if cache != "auto":
        return cache
    if os.access(root, os.W_OK):
        return os.path.join(root, ".epg_index.npz")
    base = os.environ.get("EPG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "epg_fast")
    return os.path.join(base, "index", hashlib.sha1(root.encode()).hexdigest()[:16] + ".npz")


def _load_cached(path: str | None, root: str, classes: list[str], validate: bool) -> ImageIndex | None:
    if path is None or not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            folders = meta["folders"]
            if meta["root"] != root or meta["classes"] != classes or (validate and not meta["validated"]):
                return None
            if _fingerprint([os.path.join(root, f) for f in folders]) != meta["fingerprint"]:
                return None
            return ImageIndex(root, classes, z["labels"], z["sizes"], z["blob"].tobytes(), z["offsets"])
    except (OSError, ValueError, KeyError):  # unreadable, stale format, or a folder gone
        return None


def _save_cache(path: str | None, index: ImageIndex, folders: list[str], validated: bool) -> None:
    if path is None:
        return
    rel = [os.path.relpath(f, index.root) for f in folders]
    meta = {"root": index.root, "classes": index.classes, "folders": rel, "validated": validated,
            "fingerprint": _fingerprint(folders)}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), labels=index.labels,
                     sizes=index.sizes, blob=np.frombuffer(index._blob, np.uint8), offsets=index._offsets)
        os.replace(tmp, path)  # atomic: concurrent ranks each write a complete file
    except OSError as e:
        log.warning("could not cache the file index at %s (%s); the next start scans again", path, e)


def scan_image_folder(
    root: str | os.PathLike, *, validate: bool = True, cache: str = "none", workers: int | None = None
) -> ImageIndex:
    """Index `root/<class>/**/<image>`; raises DataError (one line) on an unusable tree.

    Folders whose name starts with "." are not classes (a stray `.cache` would otherwise
    shift every label). Files with a non-image extension are ignored and reported once; with
    `validate`, files whose header is not an image's are excluded and reported once. `cache`:
    see `cache_path` (the loaders pass data.index_cache, "auto" by default).
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.exists(root):
        raise DataRootNotFoundError(f"data root does not exist: {root}")
    if not os.path.isdir(root):
        raise DataError(f"data root is not a directory: {root}")
    try:
        classes = sorted(
            e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
        )
    except OSError as e:
        raise DataError(f"cannot read data root {root}: {e.strerror}") from None
    if not classes:
        raise DataError(f"no class folders in {root}: expected {root}/<class>/<image>")
    where = cache_path(root, cache)
    cached = _load_cached(where, root, classes, validate)
    if cached is not None:
        log.info("file index: %d images reused from %s (the tree has not changed)", len(cached), where)
        return cached

    start = time.perf_counter()
    rel_paths: list[str] = []
    labels: list[int] = []
    ignored: list[str] = []
    empty: list[str] = []
    folders: list[str] = []  # not root itself: writing the cache there changes its mtime (the class list covers it)
    for label, name in enumerate(classes):
        images, others, visited = _walk_class(os.path.join(root, name))
        rel_paths += [os.path.join(name, p) for p in images]
        labels += [label] * len(images)
        ignored += [os.path.join(name, p) for p in others]
        folders += visited
        if not images:
            empty.append(f"{name} (label {label})")
    if ignored:
        log.warning("ignored %d non-image files under %s (e.g. %s)", len(ignored), root, ", ".join(ignored[:3]))
    if empty:
        log.warning(
            "%d class folders under %s hold no images but keep their label: %s",
            len(empty), root, ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""),
        )

    exts = " ".join(sorted(IMAGE_EXTENSIONS))
    if not rel_paths:
        raise DataError(f"no images ({exts}) in the {len(classes)} class folders under {root}")
    sizes = np.full((len(rel_paths), 2), -1, dtype=np.int32)
    if validate and rel_paths:
        threads = workers or min(32, 4 * (os.cpu_count() or 1))  # header reads wait on I/O
        with ThreadPoolExecutor(threads) as pool:
            headers = list(pool.map(_header, (os.path.join(root, p) for p in rel_paths), chunksize=256))
        bad = [(p, h) for p, h in zip(rel_paths, headers) if isinstance(h, str)]
        if bad:
            log.warning("excluded %d files under %s that are not readable images (e.g. %s)", len(bad), root,
                        "; ".join(f"{p}: {why}" for p, why in bad[:3]))
        keep = [i for i, h in enumerate(headers) if not isinstance(h, str)]
        rel_paths, labels = [rel_paths[i] for i in keep], [labels[i] for i in keep]
        sizes = np.array([headers[i] for i in keep], dtype=np.int32).reshape(-1, 2)
    if not rel_paths:
        raise DataError(f"no readable images under {root}: all {len(bad)} image files failed the header check")

    encoded = [os.fsencode(p) for p in rel_paths]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in encoded], out=offsets[1:])
    index = ImageIndex(root, classes, np.asarray(labels, dtype=np.int64), sizes, b"".join(encoded), offsets)
    seconds = time.perf_counter() - start
    log.info("file index: %d images in %d classes scanned%s in %.2f s (%.0f files/s)", len(index), len(classes),
             " and header-checked" if validate else "", seconds, (len(index) + len(ignored)) / max(seconds, 1e-9))
    _save_cache(where, index, folders, validate)
    return index


def scan_labelled_folder(root: str | os.PathLike, cache: str = "auto") -> ImageIndex:
    """`scan_image_folder` for evaluation sets (probe, FID reference), where a class folder
    without images is a mistake (a wrong or half-unpacked folder), not a kept label."""
    index = scan_image_folder(root, cache=cache)
    counts = np.bincount(index.labels, minlength=len(index.classes))
    if (counts == 0).any():
        empty = [c for c, n in zip(index.classes, counts) if n == 0]
        raise DataError(f"class folder {os.path.join(index.root, empty[0])} holds no images "
                        f"({len(empty)} of {len(index.classes)} classes are empty)")
    return index

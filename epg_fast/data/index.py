"""Scan an ImageFolder tree (`root/<class>/<image>`) into a compact, validated file index.

Labels are positions in the sorted list of class folders, as ImageNet checkpoints expect, so
a class folder keeps its label even when it holds no image. Paths are stored as one bytes
blob plus offsets rather than a list of 1.28M Python strings: forked DataLoader workers touch
every object's refcount when reading a list, which copies the pages into each worker.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

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
    _blob: bytes  # all relative paths, os.fsencode'd, concatenated
    _offsets: np.ndarray  # int64 [N + 1]: path i is _blob[_offsets[i]:_offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.labels)

    def relpath(self, i: int) -> str:
        """`<class>/.../<file>` of image i, relative to the root."""
        return os.fsdecode(self._blob[self._offsets[i] : self._offsets[i + 1]])

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.relpath(i))


def _walk_class(class_dir: str) -> tuple[list[str], list[str]]:
    """Image and non-image files under one class folder (recursively), both sorted."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True, onerror=_raise):
        dirnames.sort()
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), class_dir)
            (images if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS else others).append(rel)
    return images, others


def _raise(err: OSError) -> None:
    raise DataError(f"cannot read {err.filename}: {err.strerror}")


def scan_image_folder(root: str | os.PathLike) -> ImageIndex:
    """Index `root/<class>/**/<image>`; raises DataError (one line) on an unusable tree.

    Folders whose name starts with "." are not classes (a stray `.cache` would otherwise
    shift every label). Files with a non-image extension are ignored and reported once.
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

    rel_paths: list[bytes] = []
    labels: list[int] = []
    ignored: list[str] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        images, others = _walk_class(os.path.join(root, name))
        rel_paths += [os.fsencode(os.path.join(name, p)) for p in images]
        labels += [label] * len(images)
        ignored += [os.path.join(name, p) for p in others]
        if not images:
            empty.append(f"{name} (label {label})")

    if not rel_paths:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images ({exts}) in the {len(classes)} class folders under {root}")
    if ignored:
        log.warning(
            "ignored %d non-image files under %s (e.g. %s)",
            len(ignored), root, ", ".join(ignored[:3]),
        )
    if empty:
        log.warning(
            "%d class folders under %s hold no images but keep their label: %s",
            len(empty), root, ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""),
        )
    offsets = np.zeros(len(rel_paths) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in rel_paths], out=offsets[1:])
    return ImageIndex(
        root=root,
        classes=classes,
        labels=np.asarray(labels, dtype=np.int64),
        _blob=b"".join(rel_paths),
        _offsets=offsets,
    )

"""Real photographs for the data tests: a subset of the Imagenette archive (see
../shared/data/README.md), unpacked into a temporary folder; tests skip when it is absent."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

ARCHIVE = Path(os.environ.get("EPG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / (
    "imagenette-224-jpg.tar.gz"
)


def unpack_imagenette(dest: Path, every: int = 30) -> Path:
    """Every `every`-th train JPEG of the archive (all ten classes; ~316 files for 30) as an
    ImageFolder tree under dest; skips the calling test when the archive is missing."""
    if not ARCHIVE.is_file():
        pytest.skip(f"real photographs not available ({ARCHIVE} is missing)")
    root = dest / "imagenette"
    count = 0
    with tarfile.open(ARCHIVE) as tar:
        for member in tar:
            if not (member.isfile() and member.name.startswith("train/") and member.name.endswith(".JPEG")):
                continue
            count += 1
            if count % every:
                continue
            out = root / member.name.removeprefix("train/")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
    return root

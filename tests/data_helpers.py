"""Helpers shared by the data tests (torch and DALI loaders)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def noise(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A w x h RGB image of uniform noise."""
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    """The next n batches of a fresh iterator."""
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    """Two lists of batches are equal, bit for bit."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def deny_open(monkeypatch, suffix: str, *modules) -> None:
    """Make `open` in these modules raise PermissionError for paths ending in `suffix`, as a
    mode-000 file does for a user (root reads it, and the tests may run as root)."""
    real_open = open

    def denying_open(path, *args, **kwargs):
        if str(path).endswith(suffix):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    for module in modules:
        monkeypatch.setattr(module, "open", denying_open, raising=False)

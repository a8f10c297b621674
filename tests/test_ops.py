"""The dispatch seam: kernel mode from config or EPG_KERNELS, per-device path choice."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from epg_fast import ops
from epg_fast.config import Config


@pytest.fixture(autouse=True)
def restore_mode():
    yield
    ops.set_kernels("auto")


def test_auto_uses_references_on_cpu_and_kernels_on_cuda():
    assert ops.set_kernels("auto") == "auto"
    assert ops.kernels_for(torch.device("cpu")) == "reference"
    assert ops.kernels_for(torch.device("cuda", 0)) == "triton"


def test_reference_mode_everywhere():
    ops.set_kernels("reference")
    assert ops.kernels_for(torch.device("cuda", 0)) == "reference"


def test_environment_overrides_config(monkeypatch):
    monkeypatch.setenv("EPG_KERNELS", "reference")
    assert ops.set_kernels("triton") == "reference"
    monkeypatch.setenv("EPG_KERNELS", "fast")
    with pytest.raises(ValueError, match="must be one of"):
        ops.set_kernels("auto")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    ops.set_kernels("triton")
    monkeypatch.setattr(ops, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.kernels_for(torch.device("cpu"))
    monkeypatch.setattr(ops, "_INTERPRET", True)
    assert ops.kernels_for(torch.device("cpu")) == "triton"


def test_readme_documents_every_config_key():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)?)`", readme))

    def keys(section, prefix=""):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                yield from keys(value, f"{f.name}.")
            elif f.name != "name":
                yield prefix + f.name

    missing = [k for k in keys(Config()) if k not in documented]
    assert not missing, f"config keys missing from the README's reference: {missing}"

"""Without a GPU, the fused Triton kernels are tested through the Triton interpreter. The
variable must be set before any `@triton.jit` decorator runs, i.e. before the first import of
a kernel module, and this file is imported by pytest before every test module."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The embedded demo data set, written once per test session into a temporary folder."""
    from epg_fast.data import ensure_demo_data

    return ensure_demo_data(tmp_path_factory.mktemp("cache") / "demo")


def pytest_configure(config):
    config.addinivalue_line("markers", "ci: an end-to-end smoke run sized for CI (~2 minutes on 2 idle cores); "
                                       "select with -m ci")


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot write into: chmod 555 for a normal user; for root (whom
    permissions do not stop) /sys, where sysfs refuses new files."""
    from pathlib import Path

    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        (Path("/sys") / ".epg_probe").write_bytes(b"x")
    except OSError:
        return Path("/sys")
    pytest.skip("no unwritable folder available to root here")

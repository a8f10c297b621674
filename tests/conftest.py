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

"""optim.impl: the AdamW kernels agree with torch's for-loop AdamW; unavailable ones fail in one line."""

import logging

import pytest
import torch

from epg_fast.config import ConfigError
from epg_fast.optimizers import adamw as build_optimizer

CPU = torch.device("cpu")


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(17, 5), (5,), (3, 4, 2)]]


def _run(make_optimizer, steps: int = 6) -> list[torch.Tensor]:
    """Two groups (decay / no decay), a few steps with fixed gradients; the final parameters."""
    params = _params()
    opt = make_optimizer([{"params": params[:2], "weight_decay": 0.05}, {"params": params[2:], "weight_decay": 0.0}])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def _reference(groups):
    # torch's default path on CPU tensors: the for-loop (single-tensor) AdamW
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False)


def test_torch_impl_on_cpu_is_foreach_adamw_bit_for_bit_the_for_loop(caplog):
    with caplog.at_level(logging.INFO, logger="epg_fast"):
        got = _run(lambda groups: build_optimizer(groups, "torch", 1e-2, (0.9, 0.95), CPU))
    assert "torch.optim.AdamW (foreach)" in caplog.text
    for a, b in zip(got, _run(_reference)):
        assert torch.equal(a, b)  # measured: foreach on CPU rounds exactly as the for-loop


def test_torch_impl_keeps_each_groups_weight_decay():
    params = _params()
    opt = build_optimizer([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:]}], "torch", 1e-3,
                          (0.9, 0.999), CPU, weight_decay=0.0)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


def test_deepspeed_impl_on_cpu_matches_torch_adamw_or_fails_in_one_line(caplog):
    try:
        with caplog.at_level(logging.INFO, logger="epg_fast"):
            got = _run(lambda groups: build_optimizer(groups, "deepspeed", 1e-2, (0.9, 0.95), CPU))
    except ConfigError as err:  # no compiler / ninja here: the error must say so in one line
        assert "\n" not in str(err) and str(err).startswith("optim.impl=deepspeed")
        pytest.skip(f"DeepSpeed's CPU FusedAdam op is not buildable here: {err}")
    assert "deepspeed.ops.adam.FusedAdam" in caplog.text
    for a, b in zip(got, _run(_reference)):  # another kernel, its own rounding: 7e-7 apart measured
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_apex_impl_fails_in_one_line_without_cuda_or_apex():
    with pytest.raises(ConfigError, match=r"^optim.impl=apex needs CUDA") as err:
        build_optimizer(_params(), "apex", 1e-3, (0.9, 0.95), CPU)
    assert "\n" not in str(err.value)


def test_apex_impl_without_apex_names_the_missing_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "apex", None)  # `import apex` raises ImportError
    with pytest.raises(ConfigError, match=r"^optim.impl=apex: apex is not importable") as err:
        build_optimizer(_params(), "apex", 1e-3, (0.9, 0.95), torch.device("cuda"))
    assert "\n" not in str(err.value)


def test_unknown_impl_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.impl must be one of torch, deepspeed, apex, got 'adam8bit'"):
        build_optimizer(_params(), "adam8bit", 1e-3, (0.9, 0.95), CPU)

"""The dispatch seam between the model and its kernels.

Every memory-bound op around the matrix multiplies goes through one function here:
layer_norm (plain or AdaLN-modulated), patch_embed, attention and ema_update. The model
calls these and never asks which device or kernel path it runs on; this module decides.
Today the ops run their PyTorch references from `epg_fast.kernels`; the fused Triton
versions slot in here without touching the model. Which path runs is logged once per op.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from epg_fast.kernels.ema import ema_reference
from epg_fast.kernels.layer_norm import layer_norm_reference
from epg_fast.kernels.patch_embed import patch_embed_reference

log = logging.getLogger("epg_fast")

try:  # optional: flash-attn 2 (needs CUDA to build)
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

_ATTENTION_MODES = ("auto", "flash", "sdpa")
_attention_mode = os.environ.get("EPG_ATTENTION", "auto")
_seen: dict[str, str] = {}


def _record(op: str, path: str) -> None:
    """Log the path an op took, the first time and whenever it changes."""
    if _seen.get(op) != path:
        _seen[op] = path
        log.info("op %-11s -> %s", op, path)


def paths() -> dict[str, str]:
    """The path each op has taken so far (for the start-up block and the benchmarks)."""
    return dict(_seen)


def set_attention(mode: str) -> None:
    """`auto` (flash-attn when importable and usable, else SDPA), `flash` or `sdpa`."""
    global _attention_mode
    if mode not in _ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {_ATTENTION_MODES}, got {mode!r}")
    if mode == "flash" and flash_attn_func is None:
        raise RuntimeError("model.attention=flash but flash-attn is not installed")
    _attention_mode = mode


def attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend `attention` will use for tensors of this device and dtype."""
    flash_ok = flash_attn_func is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if _attention_mode == "flash" and not flash_ok:
        raise RuntimeError(f"flash-attn cannot run on {device.type} tensors of dtype {dtype}")
    return "flash-attn" if flash_ok and _attention_mode != "sdpa" else "sdpa"


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention with scale head_dim^-0.5. q, k, v: [B, T, H, hd] -> [B, T, H, hd]."""
    backend = attention_backend(q.device, q.dtype)
    _record("attention", backend)
    if backend == "flash-attn":
        return flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """LN(x) * (1 + scale) + shift with fp32 statistics; plain LayerNorm without shift/scale."""
    _record("layer_norm" if shift is None and scale is None else "adaln_norm", "reference")
    return layer_norm_reference(x, weight, bias, eps, shift, scale)


def patch_embed(
    x: Tensor, weight: Tensor, bias: Tensor | None, c_in: Tensor | None = None, pos: Tensor | None = None
) -> Tensor:
    """[B, C, H, W] -> [B, L, D]: patchify + linear, with optional input scale and pos add."""
    _record("patch_embed", "reference")
    return patch_embed_reference(x, weight, bias, c_in, pos)


def ema_update(targets: list[Tensor], onlines: list[Tensor], rate: float) -> None:
    """In place: target = rate * target + (1 - rate) * online, for all pairs at once."""
    _record("ema", "reference (torch._foreach_lerp_)")
    ema_reference(targets, onlines, rate)

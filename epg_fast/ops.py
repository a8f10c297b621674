"""The dispatch seam between the model and its kernels.

Every memory-bound op around the matrix multiplies goes through one method of an `Ops`:
layer_norm (plain or AdaLN-modulated), gated_layer_norm (a residual update, gated in the
decoder, fused with the next LayerNorm), patch_embed, attention and ema_update. A model receives its `Ops` at
construction and never asks which device or kernel path it runs on; the `Ops` decides, per
call, from its kernel mode and the tensors' device:

- `auto` (default): the fused Triton kernels for CUDA tensors, the PyTorch references
  otherwise;
- `triton`: always the kernels (on CPU only under the Triton interpreter, TRITON_INTERPRET=1,
  which is how CI tests them);
- `reference`: always the references.

The trainer builds its `Ops` once with `Ops.from_config` (model.kernels and model.attention,
with the environment variable EPG_KERNELS overriding the kernel mode: the one place that
reads it). An `Ops` records the path each op took, logs it the first time and whenever it
changes, and shows it through `paths()` (the start-up block, the benchmarks).

Under autocast a LayerNorm whose output feeds a matrix multiply writes it in the autocast
dtype directly (`autocast_dtype`, the one place that reads the autocast state for them):
the matmul would cast it to that dtype anyway, so the values are the same and the bytes
written and read again are half those of fp32.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from epg_fast.kernels import ema as ema_kernels
from epg_fast.kernels import layer_norm as ln_kernels
from epg_fast.kernels import patch_embed as pe_kernels

log = logging.getLogger("epg_fast")

try:  # optional: flash-attn 2 (needs CUDA to build)
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

KERNEL_MODES = ("auto", "triton", "reference")
ATTENTION_MODES = ("auto", "flash", "sdpa", "cudnn", "efficient", "math")
# model.attention modes that pin one backend of torch's scaled_dot_product_attention.
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,  # cuDNN's fused attention (Hopper: its own sm_90 kernels)
    "efficient": SDPBackend.EFFICIENT_ATTENTION,  # the memory-efficient (xFormers-derived) kernel
    "math": SDPBackend.MATH,  # the unfused reference, any device
}
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Ops:
    """The kernel and attention modes of one model (or run), and the paths its ops took."""

    kernel_mode: str = "auto"  # model.kernels: see the module docstring
    attention_mode: str = "auto"  # model.attention: see ATTENTION_MODES and `attention_backend`
    _taken: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kernel_mode not in KERNEL_MODES:
            raise ValueError(f"kernel mode (model.kernels or EPG_KERNELS) must be one of {KERNEL_MODES}, got {self.kernel_mode!r}")
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {self.attention_mode!r}")
        if self.attention_mode == "flash" and flash_attn_func is None:
            raise RuntimeError("model.attention=flash but flash-attn is not installed")

    @classmethod
    def from_config(cls, kernels: str = "auto", attention: str = "auto") -> Ops:
        """A run's Ops from model.kernels and model.attention; EPG_KERNELS, when set, wins."""
        return cls(os.environ.get("EPG_KERNELS") or kernels, attention)

    def __deepcopy__(self, memo: dict) -> Ops:
        # A copied model (the EMA shadow) shares its original's modes and record of paths.
        return self

    def paths(self) -> dict[str, str]:
        """The path each op has taken so far."""
        return dict(self._taken)

    def _record(self, op: str, path: str) -> None:
        if torch.compiler.is_compiling():  # logging would break the graph; eager calls record the path
            return
        if self._taken.get(op) != path:
            self._taken[op] = path
            log.info("op %-16s -> %s", op, path)

    def kernels_for(self, device: torch.device) -> str:
        """'triton' or 'reference': the path the ops take for tensors on `device`."""
        if self.kernel_mode == "reference":
            return "reference"
        if device.type == "cuda":
            return "triton"
        if self.kernel_mode == "triton":
            if not _INTERPRET:
                raise RuntimeError("kernels=triton on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)")
            return "triton"
        return "reference"

    def attention_backend(self, device: torch.device, dtype: torch.dtype | None) -> str:
        """The backend `attention` uses for tensors of this device and dtype: `flash-attn`,
        `sdpa` (torch picks its kernel), or `sdpa-cudnn` / `sdpa-efficient` / `sdpa-math`
        (one SDPA backend pinned). `auto` is flash-attn when importable and usable, else sdpa."""
        mode = self.attention_mode
        flash_ok = flash_attn_func is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        if mode == "flash" and not flash_ok:
            raise RuntimeError(f"flash-attn cannot run on {device.type} tensors of dtype {dtype}")
        if mode in ("cudnn", "efficient") and device.type != "cuda":
            raise RuntimeError(f"model.attention={mode} needs CUDA tensors (a CUDA-only SDPA backend), got {device.type}")
        if mode in SDPA_BACKENDS:
            return f"sdpa-{mode}"
        return "flash-attn" if flash_ok and mode != "sdpa" else "sdpa"

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Softmax attention with scale head_dim^-0.5. q, k, v: [B, T, H, hd] -> [B, T, H, hd]."""
        backend = self.attention_backend(q.device, q.dtype)
        self._record("attention", backend)
        if backend == "flash-attn":
            return flash_attn_func(q, k, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if backend == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # one backend pinned: torch raises if it cannot run these inputs, never falls back
            with sdpa_kernel(SDPA_BACKENDS[self.attention_mode]):
                out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)

    @staticmethod
    def autocast_dtype(x: Tensor) -> torch.dtype | None:
        """The dtype a matmul casts x to under autocast on x's device; None without autocast."""
        device = x.device.type  # `meta` (FLOP counting) has no autocast state to ask
        on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        return torch.get_autocast_dtype(device) if on else None

    def layer_norm(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
        shift: Tensor | None = None, scale: Tensor | None = None, *, feeds_matmul: bool = True,
    ) -> Tensor:
        """LN(x) * (1 + scale) + shift with fp32 statistics; plain LayerNorm without shift/scale.

        The output has x's dtype, or under autocast the autocast dtype when it feeds a matmul
        (feeds_matmul=False: a feature read in fp32, e.g. by a loss, keeps x's dtype)."""
        path = self.kernels_for(x.device)
        self._record("layer_norm" if shift is None and scale is None else "adaln_norm", path)
        fn = ln_kernels.layer_norm_triton if path == "triton" else ln_kernels.layer_norm_reference
        return fn(x, weight, bias, eps, shift, scale, out_dtype=self.autocast_dtype(x) if feeds_matmul else None)

    def gated_layer_norm(
        self, x: Tensor, gate: Tensor | None, h: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
        shift: Tensor | None = None, scale: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """r = x + gate * h (gate None: x + h) and y = LN(r) * (1 + scale) + shift, in one
        pass: returns (r, y). r has x's dtype; y feeds a matmul (see `layer_norm`)."""
        path = self.kernels_for(x.device)
        self._record("residual_norm" if gate is None else "gated_adaln_norm", path)
        fn = ln_kernels.gated_layer_norm_triton if path == "triton" else ln_kernels.gated_layer_norm_reference
        return fn(x, gate, h, weight, bias, eps, shift, scale, out_dtype=self.autocast_dtype(x))

    def cat_for_matmul(self, tensors: list[Tensor], dim: int = -1) -> Tensor:
        """torch.cat of a matmul's input. Under autocast each piece is cast to the autocast
        dtype first: the same values as concatenating (promoted to the widest dtype, fp32)
        and letting the matmul cast the result, without writing and reading it in fp32."""
        dtype = self.autocast_dtype(tensors[0])
        return torch.cat(tensors if dtype is None else [t.to(dtype) for t in tensors], dim)

    def patch_embed(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, c_in: Tensor | None = None, pos: Tensor | None = None
    ) -> Tensor:
        """[B, C, H, W] -> [B, L, D]: patchify + linear, with optional input scale and pos add."""
        path = self.kernels_for(x.device)
        self._record("patch_embed", path)
        # The kernel reads the autocast state itself (GEMM operands in the autocast dtype, as F.conv2d).
        fn = pe_kernels.patch_embed_triton if path == "triton" else pe_kernels.patch_embed_reference
        return fn(x, weight, bias, c_in, pos)

    def ema_update(self, targets: list[Tensor], onlines: list[Tensor], rate: float) -> None:
        """In place: target = rate * target + (1 - rate) * online, for all pairs at once."""
        if not targets:
            return
        path = self.kernels_for(targets[0].device)
        self._record("ema", path if path == "triton" else "reference (torch._foreach_lerp_)")
        fn = ema_kernels.ema_triton if path == "triton" else ema_kernels.ema_reference
        fn(targets, onlines, rate)

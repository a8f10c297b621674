"""DiT (Peebles & Xie, 2023), the latent-space baseline, built from this project's modules so
that it runs in the same harness (kernels, FLOP counter, benchmarks) as EPG.

    x [B, 4, I, I] (SD-VAE latent; I = 32 at 256 px, 64 at 512 px), t [B], y [B]
      -> patchify + fixed sin-cos position -> N adaLN-Zero blocks conditioned on
         c = t_embedder(t) + y_embedder(y) -> adaLN final layer -> unpatchify
      -> [B, 8, I, I]: the noise prediction and the (learned) variance, 4 channels each

Differences from EPG's decoder block: DiT's LayerNorms have no weight or bias (the
modulation is the only affine part), its qkv projection has a bias, and its MLP uses the
tanh approximation of GELU. Module names follow DiT's where the structure allows
(x_embedder.proj, blocks.i.attn.qkv, blocks.i.adaLN_modulation.1, final_layer.linear, ...).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from epg_fast import schedule
from epg_fast.models import encoder
from epg_fast.ops import Ops

LN_EPS = 1e-6  # DiT's LayerNorms (elementwise_affine=False, eps=1e-6)
FREQ_DIM = 256  # width of the sinusoidal timestep embedding fed to the timestep MLP


class Preset(NamedTuple):
    depth: int
    dim: int
    heads: int
    params: float  # published parameter count (patch 2, 256 px)


DIT_PRESETS: dict[str, Preset] = {
    "DiT-S": Preset(12, 384, 6, 33e6),
    "DiT-B": Preset(12, 768, 12, 130e6),
    "DiT-L": Preset(24, 1024, 16, 458e6),
    "DiT-XL": Preset(28, 1152, 16, 675e6),
}


class Attention(encoder.Attention):
    """The encoder's attention with a biased qkv projection (timm's qkv_bias=True, as DiT)."""

    def __init__(self, dim: int, heads: int, *, ops: Ops) -> None:
        super().__init__(dim, heads, ops=ops)
        self.qkv = nn.Linear(dim, 3 * dim)


class MLP(encoder.MLP):
    """fc1 -> GELU (tanh approximation, as DiT) -> fc2."""

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    """t [B] (diffusion step, float) -> [B, dim]: sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        # schedule.time_embedding is DiT's embedding: cos half first, max period 10000.
        freqs = schedule.time_embedding(t, FREQ_DIM)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + gate_a * Attn(modulate(LN(x))), then the same for the MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, *, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.attn = Attention(dim, heads, ops=ops)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = self.ops.layer_norm(x, None, None, LN_EPS, shift_a, scale_a)
        # x + gate_a * Attn(...) and the MLP's modulated LN of that sum, in one pass.
        x, h = self.ops.gated_layer_norm(x, gate_a, self.attn(h), None, None, LN_EPS, shift_m, scale_m)
        return x + gate_m[:, None] * self.mlp(h)


class FinalLayer(nn.Module):
    """modulate(LN(x)) with (shift, scale) from c, then Linear to one patch of every channel."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, *, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.ops.layer_norm(x, None, None, LN_EPS, shift, scale))


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """[grid*grid, dim] fixed 2-D embedding, patches in row-major order, as DiT (from MAE):
    the first half embeds the column coordinate, the second the row; each half is sin then
    cos of the coordinate at frequencies 10000^(-k / (dim/4)), k < dim/4."""
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def embed(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1).double() * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class DiT(nn.Module):
    """forward(x, t, y) -> [B, out_channels, I, I].

    x: latents [B, in_channels, I, I]; t: diffusion timesteps [B] (float, e.g. 0..999);
    y: class labels [B] in 0..num_classes, where num_classes is the "no class" label of
    classifier-free guidance. Label dropout is the caller's (as in the EPG trainer), so the
    forward pass is deterministic.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        dim: int = 1152,
        depth: int = 28,
        heads: int = 16,
        in_channels: int = 4,
        num_classes: int = 1000,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        ops: Ops | None = None,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch_size}")
        self.input_size, self.patch_size = input_size, patch_size
        self.ops = ops = ops or Ops()  # shared by every module; holds no weights
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = encoder.PatchEmbed(patch_size, dim, in_channels, ops=ops)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = nn.Embedding(num_classes + 1, dim)  # last row: "no class"
        # A buffer: fixed, saved with the model, never trained or counted as a parameter.
        self.register_buffer("pos_embed", sincos_pos_embed(dim, input_size // patch_size)[None])
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio, ops=ops) for _ in range(depth))
        self.final_layer = FinalLayer(dim, patch_size, self.out_channels, ops=ops)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # whole matrix, qkv included, as DiT
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight  # xavier as for a Linear of fan_in C p p
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero.
        for modulation in [b.adaLN_modulation for b in self.blocks] + [self.final_layer.adaLN_modulation]:
            nn.init.zeros_(modulation[1].weight)
            nn.init.zeros_(modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        x = self.x_embedder(x, None, self.pos_embed)  # no input scale; pos added in the GEMM epilogue
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, L, p*p*C] with each patch vector laid out (p1, p2, channel) -> [B, C, I, I]."""
        B, p, g, C = x.shape[0], self.patch_size, self.input_size // self.patch_size, self.out_channels
        x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, g * p, g * p)


def build_dit(name: str, input_size: int = 32, num_classes: int = 1000, ops: Ops | None = None) -> DiT:
    """A DiT from its name, preset/patch: build_dit("DiT-XL/2") (256 px), build_dit("DiT-XL/2", 64) (512 px)."""
    preset, _, patch = name.partition("/")
    if preset not in DIT_PRESETS or not patch.isdigit():
        raise ValueError(f"DiT name must be PRESET/PATCH with PRESET one of {', '.join(DIT_PRESETS)}, got {name!r}")
    p = DIT_PRESETS[preset]
    return DiT(input_size, int(patch), p.dim, p.depth, p.heads, num_classes=num_classes, ops=ops)

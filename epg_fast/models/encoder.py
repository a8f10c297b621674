"""The EPG encoder: a pre-norm ViT conditioned on the noise level, plus the pre-training
projector (EPG_SPEC section 2).

Token sequence: [cls x T, time, patch_1 .. patch_L] + a learned position embedding. The
network takes the noisy image x_t and its shifted level t and applies the preconditioning
itself (it sees c_in(t) * x_t and the time token of c_noise(t)).

Parameter names follow the reference implementation (patch_embed.proj, blocks.i.attn.qkv,
projection_head.0 ...) so its checkpoints map one to one. Compute goes through
the model's `epg_fast.ops.Ops` (given at construction, shared by every module), which picks
fused kernels or references; the modules here own parameters.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from epg_fast import schedule
from epg_fast.ops import Ops

# name: (blocks, width, heads) of the encoder; the XL/XXL/G encoders are ViT-B.
ENCODER_PRESETS: dict[str, tuple[int, int, int]] = {
    "ViT-B": (12, 768, 12),
    "EPG-L": (16, 1024, 16),
    "EPG-XL": (12, 768, 12),
    "EPG-XXL": (12, 768, 12),
    "EPG-G": (12, 768, 12),
}

LN_EPS = 1e-5  # the reference builds every LayerNorm with torch's default epsilon


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm's parameters, computed through Ops.layer_norm (fp32 statistics)."""

    def __init__(self, dim: int, *, ops: Ops) -> None:
        super().__init__(dim, eps=LN_EPS)
        self.ops = ops

    def forward(self, x: Tensor, feeds_matmul: bool = True) -> Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps, feeds_matmul=feeds_matmul)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0, *, ops: Ops) -> None:
        super().__init__()
        self.heads, self.ops = heads, ops
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)  # on the output projection, as the reference's proj_drop

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).unbind(2)
        return self.drop(self.proj(self.ops.attention(q, k, v).reshape(B, T, D)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)  # after the activation and after fc2, as the reference

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0, *, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.norm1 = LayerNorm(dim, ops=ops)
        self.attn = Attention(dim, heads, dropout, ops=ops)
        self.norm2 = LayerNorm(dim, ops=ops)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor) -> Tensor:
        # x + Attn(LN(x)) and the MLP's LayerNorm of that sum, in one pass.
        x, h = self.ops.gated_layer_norm(x, None, self.attn(self.norm1(x)), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        return x + self.mlp(h)


class PatchEmbed(nn.Module):
    """Holds a Conv2d's parameters (kernel = stride = p); computes through Ops.patch_embed."""

    def __init__(self, patch_size: int, dim: int, channels: int = 3, *, ops: Ops) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.ops = ops

    def forward(self, x: Tensor, c_in: Tensor | None, pos: Tensor | None) -> Tensor:
        return self.ops.patch_embed(x, self.proj.weight, self.proj.bias, c_in, pos)


class Encoder(nn.Module):
    """Noise-conditioned ViT. forward(x_t, t) -> tokens [B, T+1+L, D] before the final norm.

    The EPG model (models/epg.py) extends this class, so its encoder parameters keep these
    names at the top level of its state dict, as in the reference checkpoints. `ops` (default:
    Ops(), the `auto` modes) is shared by all its modules; it holds no weights."""

    def __init__(
        self, image_size: int, patch_size: int, dim: int, depth: int, heads: int,
        mlp_ratio: float = 4.0, cls_tokens: int = 1, dropout: float = 0.0, ops: Ops | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.patch_size, self.cls_tokens = dim, patch_size, cls_tokens
        self.ops = ops = ops or Ops()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, dim, ops=ops)
        self.cls_token = nn.Parameter(torch.zeros(1, cls_tokens, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cls_tokens + 1 + num_patches, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, ops=ops) for _ in range(depth))
        self.norm = LayerNorm(dim, ops=ops)
        self._init_weights()

    def _init_linears(self) -> None:
        """Every linear layer (the EPG model's decoder included): xavier weights, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _init_weights(self) -> None:
        self._init_linears()
        for block in self.blocks:
            # qkv as three separate D x D matrices: bound sqrt(6 / (D + D)), not xavier of [3D, D].
            bound = math.sqrt(6.0 / (2 * self.dim))
            nn.init.uniform_(block.attn.qkv.weight, -bound, bound)
        w = self.patch_embed.proj.weight  # xavier with fan_in = 3 p p, fan_out = D
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        # torch's trunc_normal_ truncates at +-2 (absolute), i.e. ~100 std: as the reference.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(
        self, x_t: Tensor, t: Tensor, cls_cond: Tensor | None = None, return_skips: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """x_t: noisy images [B, 3, R, R]; t: shifted noise levels [B].

        cls_cond [B, D], when given, is added to every cls token (the fine-tuned model's class
        embedding). With return_skips the output of every block comes back too, first block
        first (the decoder's skip connections); the last of them is the returned tokens.
        """
        B = x_t.shape[0]
        lead = self.cls_tokens + 1
        patches = self.patch_embed(x_t, schedule.c_in(t), self.pos_embed[:, lead:])
        time = schedule.time_embedding(schedule.c_noise(t), self.dim).to(patches.dtype)
        cls = self.cls_token.expand(B, -1, -1)
        if cls_cond is not None:
            cls = cls + cls_cond[:, None]
        head = torch.cat([cls.to(patches.dtype), time[:, None]], dim=1)
        x = torch.cat([head + self.pos_embed[:, :lead].to(patches.dtype), patches], dim=1)
        skips = []
        for block in self.blocks:
            x = block(x)
            skips.append(x)
        return (x, skips) if return_skips else x


class ProjectorBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span all ranks when more than one trains.

    torch's SyncBatchNorm refuses CPU tensors; this one all-reduces [sum, sum of squares,
    count] in one call (autograd-aware), so it runs on gloo and NCCL alike.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        local = torch.cat([xf.sum(0), (xf * xf).sum(0), xf.new_full((1,), xf.shape[0])])
        total = all_reduce(local)
        C = x.shape[1]
        n = total[-1]
        mean = total[:C] / n
        var = (total[C : 2 * C] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
            self.num_batches_tracked.add_(1)
        y = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight.float() + self.bias.float()
        return y.to(x.dtype)


def projector(dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear, no biases (indices match the
    reference's projection_head.{0,1,3,4,6})."""
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=False),
        ProjectorBatchNorm(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=False),
        ProjectorBatchNorm(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim, bias=False),
    )


class PretrainEncoder(nn.Module):
    """Encoder + final LN on the cls token (-> h) + projector (-> z): the pre-training network."""

    def __init__(self, proj_hidden: int = 4096, proj_dim: int = 256, **encoder_args) -> None:
        super().__init__()
        self.encoder = Encoder(**encoder_args)
        self.projection_head = projector(self.encoder.dim, proj_hidden, proj_dim)
        for m in self.projection_head:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    def features(self, x_t: Tensor, t: Tensor) -> Tensor:
        """h: the normalised (first) cls feature, [B, D]."""
        return self.encoder.norm(self.encoder(x_t, t)[:, :1], feeds_matmul=False)[:, 0]  # h is read in fp32

    def forward(
        self, x_t: Tensor, t: Tensor, views: int = 1, projected: int = 1, project_rest: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Returns (z, h) for `views` views stacked along the batch.

        The encoder runs once over all views (one large GEMM per layer instead of one per
        view; it has no cross-sample op, so this is exact). h is returned for every view, z
        for the first `projected` views, each projected separately so that BatchNorm sees
        one view's statistics, as in the reference's separate calls.

        project_rest: the remaining views pass through the projector too, in order, without
        gradient and with their z thrown away. In training mode that advances the BatchNorm
        running statistics once per view, as the reference's projector runs on every input it
        encodes (the consistency fine-tuning's perceptual feature reads these statistics).
        """
        h = self.features(x_t, t)
        chunks = h.chunk(views)
        z = torch.cat([self.projection_head(c) for c in chunks[:projected]]) if projected else h[:0]
        if project_rest:
            with torch.no_grad():
                for c in chunks[projected:]:
                    self.projection_head(c)
        return z, h

    def perceptual_features(self, x_t: Tensor, t: Tensor) -> Tensor:
        """z of one view with the projector's BatchNorm as the module's mode has it (eval:
        the running statistics), the reference's `forward_features`: the consistency
        fine-tuning's perceptual feature."""
        return self.projection_head(self.features(x_t, t))


def build_pretrain_encoder(model_cfg, ops: Ops | None = None) -> PretrainEncoder:
    """From a resolved `ModelConfig` (preset already expanded into depth/dim/heads)."""
    m = model_cfg
    return PretrainEncoder(
        proj_hidden=m.proj_hidden, proj_dim=m.proj_dim, image_size=m.image_size, patch_size=m.patch_size,
        dim=m.dim, depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio, cls_tokens=m.cls_tokens, dropout=m.dropout,
        ops=ops,
    )

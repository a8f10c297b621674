"""The EPG generative model (EPG_SPEC section 4): the pre-trained encoder joined with a
U-ViT-style decoder of adaLN-Zero blocks, fine-tuned end to end.

    x_t, t, y -> Encoder (cls + class_embed(y); every block's output kept as a skip)
              -> final LN -> encoder_to_decoder -> decoder block i (skip of encoder block
                 depth-1-i, then adaLN-Zero conditioned on c = time_token + class_embed(y))
              -> drop [cls, time] -> out_norm -> out -> unpatchify -> F [B, 3, R, R]

The model returns the raw network output F; `denoise` turns it into the denoised image D for
either parameterisation. The encoder applies the input preconditioning c_in itself.

EPG extends Encoder rather than holding one, so that its state dict names are exactly the
reference implementation's (patch_embed.proj, blocks.i..., decoder_blocks.i..., out, ...) and
published checkpoints load without renaming (see epg_fast/convert.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from epg_fast import schedule
from epg_fast.models.encoder import LN_EPS, MLP, Attention, Encoder, LayerNorm
from epg_fast.ops import Ops


class Preset(NamedTuple):
    depth: int  # encoder blocks; the decoder has as many (one skip per encoder block)
    dim: int
    heads: int
    decoder_dim: int
    decoder_heads: int
    params: float  # published total parameter count (at 256 px, patch 16)


# The encoder columns equal ENCODER_PRESETS (the pre-training encoder of each preset).
# Decoder head dims: 64, 72, 120, 128.
EPG_PRESETS: dict[str, Preset] = {
    "EPG-L": Preset(16, 1024, 16, 1024, 16, 540e6),
    "EPG-XL": Preset(12, 768, 12, 1584, 22, 583e6),
    "EPG-XXL": Preset(12, 768, 12, 1920, 16, 789e6),
    "EPG-G": Preset(12, 768, 12, 2688, 21, 1391e6),
}

# Top-level names of the encoder's parameters inside an EPG state dict.
ENCODER_PARTS = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")


class DecoderBlock(nn.Module):
    """Skip connection (concat, Linear, LN), then an adaLN-Zero transformer block.

    Unlike DiT the block LayerNorms keep their own weight and bias; the modulation acts on
    top of them: LN(x) * (1 + scale) + shift. `dropout` acts only on the attention's output
    projection (the reference's decoder proj_drop); the MLP has none.
    """

    def __init__(
        self, dim: int, encoder_dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0, *, ops: Ops
    ) -> None:
        super().__init__()
        self.ops = ops
        self.skip_linear = nn.Linear(dim + encoder_dim, dim)
        self.skip_norm = LayerNorm(dim, ops=ops)
        self.norm1 = LayerNorm(dim, ops=ops)
        self.attn = Attention(dim, heads, dropout, ops=ops)
        self.norm2 = LayerNorm(dim, ops=ops)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        # The condition c has the encoder's width; index 1 is the reference's adaLN_modulation.1.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(encoder_dim, 6 * dim))

    def forward(self, x: Tensor, skip: Tensor, c: Tensor) -> Tensor:
        """x: [B, T, dim]; skip: an encoder block's output [B, T, encoder_dim]; c: [B, encoder_dim]."""
        # Input first, skip second: the column order of the reference's skip_linear weight.
        x = self.skip_norm(self.skip_linear(self.ops.cat_for_matmul([x, skip])))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = self.ops.layer_norm(x, self.norm1.weight, self.norm1.bias, LN_EPS, shift_a, scale_a)
        # x + gate_a * Attn(...) and the MLP's modulated LN of that sum, in one pass.
        x, h = self.ops.gated_layer_norm(x, gate_a, self.attn(h), self.norm2.weight, self.norm2.bias, LN_EPS, shift_m, scale_m)
        return x + gate_m[:, None] * self.mlp(h)


class EPG(Encoder):
    """forward(x_t, t, y) -> F [B, 3, R, R], the raw network output.

    x_t: noisy images [B, 3, R, R]; t: shifted noise levels [B]; y: class labels [B] in
    0..num_classes, where num_classes is the "no class" label of classifier-free guidance.
    `dropout` is the decoder attention's output dropout, the only one in the model (the
    reference builds the fine-tuned encoder without dropout and the decoder MLPs with none).
    """

    def __init__(
        self, image_size: int, patch_size: int, dim: int, depth: int, heads: int,
        decoder_dim: int, decoder_heads: int, num_classes: int = 1000,
        mlp_ratio: float = 4.0, cls_tokens: int = 1, dropout: float = 0.0, ops: Ops | None = None,
    ) -> None:
        super().__init__(image_size, patch_size, dim, depth, heads, mlp_ratio, cls_tokens, dropout=0.0, ops=ops)
        self.image_size, self.num_classes = image_size, num_classes
        self.class_embed = nn.Embedding(num_classes + 1, dim)  # last row: "no class"
        self.encoder_to_decoder = nn.Linear(dim, decoder_dim) if decoder_dim != dim else nn.Identity()
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(decoder_dim, dim, decoder_heads, mlp_ratio, dropout, ops=self.ops) for _ in range(depth)
        )
        self.out_norm = LayerNorm(decoder_dim, ops=self.ops)
        self.out = nn.Linear(decoder_dim, patch_size * patch_size * 3)
        self._init_epg()

    def _init_epg(self) -> None:
        """As the reference's fresh EPG model: after the encoder's own initialisation, EVERY
        linear layer, the encoder's included, is re-drawn with xavier over its whole matrix
        (qkv as one [3D, D] matrix: bound sqrt(6 / (D + 3D)), where the pre-training encoder
        uses sqrt(6 / 2D) per q/k/v); the patch embedding, cls token and position embedding
        keep the encoder's initialisation. Then the zero-inits and the class embedding."""
        self._init_linears()
        # adaLN-Zero: every gate starts at 0, so each decoder block starts as its skip + LN.
        for block in self.decoder_blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        label = self.class_embed(y)
        x, skips = super().forward(x_t, t, cls_cond=label, return_skips=True)
        # The decoder's condition: the encoder's (unprojected) time token plus the label.
        time = schedule.time_embedding(schedule.c_noise(t), self.dim)
        c = time.to(label.dtype) + label
        x = self.encoder_to_decoder(self.norm(x))
        for block in self.decoder_blocks:
            x = block(x, skips.pop(), c)  # last in, first out: block i gets encoder block depth-1-i
        x = self.out(self.out_norm(x[:, self.cls_tokens + 1 :]))
        return self.unpatchify(x)

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, L, p*p*3] with each patch vector laid out (p1, p2, channel) -> [B, 3, R, R]."""
        B, p, g = x.shape[0], self.patch_size, self.image_size // self.patch_size
        x = x.reshape(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, 3, g * p, g * p)


def build_epg(preset: str, image_size: int, patch_size: int, num_classes: int = 1000, ops: Ops | None = None) -> EPG:
    """An EPG model from the preset table, e.g. build_epg("EPG-XL", 256, 16)."""
    if preset not in EPG_PRESETS:
        raise ValueError(f"unknown EPG preset {preset!r} (known: {', '.join(EPG_PRESETS)})")
    p = EPG_PRESETS[preset]
    return EPG(image_size, patch_size, p.dim, p.depth, p.heads, p.decoder_dim, p.decoder_heads, num_classes, ops=ops)


def denoise(model: EPG, x_t: Tensor, t: Tensor, y: Tensor, t_min: float, prediction: str = "edm") -> Tensor:
    """The denoised image D(x_t) at shifted level t [B] (the network sees c_in * x_t itself).

    prediction="edm" (stage `consistency`): D = c_skip(t) * x_t + c_out(t) * F, with
    t_min = s * sigma_min, so that D(x_t) = x_t exactly at t = t_min (the consistency
    boundary condition). prediction="x0" (stage `denoise`, the reference's x0 target):
    D = F, the network output is the denoised image; t_min is unused.
    """
    out = model(x_t, t, y)
    if prediction == "x0":
        return out
    if prediction != "edm":
        raise ValueError(f"prediction must be 'edm' or 'x0', got {prediction!r}")
    shape = (-1, 1, 1, 1)
    return schedule.c_skip(t, t_min).view(shape) * x_t + schedule.c_out(t, t_min).view(shape) * out


def load_encoder_from_pretrain(model: EPG, pretrain_state_dict: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Load the `encoder.*` weights of a PretrainEncoder state dict into `model`'s encoder.

    `projection_head.*` is dropped (the projector is not part of the generative model).
    Returns (missing, unexpected): encoder parameters of `model` the state dict did not
    provide (model names, e.g. 'blocks.3.norm1.weight'), and keys of the state dict that are
    neither projector nor encoder weights of `model` (as given). The decoder is never
    "missing": it starts from its own initialisation. Raises ValueError on a shape mismatch,
    before anything is loaded.
    """
    own = model.state_dict()
    wanted = [k for k in own if k.split(".", 1)[0] in ENCODER_PARTS]
    weights, unexpected = {}, []
    for key, value in pretrain_state_dict.items():
        if key.startswith("projection_head."):
            continue
        name = key.removeprefix("encoder.")
        if not key.startswith("encoder.") or name not in wanted:
            unexpected.append(key)
        elif value.shape != own[name].shape:
            raise ValueError(f"'{key}': pre-training shape {list(value.shape)}, model {list(own[name].shape)}")
        else:
            weights[name] = value
    model.load_state_dict(weights, strict=False)
    return [k for k in wanted if k not in weights], unexpected

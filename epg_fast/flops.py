"""Analytic FLOP counts, in DiT's convention: one multiply-add = one FLOP, forward pass,
one image. Hardware FLOP/s (for MFU) are twice these. Only the matrix multiplies count;
norms, activations and softmax are a few percent and left out, as DiT does.
"""

from __future__ import annotations


def transformer_macs(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """Multiply-adds of one transformer block's attention and MLP over `tokens` tokens."""
    return (
        tokens * dim * 3 * dim  # qkv
        + 2 * tokens * tokens * dim  # q k^T and attn v
        + tokens * dim * dim  # output projection
        + 2 * tokens * dim * int(dim * mlp_ratio)  # MLP
    )


def vit_macs(image_size: int, patch_size: int, dim: int, depth: int, mlp_ratio: float = 4.0, extra_tokens: int = 2) -> int:
    """Multiply-adds of one ViT encoder forward for one image (patch embedding + blocks)."""
    patches = (image_size // patch_size) ** 2
    embed = patches * 3 * patch_size * patch_size * dim
    return embed + depth * transformer_macs(patches + extra_tokens, dim, mlp_ratio)


def projector_macs(dim: int, hidden: int, out_dim: int) -> int:
    return dim * hidden + hidden * hidden + hidden * out_dim


def pretrain_step_macs(model_cfg) -> int:
    """Multiply-adds per image of one pre-training step, forward and backward: six encoder
    forwards (three online with gradients, one online without, two target), six projector
    forwards (two with gradients; the online projector also sees b and b', as the reference,
    and the target's two); a backward pass costs two forwards."""
    m = model_cfg
    enc = vit_macs(m.image_size, m.patch_size, m.dim, m.depth, m.mlp_ratio, m.cls_tokens + 1)
    proj = projector_macs(m.dim, m.proj_hidden, m.proj_dim)
    return 3 * 3 * enc + 2 * 3 * proj + 1 * enc + 2 * proj + 2 * (enc + proj)


def epg_macs(image_size: int, patch_size: int, dim: int, depth: int, decoder_dim: int, mlp_ratio: float = 4.0,
             extra_tokens: int = 2) -> int:
    """Multiply-adds of one EPG forward (encoder + decoder + head) for one image."""
    patches = (image_size // patch_size) ** 2
    tokens = patches + extra_tokens
    D = decoder_dim
    bridge = tokens * dim * D if D != dim else 0  # encoder_to_decoder
    per_block = (
        tokens * (dim + D) * D  # skip_linear
        + dim * 6 * D  # adaLN modulation of the condition (once per image)
        + transformer_macs(tokens, D, mlp_ratio)
    )
    head = patches * D * patch_size * patch_size * 3
    return vit_macs(image_size, patch_size, dim, depth, mlp_ratio, extra_tokens) + bridge + depth * per_block + head


def finetune_step_macs(model_cfg, target_forward: bool) -> int:
    """Multiply-adds per image of one fine-tuning step, forward and backward: one forward with
    gradients (x3), plus a forward without gradients with `target_forward` (consistency's
    stop-gradient target)."""
    m = model_cfg
    fwd = epg_macs(m.image_size, m.patch_size, m.dim, m.depth, m.decoder_dim, m.mlp_ratio, m.cls_tokens + 1)
    return 3 * fwd + (fwd if target_forward else 0)


def dit_macs(input_size: int, patch_size: int, dim: int, depth: int, in_channels: int = 4, out_channels: int = 8,
             mlp_ratio: float = 4.0, freq_dim: int = 256) -> int:
    """Multiply-adds of one DiT forward for one image: a latent of input_size^2 x in_channels
    (32 at 256 px) to out_channels (noise and learned variance). Exact for models.dit.DiT."""
    tokens = (input_size // patch_size) ** 2
    embed = tokens * in_channels * patch_size * patch_size * dim
    condition = freq_dim * dim + dim * dim  # the timestep MLP; the label embedding is a lookup
    per_block = dim * 6 * dim + transformer_macs(tokens, dim, mlp_ratio)  # adaLN modulation (per image) + block
    final = dim * 2 * dim + tokens * dim * patch_size * patch_size * out_channels
    return embed + condition + depth * per_block + final

"""Convert checkpoints between the reference implementation and epg-fast.

    python -m epg_fast.convert SRC DST [--to ours|reference] [--weights ema|model]
                               [--preset EPG-XL --image-size 256 --patch-size 16 --num-classes 1000]

SRC is a plain state dict (the published `EPG-XL16-imagenet256.pth` and siblings), one
wrapped as {"model": sd} / {"ema": sd}, or a checkpoint folder of ours (a run folder: its
newest; "model" is the online network, "ema" the shadow: pre-training's target or
fine-tuning's EMA weights). Two kinds of network are recognised:

- an EPG model (has `decoder_blocks.*`): our `models.epg.EPG` uses the reference's names,
  so the mapping is the identity, checked name by name and shape by shape;
- a pre-training encoder (has `projection_head.*`): our `PretrainEncoder` holds the encoder
  under `encoder.`, so `X` <-> `encoder.X`, and `projection_head.*` is unchanged.

The expected names and shapes come from our model built on the meta device: from --preset
when given, otherwise from the architecture read off SRC itself (patch size, widths, depth,
image size, classes). Any unknown key, missing key or shape mismatch is refused with a
one-line ConvertError; the command prints it and exits 2. DST is a plain state dict.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from epg_fast.checkpoint import CheckpointError, CheckpointWriteError, check_writable, load_file, read_checkpoint
from epg_fast.models.encoder import ENCODER_PRESETS, PretrainEncoder
from epg_fast.models.epg import EPG, EPG_PRESETS, build_epg

WRAPPERS = ("ema", "model")  # preferred first: the EMA weights are the ones sampled from
PREFIX = "encoder."  # our PretrainEncoder's encoder submodule


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message is one line naming the key."""


def unwrap(obj: object, weights: str | None = None) -> tuple[dict[str, Tensor], str | None]:
    """The state dict inside `obj` and the wrapper key it came from (None for a plain one).
    With both "ema" and "model" present, `weights` chooses; by default "ema"."""
    if not isinstance(obj, Mapping):
        raise ConvertError(f"expected a state dict, got {type(obj).__name__}")
    found = [k for k in WRAPPERS if isinstance(obj.get(k), Mapping)]
    if weights is not None:
        if weights not in found:
            raise ConvertError(f"no '{weights}' weights in the checkpoint (wrappers found: {found or 'none'})")
        return dict(obj[weights]), weights
    if found:
        return dict(obj[found[0]]), found[0]
    return dict(obj), None


def detect(state: Mapping[str, Tensor], naming: str) -> str:
    """'epg' or 'encoder' (a pre-training encoder) for a state dict in `naming` ('reference' or 'ours')."""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    if has(PREFIX):
        if naming == "reference":
            raise ConvertError("keys start with 'encoder.': already in our naming? use --to reference")
        return "encoder"
    if has("decoder_blocks."):
        return "epg"
    if has("projection_head."):
        if naming == "ours":
            raise ConvertError("projection_head.* without encoder.*: a reference pre-training checkpoint? use --to ours")
        return "encoder"
    raise ConvertError(
        "neither an EPG model (no decoder_blocks.* keys) nor a pre-training encoder (no projection_head.* keys)"
    )


def _ours_name(kind: str, ref_name: str) -> str:
    if kind == "encoder" and not ref_name.startswith("projection_head."):
        return PREFIX + ref_name
    return ref_name


def _reference_name(kind: str, our_name: str) -> str:
    return our_name.removeprefix(PREFIX) if kind == "encoder" else our_name


def _infer(kind: str, state: Mapping[str, Tensor], source_name: Callable[[str], str]) -> torch.nn.Module:
    """Our model (on the meta device) with the architecture of `state` (our naming)."""
    enc = PREFIX if kind == "encoder" else ""

    def shape(key: str) -> torch.Size:
        key = key if key.startswith("projection_head.") else enc + key
        if key not in state:
            raise ConvertError(f"missing key '{source_name(key)}' (needed to read the architecture; or pass --preset)")
        return state[key].shape

    dim, _, patch, _ = shape("patch_embed.proj.weight")
    cls_tokens = shape("cls_token")[1]
    patches = shape("pos_embed")[1] - cls_tokens - 1
    grid = math.isqrt(max(patches, 0))
    if patches <= 0 or grid * grid != patches:
        raise ConvertError(f"'{source_name(enc + 'pos_embed')}' has {patches} patch positions, not a square grid")
    mlp_hidden = shape("blocks.0.mlp.fc1.weight")[0]  # also: there is at least one block
    depth = 1 + max(int(k[len(enc) :].split(".")[1]) for k in state if k.startswith(enc + "blocks."))
    args = dict(
        image_size=grid * patch, patch_size=patch, dim=dim, depth=depth,
        heads=1,  # heads change no parameter's shape; the model is only a name/shape template
        mlp_ratio=mlp_hidden / dim, cls_tokens=cls_tokens,
    )
    with torch.device("meta"):
        if kind == "epg":
            decoder_dim = shape("out_norm.weight")[0]
            return EPG(**args, decoder_dim=decoder_dim, decoder_heads=1, num_classes=shape("class_embed.weight")[0] - 1)
        hidden, out_dim = shape("projection_head.0.weight")[0], shape("projection_head.6.weight")[0]
        return PretrainEncoder(proj_hidden=hidden, proj_dim=out_dim, **args)


def _from_preset(kind: str, state: Mapping[str, Tensor], preset: str, image_size: int, patch_size: int,
                 num_classes: int) -> torch.nn.Module:
    known = EPG_PRESETS if kind == "epg" else ENCODER_PRESETS
    if preset not in known:
        raise ConvertError(f"unknown preset '{preset}' for an {kind} checkpoint (known: {', '.join(known)})")
    with torch.device("meta"):
        if kind == "epg":
            return build_epg(preset, image_size, patch_size, num_classes)
        depth, dim, heads = ENCODER_PRESETS[preset]
        # The projector's widths are not part of a preset: take them from the file when there.
        hidden = state.get("projection_head.0.weight", torch.empty(4096)).shape[0]
        out_dim = state.get("projection_head.6.weight", torch.empty(256)).shape[0]
        return PretrainEncoder(
            proj_hidden=hidden, proj_dim=out_dim, image_size=image_size, patch_size=patch_size,
            dim=dim, depth=depth, heads=heads,
        )


def convert(
    state: Mapping[str, Tensor],
    to: str = "ours",
    preset: str | None = None,
    image_size: int = 256,
    patch_size: int = 16,
    num_classes: int = 1000,
) -> tuple[str, dict[str, Tensor]]:
    """Map a state dict to our naming (`to="ours"`, from the reference's) or back
    (`to="reference"`). Returns (kind, converted) with kind 'epg' or 'encoder'; the tensors
    are the input's own (no copy). Raises ConvertError on any unknown key, missing key or
    shape mismatch against our model (from `preset`, else inferred from `state`)."""
    if to not in ("ours", "reference"):
        raise ConvertError(f"--to must be 'ours' or 'reference', got '{to}'")
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ConvertError(f"'{key}' is a {type(value).__name__}, not a tensor")
    source = "reference" if to == "ours" else "ours"
    kind = detect(state, source)
    ours = {_ours_name(kind, k): v for k, v in state.items()} if to == "ours" else dict(state)

    def source_name(our_key: str) -> str:  # errors name keys as they are in the source file
        return _reference_name(kind, our_key) if to == "ours" else our_key

    if preset is None:
        model = _infer(kind, ours, source_name)
    else:
        model = _from_preset(kind, ours, preset, image_size, patch_size, num_classes)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    what = f"our {type(model).__name__}" + (f" {preset} at {image_size} px, patch {patch_size}" if preset else "")
    for key, value in ours.items():
        if key not in expected:
            raise ConvertError(f"unknown key '{source_name(key)}' (no such parameter in {what})")
        if value.shape != expected[key]:
            raise ConvertError(
                f"shape mismatch for '{source_name(key)}': checkpoint {list(value.shape)}, {what} {list(expected[key])}"
            )
    missing = [source_name(k) for k in expected if k not in ours]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConvertError(f"missing {len(missing)} key(s) for {what}: {', '.join(missing[:5])}{more}")
    if to == "ours":
        return kind, ours
    return kind, {_reference_name(kind, k): v for k, v in ours.items()}


def _read_source(src: str) -> object:
    if Path(src).is_dir():
        try:
            saved = read_checkpoint(src)
        except CheckpointError as e:
            raise ConvertError(str(e)) from None
        return {"model": saved.weights, "ema": saved.shadow}
    try:
        return load_file(src)  # weights_only; its messages never suggest weights_only=False
    except CheckpointError as e:
        raise ConvertError(f"cannot read {e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epg_fast.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--to", choices=("ours", "reference"), default="ours")
    parser.add_argument("--weights", choices=WRAPPERS, default=None,
                        help="which weights of a {'model': ..., 'ema': ...} checkpoint (default: ema when present)")
    parser.add_argument("--preset", default=None, help="check against this preset (default: read the architecture off SRC)")
    parser.add_argument("--image-size", type=int, default=256, help="with --preset")
    parser.add_argument("--patch-size", type=int, default=16, help="with --preset")
    parser.add_argument("--num-classes", type=int, default=1000, help="with --preset")
    args = parser.parse_args(argv)
    try:
        try:
            check_writable(Path(args.dst).parent)  # before the work
        except CheckpointWriteError as e:
            raise ConvertError(f"cannot write {args.dst}: {e}") from None
        obj = _read_source(args.src)
        state, wrapper = unwrap(obj, args.weights)
        kind, out = convert(state, args.to, args.preset, args.image_size, args.patch_size, args.num_classes)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.save(out, args.dst)
    used = f" (the '{wrapper}' weights)" if wrapper else ""
    name = "EPG model" if kind == "epg" else "pre-training encoder"
    print(f"{args.src}{used}: {name}, {len(out)} tensors -> {args.dst} ({args.to} naming)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

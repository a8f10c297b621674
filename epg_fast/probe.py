"""Representation probe of an EPG encoder: k-NN and linear classification of frozen features.

    python -m epg_fast.probe CKPT --train DIR --test DIR [--random-init] [--config FILE]
        [--pixels] [--limit-train N] [--limit-test N] [--batch-size 256] [--json]

CKPT: a pre-training checkpoint folder (its online encoder, `--weights target` for the EMA
target), a fine-tuned checkpoint folder (the encoder inside the EPG model, EMA weights by
default, seen with the "no class" label), or a run folder (its newest completed checkpoint).
`--random-init`: the same architecture with random weights (seed 0), the baseline; the
architecture comes from CKPT or `--config FILE`. `--pixels`: raw pixels instead of features
(the floor any encoder should beat). DIR: ImageFolder trees `DIR/<class>/<image>` with the
same class folders; images are seen as the model sees them: the ADM center crop to the
model's resolution (R from the config, or the train set's first image with `--pixels`),
normalised as in training.

Features: the encoder's normalised cls token h at the cleanest level the model is
conditioned on, t = resolution shift * sigma_min, with the clean image as input (as the
consistency stage's perceptual features).

- k-NN (the usual SSL protocol of InstDisc / DINO): cosine similarity of L2-normalised
  features, the k = 20 nearest training images vote with weight exp(similarity / 0.07), the
  class with the largest summed weight wins; top-1 accuracy.
- Linear probe: multinomial logistic regression on features standardised with the training
  set's mean and std, full-batch L-BFGS (300 iterations, strong Wolfe line search) on mean
  cross-entropy + 1e-4 * ||W||^2 (the small penalty keeps separable data from running off);
  top-1 accuracy on the test set.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from epg_fast import checkpoint, schedule
from epg_fast.checkpoint import Saved
from epg_fast.config import Config, ConfigError
from epg_fast.data import DataError, ImageIndex, normalize, scan_labelled_folder
from epg_fast.data.views import center_crop
from epg_fast.distributed import cli_device
from epg_fast.models.encoder import Encoder
from epg_fast.models.epg import ENCODER_PARTS
from epg_fast.stages import load_config, stage_named

KNN_K = 20
KNN_TEMPERATURE = 0.07
LINEAR_STEPS = 300
LINEAR_L2 = 1e-4


class ProbeError(ValueError):
    """An input the probe refuses; the message is one line."""


# ---------------------------------------------------------------------------------------
# The classifiers


def knn_top1(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, num_classes: int,
             k: int = KNN_K, temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> float:
    """Top-1 accuracy of the temperature-weighted k-NN vote on cosine similarity."""
    train = torch.nn.functional.normalize(train.float(), dim=1)
    test = torch.nn.functional.normalize(test.float(), dim=1)
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk):
        sim, idx = (test[start : start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start : start + chunk]).sum())
    return correct / len(test)


def linear_probe_top1(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, num_classes: int,
                      steps: int = LINEAR_STEPS, l2: float = LINEAR_L2) -> float:
    """Top-1 test accuracy of logistic regression on standardised features (L-BFGS)."""
    train, test = train.double(), test.double()
    mean, std = train.mean(0), train.std(0).clamp_min(1e-8)
    train, test = (train - mean) / std, (test - mean) / std
    weight = torch.zeros(train.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(train @ weight + bias, train_labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((test @ weight + bias).argmax(1) == test_labels).double().mean())


# ---------------------------------------------------------------------------------------
# The encoder


def read_checkpoint(path: Path) -> Saved:
    """The config and weights of a checkpoint folder or run folder of ours; the one place
    this module reads checkpoints (through epg_fast.checkpoint)."""
    try:
        return checkpoint.read_checkpoint(path)
    except checkpoint.CheckpointError as err:
        raise ProbeError(str(err)) from None


def encoder_weights(saved: Saved, weights: str) -> dict[str, Tensor]:
    """Encoder parameters (Encoder's names) of a pre-training or fine-tuning checkpoint.
    `weights`: "online", the stage's shadow ("target", "ema"), or "auto": the network the
    stage trains for use (pre-training: the online encoder; fine-tuning: the EMA weights)."""
    try:
        stage = stage_named(str(saved.stage))
    except ConfigError as err:
        raise ProbeError(f"{saved.folder}: {err}") from None
    if weights == "auto":
        weights = "online" if stage.shadow_in_loss else stage.shadow_key
    state = saved.weights if weights == "online" else saved.shadow if weights == stage.shadow_key else None
    if not isinstance(state, Mapping):
        raise ProbeError(f"the '{stage.name}' checkpoint holds no '{weights}' weights (--weights {weights})")
    if any(k.startswith("encoder.") for k in state):  # the pre-training model: encoder + projector
        return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return {k: v for k, v in state.items() if k.split(".", 1)[0] in ENCODER_PARTS + ("class_embed",)}


class FrozenEncoder(torch.nn.Module):
    """h of an image at the cleanest level; a fine-tuned encoder sees the "no class" label."""

    def __init__(self, model: Mapping, weights: dict[str, Tensor] | None) -> None:
        super().__init__()
        self.encoder = Encoder(image_size=model["image_size"], patch_size=model["patch_size"], dim=model["dim"],
                               depth=model["depth"], heads=model["heads"], mlp_ratio=model.get("mlp_ratio", 4.0),
                               cls_tokens=model.get("cls_tokens", 1))
        self.register_buffer("cls_cond", None)
        if weights is not None:
            if "class_embed.weight" in weights:
                self.cls_cond = weights.pop("class_embed.weight")[-1]  # the last row: "no class"
            missing, unexpected = self.encoder.load_state_dict(weights, strict=False)
            if missing or unexpected:
                raise ProbeError(f"the checkpoint's encoder does not match its config (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
        self.t0 = schedule.resolution_shift(model["image_size"]) * schedule.SIGMA_MIN
        self.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        t = torch.full((len(x),), self.t0, device=x.device)
        cls = None if self.cls_cond is None else self.cls_cond.expand(len(x), -1)
        return self.encoder.norm(self.encoder(x, t, cls_cond=cls)[:, :1])[:, 0]


def encoder_features(encoder: Encoder, image_size: int) -> Callable[[Tensor], Tensor]:
    """The feature map of a live pre-training encoder (the trainer's k-NN monitor)."""
    t0 = schedule.resolution_shift(image_size) * schedule.SIGMA_MIN

    def features(x: Tensor) -> Tensor:
        return encoder.norm(encoder(x, torch.full((len(x),), t0, device=x.device))[:, :1])[:, 0]

    return features


# ---------------------------------------------------------------------------------------
# Data and features


def labelled_set(root: str | Path, limit: int | None, seed: int = 0) -> tuple[ImageIndex, np.ndarray]:
    """(index, the image numbers used: a seeded random subset of `limit`, or all)."""
    try:
        index = scan_labelled_folder(root)
    except DataError as err:
        raise ProbeError(str(err)) from None
    keep = np.arange(len(index))
    if limit is not None and limit < len(index):
        keep = np.sort(np.random.default_rng(seed).permutation(len(index))[:limit])
    return index, keep


def load_images(index: ImageIndex, keep: np.ndarray, size: int) -> Tensor:
    """uint8 [N, 3, size, size]: the ADM center crops (the model's view x without the flip)."""
    out = torch.empty(len(keep), 3, size, size, dtype=torch.uint8)
    for j, i in enumerate(tqdm(keep, desc="images", unit="img", disable=None, leave=False)):
        try:
            with Image.open(index.path(int(i))) as img:
                out[j] = torch.from_numpy(np.array(center_crop(img.convert("RGB"), size))).permute(2, 0, 1)
        except OSError as err:
            raise ProbeError(f"cannot decode {index.path(int(i))}: {err}") from None
    return out


@torch.no_grad()
def features_of(images: Tensor, feature_map: Callable[[Tensor], Tensor] | None, normalization: str,
                batch_size: int, device: torch.device | str = "cpu", desc: str = "features") -> Tensor:
    """float32 [N, D] features of uint8 images in batches; `feature_map` None = raw pixels."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=None, leave=False):
        x = normalize(images[start : start + batch_size].to(device), normalization)
        out.append((x.flatten(1) if feature_map is None else feature_map(x)).float().cpu())
    return torch.cat(out)


class KNNMonitor:
    """The pre-training monitor (eval.knn_every): k-NN top-1 of the live encoder on a fixed
    held-out labelled set. Images are decoded once; each call re-extracts features."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        e, m = cfg.eval, cfg.model
        try:
            (train, keep_train), (test, keep_test) = (labelled_set(r, e.knn_limit) for r in (e.knn_train, e.knn_test))
            if train.classes != test.classes:
                raise ProbeError("eval.knn_train and eval.knn_test have different class folders")
            self.train, self.test = load_images(train, keep_train, m.image_size), load_images(test, keep_test, m.image_size)
        except ProbeError as err:
            raise ConfigError(f"eval.knn_*: {err}") from None
        self.train_labels, self.test_labels = torch.from_numpy(train.labels[keep_train]), torch.from_numpy(test.labels[keep_test])
        self.num_classes, self.cfg, self.device = len(train.classes), cfg, device

    def __call__(self, encoder: Encoder) -> float:
        was_training = encoder.training
        encoder.eval()
        try:
            fmap = encoder_features(encoder, self.cfg.model.image_size)
            norm, bs = self.cfg.data.normalization, self.cfg.train.global_batch
            train = features_of(self.train, fmap, norm, bs, self.device)
            test = features_of(self.test, fmap, norm, bs, self.device)
        finally:
            encoder.train(was_training)
        return knn_top1(train, self.train_labels, test, self.test_labels, self.num_classes)


# ---------------------------------------------------------------------------------------
# The command


def probe(checkpoint: str | None, train_root: str, test_root: str, *, random_init: bool = False,
          config: str | None = None, pixels: bool = False, weights: str = "auto", limit_train: int | None = None,
          limit_test: int | None = None, batch_size: int = 256, linear: bool = True,
          device: str = "cpu") -> dict:
    """{"knn_top1", "linear_top1" (None with linear=False), "encoder", "num_train",
    "num_test", "num_classes", "feature_dim", "protocol"}; raises ProbeError."""
    if batch_size < 1:
        raise ProbeError(f"--batch-size must be >= 1, got {batch_size}")
    for name, value in (("--limit-train", limit_train), ("--limit-test", limit_test)):
        if value is not None and value < 1:
            raise ProbeError(f"{name} must be >= 1, got {value}")
    train, keep_train = labelled_set(train_root, limit_train)
    test, keep_test = labelled_set(test_root, limit_test)
    if train.classes != test.classes:
        raise ProbeError(f"--train has {len(train.classes)} class folders, --test {len(test.classes)}, or their "
                         "names differ: the labels would not match")
    model, normalization, feature_map = None, "imagenet", None
    if pixels:
        if checkpoint or random_init or config:
            raise ProbeError("--pixels probes raw pixels: give no checkpoint, --random-init or --config")
        size, described = int(train.sizes[0].min()), "raw pixels"
    else:
        if config:
            try:
                cfg = load_config(config)
            except ConfigError as err:
                raise ProbeError(f"--config: {err}") from None
            model, normalization = vars(cfg.model), cfg.data.normalization
        state = None
        if checkpoint:
            state = read_checkpoint(Path(checkpoint))
            if model is None:
                model, normalization = state.config["model"], state.config["data"]["normalization"]
        if model is None:
            raise ProbeError("no encoder to probe: give a checkpoint, or --random-init with --config FILE")
        if random_init:
            torch.manual_seed(0)
            described = f"random init ({model['depth']}x{model['dim']}, patch {model['patch_size']})"
        else:
            if state is None:
                raise ProbeError("--config gives the architecture only: add --random-init, or give a checkpoint")
            described = f"{checkpoint} ({state.stage}, step {state.step}, {weights} weights)"
        feature_map = FrozenEncoder(model, None if random_init else encoder_weights(state, weights)).to(device)
        size = model["image_size"]
    x_train, x_test = load_images(train, keep_train, size), load_images(test, keep_test, size)
    y_train, y_test = torch.from_numpy(train.labels[keep_train]), torch.from_numpy(test.labels[keep_test])
    f_train = features_of(x_train, feature_map, normalization, batch_size, device, "train features")
    f_test = features_of(x_test, feature_map, normalization, batch_size, device, "test features")
    num_classes = len(train.classes)
    return {
        "knn_top1": knn_top1(f_train, y_train, f_test, y_test, num_classes),
        "linear_top1": linear_probe_top1(f_train, y_train, f_test, y_test, num_classes) if linear else None,
        "encoder": described, "num_train": len(keep_train), "num_test": len(keep_test), "num_classes": num_classes,
        "feature_dim": f_train.shape[1],
        "protocol": f"k-NN k={KNN_K} cosine, weights exp(sim/{KNN_TEMPERATURE}); linear: logistic regression on "
                    f"standardised features, L-BFGS {LINEAR_STEPS} it, l2 {LINEAR_L2}",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epg_fast.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", default=None, help="checkpoint folder or run folder")
    p.add_argument("--train", required=True, help="labelled ImageFolder: the k-NN memory / linear training set")
    p.add_argument("--test", required=True, help="labelled ImageFolder with the same classes")
    p.add_argument("--random-init", action="store_true", help="the same architecture with random weights")
    p.add_argument("--config", default=None, help="YAML preset giving the architecture (instead of CKPT's)")
    p.add_argument("--pixels", action="store_true", help="raw-pixel features (the floor)")
    p.add_argument("--weights", default="auto", choices=("auto", "online", "target", "ema"),
                   help="auto: online for pre-training, ema for fine-tuned checkpoints")
    p.add_argument("--limit-train", type=int, default=None, help="a seeded random N of the training images")
    p.add_argument("--limit-test", type=int, default=None, help="a seeded random N of the test images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-linear", action="store_true", help="k-NN only")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = p.parse_args(argv)
    try:
        device = cli_device(args.device, ProbeError)
        result = probe(args.checkpoint, args.train, args.test, random_init=args.random_init, config=args.config,
                       pixels=args.pixels, weights=args.weights, limit_train=args.limit_train,
                       limit_test=args.limit_test, batch_size=args.batch_size, linear=not args.no_linear,
                       device=device)
    except ProbeError as err:
        print(f"epg_fast.probe: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"encoder: {result['encoder']} ({result['feature_dim']}-d features)")
    print(f"data: {result['num_train']} train / {result['num_test']} test images, {result['num_classes']} classes")
    print(f"k-NN top-1: {100 * result['knn_top1']:.2f}%  (k={KNN_K}, cosine, T={KNN_TEMPERATURE})")
    if result["linear_top1"] is not None:
        print(f"linear top-1: {100 * result['linear_top1']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The representation probe: k-NN and linear probe against known answers, the command on
small ImageFolder trees, and its one-line refusals."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from epg_fast.probe import knn_top1, linear_probe_top1, main

COLOURS = {"blue": (30, 40, 200), "green": (30, 180, 40), "red": (200, 30, 40)}


def tree(root, per_class=6, size=16, classes=COLOURS, seed=0):
    """root/<class>/<i>.png: noisy images of one colour per class."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-30, 31, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_knn_votes_are_temperature_weighted():
    # One very close class-0 neighbour against two moderately close class-1 neighbours: with
    # weights exp(sim / 0.07) the close one wins (a plain majority vote would say class 1).
    test = torch.tensor([[1.0, 0.0, 0.0]])
    close = [0.99, (1 - 0.99**2) ** 0.5, 0.0]
    train = torch.tensor([close, [0.5, 0.0, 0.75**0.5], [0.5, 0.0, -(0.75**0.5)]])
    labels = torch.tensor([0, 1, 1])
    assert knn_top1(train, labels, test, torch.tensor([0]), num_classes=2, k=3) == 1.0
    assert knn_top1(train, labels, test, torch.tensor([0]), num_classes=2, k=3, temperature=100.0) == 0.0


def test_knn_uses_cosine_similarity_and_k():
    # Class c lives along axis c at any scale (cosine ignores the norm); k=20 > class size.
    g = torch.Generator().manual_seed(0)
    axes = torch.eye(4)
    train_labels = torch.arange(4).repeat(10)
    train = axes[train_labels] * torch.rand(40, 1, generator=g) * 100 + 0.05 * torch.randn(40, 4, generator=g)
    test_labels = torch.tensor([3, 1, 0, 2])
    test = axes[test_labels] * 0.01
    assert knn_top1(train, train_labels, test, test_labels, num_classes=4) == 1.0
    assert knn_top1(train, train_labels, test, (test_labels + 1) % 4, num_classes=4) == 0.0


def test_linear_probe_separates_separable_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 3, generator=g)
    x = torch.randn(600, 16, generator=g) * torch.tensor([100.0] + [1.0] * 15)  # unequal scales: standardised
    logits = x / x.std(0) @ w
    top2 = logits.topk(2, dim=1).values
    x = x[top2[:, 0] - top2[:, 1] > 0.5][:300]  # a margin around the class boundaries
    y = (x / x.std(0) @ w).argmax(1)
    assert linear_probe_top1(x[:200], y[:200], x[200:], y[200:], 3) >= 0.95
    # kNN-hostile but linear: the label is the sign of one coordinate among 15 noisy ones.
    y_sign = (x[:, 3] > 0).long()
    assert linear_probe_top1(x[:200], y_sign[:200], x[200:], y_sign[200:], 2) >= 0.95
    random = torch.randint(0, 3, (300,), generator=g)
    assert linear_probe_top1(x[:200], random[:200], x[200:], random[200:], 3) < 0.6


def test_pixels_and_random_init_on_a_tree(tmp_path, capsys):
    train, test = tree(tmp_path / "train"), tree(tmp_path / "test", per_class=3, seed=1)
    assert main(["--pixels", "--train", str(train), "--test", str(test), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["knn_top1"] == 1.0 and result["linear_top1"] == 1.0 and result["feature_dim"] == 3 * 16 * 16
    assert result["num_train"] == 18 and result["num_test"] == 9 and result["num_classes"] == 3
    args = ["--random-init", "--config", "configs/pretrain/demo.yaml", "--train", str(train), "--test", str(test)]
    assert main(args + ["--limit-train", "9", "--batch-size", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["feature_dim"] == 96 and result["num_train"] == 9 and 0 <= result["knn_top1"] <= 1
    assert result["encoder"].startswith("random init")


@pytest.mark.parametrize("make, extra, message", [
    (lambda d: None, ["--train", "{d}/nowhere"], "does not exist"),
    (lambda d: (d / "train" / "zebra").mkdir(), [], "zebra holds no images"),
    (lambda d: tree(d / "train", classes={"yellow": (200, 200, 40)}), [], "class folders"),
    (lambda d: (d / "ckpt").mkdir(), ["{d}/ckpt"], "not a completed checkpoint folder"),
    (lambda d: None, ["--batch-size", "0", "--pixels"], "--batch-size must be >= 1"),
    (lambda d: None, ["--pixels", "--random-init"], "--pixels probes raw pixels"),
    (lambda d: None, [], "no encoder to probe"),
    (lambda d: None, ["--config", "configs/pretrain/demo.yaml"], "--config gives the architecture only"),
])
def test_refusals_are_one_line(tmp_path, capsys, make, extra, message):
    tree(tmp_path / "train", per_class=2)
    tree(tmp_path / "test", per_class=2)
    make(tmp_path)
    args = ["--train", str(tmp_path / "train"), "--test", str(tmp_path / "test")]
    rc = main(args + [a.format(d=tmp_path) for a in extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def fake_checkpoint(folder, stage, key, state, model):
    """A completed checkpoint folder as the trainer writes it (what the probe reads)."""
    folder.mkdir(parents=True)
    config = {"stage": stage, "model": model, "data": {"normalization": "simple"}}
    torch.save({"config": config, key: state, "step": 7}, folder / "mp_rank_00_model_states.pt")
    (folder / "COMPLETE").write_text('{"step": 7}')
    return folder


MODEL = dict(image_size=16, patch_size=4, dim=32, depth=2, heads=2, mlp_ratio=4.0, cls_tokens=1,
             decoder_dim=32, decoder_heads=2, num_classes=3)


def test_features_of_pretraining_and_finetuned_checkpoints(tmp_path):
    from epg_fast import schedule
    from epg_fast.models.encoder import PretrainEncoder
    from epg_fast.models.epg import EPG
    from epg_fast.probe import FrozenEncoder, encoder_weights, read_checkpoint

    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16)
    t0 = torch.full((4,), schedule.resolution_shift(16) * schedule.SIGMA_MIN)
    arch = {k: MODEL[k] for k in ("image_size", "patch_size", "dim", "depth", "heads")}
    pre = PretrainEncoder(proj_hidden=16, proj_dim=8, **arch).eval()
    ckpt = fake_checkpoint(tmp_path / "pre", "pretrain", "module", pre.state_dict(), MODEL)
    got = FrozenEncoder(MODEL, encoder_weights(read_checkpoint(ckpt), "auto"))(x)
    assert torch.allclose(got, pre.features(x, t0), atol=1e-6)
    # A fine-tuned EPG: its encoder, with the "no class" label added to the cls token.
    epg = EPG(16, 4, 32, 2, 2, 32, 2, num_classes=3).eval()
    ckpt = fake_checkpoint(tmp_path / "ft", "denoise", "ema", epg.state_dict(), MODEL)
    got = FrozenEncoder(MODEL, encoder_weights(read_checkpoint(ckpt), "auto"))(x)
    null = epg.class_embed(torch.full((4,), 3))
    expected = epg.norm(super(EPG, epg).forward(x, t0, cls_cond=null)[:, :1])[:, 0]
    assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(Exception, match="holds no 'target' weights"):
        encoder_weights(read_checkpoint(ckpt), "target")

"""The stage registry and protocol: names, views, draws, shadows, and that the stage objects
are what the trainer and the benchmark share."""

import pytest
import torch

from epg_fast.config import STAGES
from epg_fast.ops import Ops
from epg_fast.stages import REGISTRY, build_stage, load_config, stage_named, stage_sampled_as

TINY = ["model.depth=2", "model.dim=32", "model.heads=2", "model.image_size=16", "model.patch_size=4",
        "model.proj_hidden=64", "model.proj_dim=16", "model.num_classes=4", "init.encoder=null"]


def test_registry_names_are_the_config_choices():
    assert tuple(REGISTRY) == STAGES
    assert all(stage_named(name).name == name for name in STAGES)
    with pytest.raises(ValueError, match="unknown stage 'finetune'"):
        stage_named("finetune")


def test_each_stage_declares_views_shadow_and_sampling():
    assert REGISTRY["pretrain"].views == ("x", "y1", "y2") and REGISTRY["pretrain"].sampling is None
    assert {REGISTRY[s].views for s in ("denoise", "consistency")} == {("x",)}
    assert stage_sampled_as("x0").name == "denoise" and stage_sampled_as("edm").name == "consistency"
    assert {REGISTRY[s].shadow_key for s in STAGES} == {"target", "ema"}


@pytest.mark.parametrize("name", STAGES)
def test_draws_and_shadow(name):
    cfg = load_config(None, TINY, stage=name)
    torch.manual_seed(0)
    stage = build_stage(cfg, torch.device("cpu"), Ops())
    draws = [stage.draws(step, torch.Generator().manual_seed(step)) for step in range(0, 300, 30)]
    if name == "pretrain":  # the level index, below the curriculum's N(k) - 1
        assert all(len(d) == 1 and 0 <= d[0] < stage.num_levels(k) - 1 for d, k in zip(draws, range(0, 300, 30)))
        assert len({d[0] for d in draws}) > 1
    else:  # fine-tuning shares no decision between ranks
        assert draws == [()] * len(draws)
    assert not any(p.requires_grad for p in stage.shadow.parameters())
    assert all(torch.equal(a, b) for a, b in zip(stage.model.parameters(), stage.shadow.parameters()))
    assert stage.macs_per_image(cfg) > 0


def test_stage_config_checks():
    unset = [f"model.{k}=null" for k in ("depth", "dim", "heads", "decoder_dim", "decoder_heads")]
    cfg = load_config(None, ["model.preset=EPG-XL", "model.image_size=256", "model.patch_size=16", *unset], stage="denoise")
    assert (cfg.model.depth, cfg.model.dim, cfg.model.decoder_dim, cfg.model.decoder_heads) == (12, 768, 1584, 22)
    custom = load_config(None, ["model.decoder_dim=null", "model.decoder_heads=null"], stage="denoise")
    assert (custom.model.decoder_dim, custom.model.decoder_heads) == (custom.model.dim, custom.model.heads)
    with pytest.raises(ValueError, match="perceptual_weight > 0 needs init.encoder"):
        load_config(None, ["consistency.perceptual_weight=1", "init.encoder=null"], stage="consistency")
    with pytest.raises(ValueError, match="denoise.levels must be >= 2"):
        load_config(None, ["denoise.levels=1"], stage="denoise")

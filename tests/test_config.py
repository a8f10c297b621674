"""Config loading: presets, overrides, and one-line errors for bad keys and values."""

import pytest

from epg_fast.config import CONFIG_DIR, ConfigError, check_world, parse_overrides
from epg_fast.stages import load_config


def test_paper_preset_values():
    cfg = load_config(CONFIG_DIR / "pretrain" / "in256_vitb16.yaml")
    m, o, t, p = cfg.model, cfg.optim, cfg.train, cfg.pretrain
    assert (m.depth, m.dim, m.heads, m.image_size, m.patch_size) == (12, 768, 12, 256, 16)
    # the released launch script's run (scripts/pretrain.sh overrides lr and the projector output)
    assert (t.global_batch, t.total_steps, o.lr, o.betas, o.weight_decay, o.warmup_steps) == (
        1024, 600_000, 6e-4, [0.9, 0.95], 0.03, 10_000)
    assert (m.proj_hidden, m.proj_dim, cfg.data.precropped) == (4096, 768, True)
    assert (p.s0, p.s1, p.target_ema, p.tau_contrastive, p.tau_consistency) == (20, 1280, 0.99, 0.2, 0.1)


@pytest.mark.parametrize("name,dims", [("in256_epg_l16", (16, 1024, 16, 256, 16)), ("in512_epg_l32", (16, 1024, 16, 512, 32))])
def test_presets_with_base(name, dims):
    cfg = load_config(CONFIG_DIR / "pretrain" / f"{name}.yaml")
    m = cfg.model
    assert (m.depth, m.dim, m.heads, m.image_size, m.patch_size) == dims
    assert cfg.train.global_batch == 1024  # inherited from the base preset


def test_default_is_demo_and_overrides_apply():
    cfg = load_config(None, ["train.total_steps=20", "data.root=/data/x", "optim.betas=[0.8,0.9]", "optim.lr=3e-4"])
    assert cfg.name == "demo" and cfg.model.image_size <= 64
    assert cfg.train.total_steps == 20 and cfg.data.root == "/data/x"
    assert cfg.optim.betas == [0.8, 0.9] and cfg.optim.lr == 3e-4
    assert cfg.train.run_dir == "runs/pretrain-demo"


def test_parse_overrides_nesting_and_types():
    assert parse_overrides(["a.b=1", "a.c=x", "d=null", "e=true"]) == {"a": {"b": 1, "c": "x"}, "d": None, "e": True}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.total_steps"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.totl_steps=5", "unknown config key 'train.totl_steps'; did you mean 'train.total_steps'"),
        ("trian.seed=1", "unknown config key 'trian'; did you mean 'train'"),
        ("train.total_steps=abc", "'train.total_steps' must be int"),
        ("train.total_steps=2.5", "'train.total_steps' must be int"),
        ("data.workers=true", "'data.workers' must be int"),
        ("model.patch_size=5", "model.image_size=32 is not divisible by model.patch_size=5"),
        ("model.heads=5", "model.dim=96 is not divisible by model.heads=5"),
        ("train.precision=fp8", "'train.precision' must be one of auto, fp32, bf16, fp16"),
        ("train.zero_stage=4", "train.zero_stage must be 0, 1, 2 or 3"),
        ("train.global_batch=0", "'train.global_batch' must be > 0"),
        ("model.preset=EPG-XLL", "unknown model.preset 'EPG-XLL' for stage pretrain; did you mean 'EPG-XL'"),
        ("model=3", "'model' is a section"),
        ("train.stop_after=1000", "train.stop_after=1000 must be in [1, train.total_steps=300]"),
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_preset_conflict_and_custom_requirements():
    with pytest.raises(ConfigError, match="conflicts with model.preset=ViT-B"):
        load_config(CONFIG_DIR / "pretrain" / "in256_vitb16.yaml", ["model.depth=6"])
    with pytest.raises(ConfigError, match="model.depth must be set"):
        load_config(None, ["model.depth=null"])


def test_stage_mismatch_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="was given a 'pretrain' config"):
        load_config(CONFIG_DIR / "pretrain" / "demo.yaml", [], stage="denoise")


def test_batch_must_divide_over_ranks():
    cfg = load_config(None, ["train.global_batch=64"])
    check_world(cfg, 4)
    with pytest.raises(ConfigError, match="not divisible by the 3 ranks"):
        check_world(cfg, 3)


def test_base_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_eval_knn_needs_its_trees_and_the_pretraining_stage():
    with pytest.raises(ConfigError, match="eval.knn_every needs eval.knn_train and eval.knn_test"):
        load_config(None, ["eval.knn_every=10"], stage="pretrain")
    with pytest.raises(ConfigError, match="eval.knn_every monitors the pre-training encoder"):
        load_config(None, ["eval.knn_every=10", "eval.knn_train=/a", "eval.knn_test=/b"], stage="denoise")
    with pytest.raises(ConfigError, match="eval.knn_limit >= 1"):
        load_config(None, ["eval.knn_limit=0"], stage="pretrain")
    cfg = load_config(None, ["eval.knn_every=10", "eval.knn_train=~/x", "eval.knn_test=$HOME/y"], stage="pretrain")
    assert not cfg.eval.knn_train.startswith("~") and not cfg.eval.knn_test.startswith("$")

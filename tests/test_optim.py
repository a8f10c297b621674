"""The optimiser side (epg_fast/optim.py) against the reference implementation's training
scripts: warmup k / W, the cosine and step schedules, the weight-decay exemption of the token
parameters in every stage's real model, and gradient clipping only after warmup through a
real DeepSpeed engine. Expected values come from the released configs' formulas."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epg_fast.ops import Ops
from epg_fast.stages import load_config
from epg_fast.optim import GradClip, build_optimizer, build_scheduler, lr_factor


def test_warmup_is_k_over_w_then_cosine():
    """The reference's LambdaLR steps after each optimiser step, so step k runs at factor
    k / W: the first step at lr 0, step W at the full lr, then cosine to 0 at K."""
    cfg = load_config(None, ["optim.warmup_steps=10", "train.total_steps=110"])
    f = lr_factor(cfg.optim, 110)
    assert [f(k) for k in (0, 1, 5, 9, 10)] == [0.0, 0.1, 0.5, 0.9, 1.0]
    assert f(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 50 / 100)))
    assert f(110) == pytest.approx(0.0, abs=1e-12) and f(500) == pytest.approx(0.0, abs=1e-12)
    # through the trainer's optimiser and scheduler: the lr each optimiser step runs at
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(cfg)(opt)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, cfg.optim.lr / 10, 2 * cfg.optim.lr / 10])


def test_consistency_preset_uses_the_released_step_schedule():
    """configs/imagenet256_consistency.py (warmup-step, warmup 10000): k / W, then x1 up to
    and including step 400000, x0.3 up to 500000, x0.08 after."""
    cfg = load_config("configs/consistency/in256_epg_l16.yaml")
    f = lr_factor(cfg.optim, cfg.train.total_steps)
    steps = (0, 5_000, 10_000, 400_000, 400_001, 500_000, 500_001, 999_999)
    assert [f(k) for k in steps] == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.3, 0.3, 0.08, 0.08])


def _stage_model(stage: str):
    from epg_fast.stages import build_stage

    cfg = load_config(None, ["optim.decay_tokens=false", "init.encoder=null"] * (stage != "pretrain")
                      or ["optim.decay_tokens=false"], stage=stage)
    torch.manual_seed(0)
    return cfg, build_stage(cfg, torch.device("cpu"), Ops()).model


@pytest.mark.parametrize("stage,tokens", [
    ("pretrain", {"encoder.pos_embed", "encoder.cls_token"}),
    ("denoise", {"pos_embed", "cls_token"}),
    ("consistency", {"pos_embed", "cls_token"}),
])
def test_decay_tokens_false_exempts_the_tokens_of_every_stage(stage, tokens):
    cfg, model = _stage_model(stage)
    by_id = {id(p): n for n, p in model.named_parameters()}
    groups = build_optimizer(model, cfg, torch.device("cpu")).param_groups
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0
    assert {by_id[id(p)] for p in groups[1]["params"]} == tokens
    assert groups[0]["weight_decay"] == cfg.optim.weight_decay and len(groups[0]["params"]) == len(by_id) - 2


def test_grad_clip_after_warmup_schedule():
    cfg = load_config(None, ["optim.grad_clip=0.5", "optim.clip_after_warmup=true", "optim.warmup_steps=3"])
    assert [GradClip(cfg.optim).at(k) for k in range(5)] == [0.0, 0.0, 0.0, 0.5, 0.5]
    always = load_config(None, ["optim.grad_clip=0.5", "optim.warmup_steps=3"])
    assert [GradClip(always.optim).at(k) for k in range(5)] == [0.5] * 5


def _clip_worker(rank: int, init_file: str, out: dict) -> None:
    import os

    os.environ["DS_ACCELERATOR"] = "cpu"
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ[key] = value
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    import deepspeed  # one process for both engines: DeepSpeed's CPU set-up costs minutes here

    cfg = load_config(None, ["optim.grad_clip=1.0", "optim.clip_after_warmup=true", "optim.warmup_steps=2"])
    for zero_stage in (0, 1):
        model = torch.nn.Linear(4, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            config={"train_batch_size": 1, "gradient_clipping": cfg.optim.grad_clip,
                    "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": zero_stage},
                    "steps_per_print": 10**12})
        clip, x = GradClip(cfg.optim), torch.tensor([[3.0, 4.0, 0.0, 0.0]])  # gradient norm 5 every step
        moves = []
        for step in range(4):
            before = engine.module.weight.detach().clone()
            engine.backward(engine(x).sum())
            clip.apply(engine, step)
            engine.step()
            moves.append(float((engine.module.weight.detach() - before).norm()))
        out[zero_stage] = moves
    dist.destroy_process_group()


def test_grad_clip_after_warmup_in_deepspeed(tmp_path):
    """SGD with lr 1 moves the weights by the (clipped) gradient: norm 5 during the two warmup
    steps, 1 (= optim.grad_clip) after, at ZeRO 0 (the engine clips) and ZeRO 1 (its
    optimiser wrapper clips; ZeRO 2 and 3 and fp16 read the same clip_grad attribute)."""
    out = mp.Manager().dict()
    mp.spawn(_clip_worker, args=(str(tmp_path / "init"), out), nprocs=1, join=True)
    assert out[0] == pytest.approx([5.0, 5.0, 1.0, 1.0], rel=1e-5)
    assert out[1] == pytest.approx([5.0, 5.0, 1.0, 1.0], rel=1e-5)


# The released runs (AMAP-ML/EPG configs/imagenet256_*.py and the scripts/*.sh that launch
# them, the scripts' overrides winning), written out here from those files.
RELEASED = {
    "configs/pretrain/in256_vitb16.yaml": {  # the launch script's run (scripts/pretrain.sh)
        "model.preset": "ViT-B", "model.proj_hidden": 4096, "model.proj_dim": 768, "optim.lr": 6e-4,
        "optim.betas": [0.9, 0.95], "optim.weight_decay": 0.03, "optim.decay_tokens": True,
        "optim.warmup_steps": 10000, "optim.schedule": "cosine", "data.precropped": True,
        "train.global_batch": 1024, "train.total_steps": 600_000, "pretrain.s0": 20, "pretrain.s1": 1280,
        "pretrain.target_ema": 0.99, "pretrain.tau_contrastive": 0.2, "pretrain.tau_consistency": 0.1,
    },
    "configs/denoise/in256_epg_xl16.yaml": {
        "optim.lr": 1e-4, "optim.betas": [0.9, 0.999], "optim.weight_decay": 0.01, "optim.decay_tokens": False,
        "optim.warmup_steps": 10000, "optim.schedule": "cosine", "optim.grad_clip": 0.5,
        "optim.clip_after_warmup": True, "denoise.p_mean": -1.2, "denoise.p_std": 1.6, "denoise.levels": 1280,
        "finetune.label_dropout": 0.1, "finetune.ema": 0.9999, "train.global_batch": 1024,
        "train.total_steps": 1_000_000, "model.preset": "EPG-XL", "model.dropout": 0.0,
    },
    "configs/consistency/in256_epg_l16.yaml": {
        "optim.lr": 1e-4, "optim.betas": [0.9, 0.99], "optim.weight_decay": 0.03, "optim.decay_tokens": False,
        "optim.warmup_steps": 10000, "optim.schedule": "step", "optim.milestones": [400000, 500000],
        "optim.factors": [0.3, 0.08], "optim.grad_clip": 0.0, "consistency.p_mean": -0.4, "consistency.p_std": 1.6,
        "consistency.q": 2.0, "consistency.k": 8.0, "consistency.b": 1.0, "consistency.huber_c": 0.06,
        "consistency.round_steps": 100000, "consistency.round_offset": 1, "consistency.perceptual_weight": 1.0,
        "finetune.label_dropout": 0.0, "finetune.ema": 0.9999, "train.global_batch": 256,
        "train.total_steps": 1_000_000, "model.preset": "EPG-L", "model.dropout": 0.5,
    },
}


@pytest.mark.parametrize("path", list(RELEASED))
def test_paper_presets_are_the_released_configs(path):
    cfg = load_config(path).to_dict()
    for dotted, want in RELEASED[path].items():
        section, key = dotted.split(".")
        assert cfg[section][key] == pytest.approx(want), dotted


@pytest.mark.parametrize("path", list(RELEASED))
def test_every_preset_value_names_its_source(path):
    """The header comment of a paper preset mentions every key its YAML body sets."""
    import yaml

    text = open(path).read()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    body = yaml.safe_load(text)
    body.pop("base", None), body.pop("stage", None)
    for section, values in body.items():
        for key in values:
            assert key in header, f"{path}: {section}.{key} has no source in the header comment"


def test_print_config_shows_each_preset_value_with_its_source(capsys):
    """`train.py --print-config` (and the start-up block, which prints the same text) shows the
    preset's source notes and the resolved values, before anything is built."""
    from epg_fast.train import main

    assert main(["--stage", "consistency", "--config", "configs/consistency/in256_epg_l16.yaml", "--print-config"]) == 0
    out = capsys.readouterr().out
    notes, resolved = out.split("resolved config:")
    assert "configs/consistency/in256_epg_l16.yaml:" in notes and "in256_epg_xl16.yaml:" in notes  # and its base
    assert "customized_lr_scheduler \"warmup-step\"" in notes and "cfg train.gradclip 0.0" in notes
    assert "schedule: step" in resolved and "milestones:\n  - 400000\n  - 500000" in resolved
    assert "round_steps: 100000" in resolved

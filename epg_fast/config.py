"""Configuration: YAML presets + dotted command-line overrides, validated before any work.

A config is plain data: nested dataclasses whose field annotations are the schema. Loading
goes defaults <- YAML file <- `section.key=value` overrides; every key is checked against
the schema (an unknown key names the closest valid one) and every value against its type
and range, so a typo fails in one line instead of an hour into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
STAGES = ("pretrain", "denoise", "consistency")


class ConfigError(ValueError):
    """A bad config: the message is one line that names the key and what is wrong."""


class _YAMLLoader(yaml.SafeLoader):
    """YAML without base-60 integers: `log.profile=10:5` stays "10:5" (YAML 1.1 reads 605)."""


_YAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class ModelConfig:
    # "custom", or a preset that fills the architecture fields below: for pre-training an
    # encoder of models.encoder.ENCODER_PRESETS ("ViT-B", "EPG-L", ...), for fine-tuning a
    # model of models.epg.EPG_PRESETS (encoder + decoder: "EPG-L", "EPG-XL", ...).
    preset: str = "custom"
    depth: int | None = None
    dim: int | None = None
    heads: int | None = None
    decoder_dim: int | None = None  # fine-tuning; custom default: dim
    decoder_heads: int | None = None  # fine-tuning; custom default: heads
    num_classes: int = 1000  # fine-tuning: class-conditional generation (+1 "no class" label)
    image_size: int = 256
    patch_size: int = 16
    cls_tokens: int = 1
    mlp_ratio: float = 4.0
    # Pre-training: after attention and in the MLP of every block; fine-tuning: only on the
    # decoder attention output, as the reference (its consistency EPG-L: 0.5).
    dropout: float = 0.0
    proj_hidden: int = 4096  # projector hidden width (spec: 4096)
    proj_dim: int = 256  # projector output width
    attention: str = field(default="auto", metadata=_choices("auto", "flash", "sdpa", "cudnn", "efficient", "math"))
    # Fused Triton kernels: "auto" = on CUDA tensors, "triton" = always (CPU needs
    # TRITON_INTERPRET=1), "reference" = PyTorch ops. EPG_KERNELS in the environment wins.
    kernels: str = field(default="auto", metadata=_choices("auto", "triton", "reference"))


@dataclass
class DataConfig:
    root: str | None = None  # ImageFolder tree; None = the embedded demo data (smoke test only)
    # "images" (the tree at root) or "synthetic" (random pixels and labels, no disk: benchmarks, smoke runs)
    source: str = field(default="images", metadata=_choices("images", "synthetic"))
    loader: str = field(default="torch", metadata=_choices("torch", "dali"))  # dali: pip install -e ".[dali]"
    precropped: bool = False  # tree already holds ADM center crops at image_size (paper setup)
    # "folder": an ImageFolder tree of image files; "raw": uint8 center-crop shards written by
    # `python -m epg_fast.data.precrop SRC DST --format raw` (no decode; torch loader).
    format: str = field(default="folder", metadata=_choices("folder", "raw"))
    # Where the views' photometric augmentations run (torch loader): "pil" in the workers (the
    # reference), "device": the workers only crop, the trainer augments on its device, bit-exact.
    augment: str = field(default="pil", metadata=_choices("pil", "device"))
    decode_draft: bool = False  # augment=device: decode JPEGs at 1/2-1/8 scale when every view allows
    # The validated file index: "auto" (cached next to the data, or in the epg_fast cache
    # folder when the data is read-only), "none" (scan every start), or a cache file path.
    index_cache: str = "auto"
    normalization: str = field(default="imagenet", metadata=_choices("imagenet", "simple"))
    workers: int = 4
    prefetch: int = 2  # batches prefetched per worker


@dataclass
class PretrainConfig:
    s0: int = 20  # curriculum: initial number of discretisation steps
    s1: int = 1280  # curriculum: final number of discretisation steps
    tau_contrastive: float = 0.2
    tau_consistency: float = 0.1
    target_ema: float = 0.99
    # Target projector BatchNorm. "initial" (reference quirk): the target stays in eval mode
    # and only parameters are EMA'd, so it normalises with running stats mean 0 / var 1.
    # "ema": EMA the running statistics too. "batch": target normalises with batch stats.
    target_bn: str = field(default="initial", metadata=_choices("initial", "ema", "batch"))
    # How sg(f(b').h) is computed: "no_grad" (fast) or "detach" (reference: build, then detach).
    consistency_target: str = field(default="no_grad", metadata=_choices("no_grad", "detach"))


@dataclass
class InitConfig:
    # Fine-tuning: the pre-training checkpoint folder (step_XXXXXXXX) or a state-dict file whose
    # encoder weights start the EPG encoder; the projector is dropped. None = random init.
    encoder: str | None = None
    # Missing or unexpected encoder keys (e.g. another depth) are an error unless this is true.
    allow_partial: bool = False


@dataclass
class FinetuneConfig:
    label_dropout: float = 0.1  # share of labels replaced by "no class" (classifier-free guidance)
    ema: float = 0.9999  # EMA rate of the weights used for sampling
    sample_count: int = 16
    sample_sampler: str = field(default="auto", metadata=_choices("auto", "euler", "heun", "onestep"))
    sample_steps: int = 32  # levels of the sampler (auto: heun for denoise, onestep for consistency)
    sample_guidance: float = 1.0  # classifier-free guidance scale inside the interval (1 = off)


@dataclass
class DenoiseConfig:
    p_mean: float = -1.2  # ln sigma ~ N(p_mean, p_std^2), snapped to the grid
    p_std: float = 2.0
    levels: int = 1280


@dataclass
class ConsistencyConfig:
    p_mean: float = -1.1  # ln t ~ N(p_mean, p_std^2)
    p_std: float = 2.0
    q: float = 4.0  # ECT: r = t (1 - q^-round (1 + k sigmoid(-b t)))
    k: float = 8.0
    b: float = 1.0
    round_steps: int = 10_000  # d: steps per ECT round (ECT's "stage")
    round_offset: int = 0  # round = round_offset, then + step // round_steps after step d (the reference starts at 1)
    huber_c: float = 0.08  # pseudo-Huber constant
    # Optional perceptual term: weight of the NCE between the frozen pre-training network's
    # projector features (init.encoder) of the prediction and of the clean image; 0 = off
    # (the reference uses 1).
    perceptual_weight: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 2e-4
    scale_lr: bool = False  # multiply lr by global_batch / 1024
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.03
    decay_tokens: bool = True  # weight decay on pos_embed and cls tokens too (reference pre-training)
    warmup_steps: int = 10_000  # lr factor k / warmup_steps at step k (the first step runs at 0)
    # After warmup: "cosine" decay to 0 at train.total_steps, or "step": factor 1, then
    # factors[i] once the step exceeds milestones[i] (see epg_fast/optim.py).
    schedule: str = field(default="cosine", metadata=_choices("cosine", "step"))
    milestones: list[int] = field(default_factory=list)
    factors: list[float] = field(default_factory=list)
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    clip_after_warmup: bool = False  # clip only from step warmup_steps on (reference denoising)
    # The AdamW kernel (epg_fast.optimizers): torch (fused on CUDA), deepspeed (FusedAdam), apex (FusedAdam)
    impl: str = field(default="torch", metadata=_choices("torch", "deepspeed", "apex"))


@dataclass
class TrainConfig:
    global_batch: int = 1024
    total_steps: int = 600_000
    stop_after: int | None = None  # end this run (with a checkpoint) at this step; resume later
    seed: int = 0
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    precision: str = field(default="auto", metadata=_choices("auto", "fp32", "bf16", "fp16"))
    zero_stage: int = 0
    run_dir: str | None = None  # None = runs/<stage>-<config name>
    save_every: int = 5000
    sample_every: int = 5000  # fine-tuning: steps between EMA sample grids in run_dir/samples (0 = never)
    keep_last: int = 3  # completed checkpoints kept on disk
    dist_timeout: float = 30.0  # minutes a rank waits in a collective for a hung or dead peer, then fails
    max_nonfinite: int = 20  # consecutive steps with a non-finite loss or update that stop the run
    resume: str = "auto"  # "auto" (newest valid checkpoint in run_dir), "none", or a checkpoint path
    compile: bool = False  # torch.compile the online network (and the target where the loss runs it)
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager" compiles fast (tests)


@dataclass
class LogConfig:
    every: int = 10  # steps between metric lines
    progress: bool = True
    tensorboard: bool = True
    peak_tflops: float | None = None  # MFU denominator; None = the measured bf16 matmul peak (cached per GPU)
    breakdown: bool = True  # time/<phase> shares of the step time in every metrics record
    profile: str | None = None  # "STEP:N": torch.profiler trace of N steps from STEP into <run_dir>/profile/
    profile_stack: bool = False  # Python stacks in that trace (larger, slower)
    memory_snapshot: int | None = None  # STEP: CUDA allocator history of that step (profile/memory_step_STEP.pickle)


@dataclass
class EvalConfig:
    # Pre-training monitor: every knn_every steps (0 = off) rank 0 logs knn_top1, the k-NN
    # top-1 of the online encoder on labelled ImageFolder trees (epg_fast.probe protocol).
    knn_every: int = 0
    knn_train: str | None = None  # the k-NN memory, e.g. the CIFAR-10 train tree
    knn_test: str | None = None  # held-out images with the same class folders
    knn_limit: int = 5000  # a seeded random subset of at most this many images of each tree


@dataclass
class Config:
    stage: str = field(default="pretrain", metadata=_choices(*STAGES))
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    init: InitConfig = field(default_factory=InitConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Building a config from YAML + overrides


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check (and gently coerce int -> float) a YAML value against a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(annotation):
            ok, coerced = _type_ok(value, arm)
            if ok:
                return True, coerced
        return False, value
    if annotation is type(None):
        return value is None, value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_type_ok(v, item_type) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if annotation is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML reads "2e-4" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, annotation), value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    names = [f.name for f in dataclasses.fields(section)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' is a section; set its keys, e.g. {dotted}.<key>=...")
            _apply(current, value, dotted + ".")
            continue
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            raise ConfigError(
                f"'{dotted}' must be {_type_name(hints[key])}, got {value!r} ({type(value).__name__})"
            )
        setattr(section, key, coerced)


def _check_choices(section: Any, prefix: str) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(
                f"'{prefix}{f.name}' must be one of {', '.join(f.metadata['choices'])}; got {value!r}"
            )


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1 c=x` -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a key inside a value")
        try:
            node[leaf] = yaml.load(raw, Loader=_YAMLLoader) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(err)})") from None
    return tree


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'expected ',' or ']' at line 2, column 1' from a YAML error (PyYAML's are multi-line)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(err, 'problem', None) or type(err).__name__}{where}"


def default_config_path(stage: str) -> Path:
    return CONFIG_DIR / stage / "demo.yaml"


def _read_with_bases(path: Path, seen: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """The YAML layers of a preset as (file, values), base first: a file may name another
    with `base: FILE` (relative to itself) and override only what differs."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config base cycle: {' -> '.join(map(str, seen + [path]))}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_YAMLLoader) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop("base", None)
    layers = _read_with_bases(path.parent / base, seen + [path.resolve()]) if base else []
    return layers + [(path, data)]


def read_config(path: str | Path | None, overrides: Sequence[str] = (), stage: str | None = None) -> Config:
    """Defaults <- YAML preset <- dotted overrides, every key and type checked. The values
    are checked by the stage (`Stage.configure`, which also expands model presets) and then
    by `check_config`: `epg_fast.stages.load_config` runs all three."""
    cfg = Config()
    if path is None:
        path = default_config_path(stage or cfg.stage)
    path = Path(path)
    cfg.name = path.stem
    for _, layer in _read_with_bases(path, []):
        _apply(cfg, layer, "")
    _apply(cfg, parse_overrides(list(overrides)), "")
    if stage is not None and cfg.stage != stage:
        raise ConfigError(f"--stage {stage} was given a '{cfg.stage}' config ({path})")
    _check_choices(cfg, "")
    return cfg


def parse_profile_spec(spec: str | None) -> tuple[int, int] | None:
    """'STEP:N' -> (STEP, N): record N >= 1 steps from step STEP (0-based). None -> None."""
    if spec is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(spec))
    if match is None or int(match[2]) < 1:
        raise ValueError(f"{spec!r} is not STEP:N (N >= 1 steps from step STEP, e.g. 10:5)")
    return int(match[1]), int(match[2])


def preset_comments(path: str | Path | None, stage: str | None = None) -> str:
    """The comment block that opens the preset file and each of its bases (the file first):
    the paper presets name there the released source of every value they set."""
    path = Path(path) if path is not None else default_config_path(stage or Config().stage)
    blocks = []
    for file, _ in reversed(_read_with_bases(path, [])):
        lines = []
        for line in file.read_text().splitlines():
            if not line.startswith("#"):
                break
            lines.append(line)
        if lines:
            blocks.append(f"{file}:\n" + "\n".join(lines))
    return "\n".join(blocks)



def check_config(cfg: Config) -> None:
    """The range checks every stage shares (the architecture is resolved by then), and the
    default run dir; raises ConfigError."""
    m = cfg.model
    positive = {
        "model.image_size": m.image_size, "model.patch_size": m.patch_size,
        "model.cls_tokens": m.cls_tokens, "model.proj_hidden": m.proj_hidden,
        "model.proj_dim": m.proj_dim, "train.global_batch": cfg.train.global_batch,
        "train.total_steps": cfg.train.total_steps, "train.save_every": cfg.train.save_every,
        "train.keep_last": cfg.train.keep_last, "log.every": cfg.log.every,
        "pretrain.s0": cfg.pretrain.s0, "optim.lr": cfg.optim.lr, "model.mlp_ratio": m.mlp_ratio,
        "train.dist_timeout": cfg.train.dist_timeout, "train.max_nonfinite": cfg.train.max_nonfinite,
        "pretrain.tau_contrastive": cfg.pretrain.tau_contrastive,
        "pretrain.tau_consistency": cfg.pretrain.tau_consistency,
    }
    for key, value in positive.items():
        if not value > 0 or not math.isfinite(value):  # `not >` also refuses nan
            raise ConfigError(f"'{key}' must be > 0 and finite, got {value}")
    if m.dim % 2:
        raise ConfigError(f"model.dim={m.dim} must be even (sinusoidal time embedding)")
    if m.image_size % m.patch_size:
        raise ConfigError(
            f"model.image_size={m.image_size} is not divisible by model.patch_size={m.patch_size}"
        )
    if cfg.pretrain.s1 < cfg.pretrain.s0:
        raise ConfigError(f"pretrain.s1={cfg.pretrain.s1} must be >= pretrain.s0={cfg.pretrain.s0}")
    if not 0.0 <= cfg.pretrain.target_ema < 1.0:
        raise ConfigError(f"pretrain.target_ema must be in [0, 1), got {cfg.pretrain.target_ema}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.optim.weight_decay < 0 or cfg.optim.warmup_steps < 0 or cfg.optim.grad_clip < 0:
        raise ConfigError("optim.weight_decay, optim.warmup_steps and optim.grad_clip must be >= 0")
    o = cfg.optim
    increasing = o.milestones == sorted(set(o.milestones))
    if len(o.milestones) != len(o.factors) or not increasing or any(f < 0 for f in o.factors):
        raise ConfigError(f"optim.milestones must increase and match optim.factors (>= 0) one to one; "
                          f"got {o.milestones} and {o.factors}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if cfg.train.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {cfg.train.zero_stage}")
    if cfg.train.stop_after is not None and not 0 < cfg.train.stop_after <= cfg.train.total_steps:
        raise ConfigError(
            f"train.stop_after={cfg.train.stop_after} must be in [1, train.total_steps={cfg.train.total_steps}]"
        )
    if cfg.data.workers < 0 or cfg.data.prefetch < 1:
        raise ConfigError("data.workers must be >= 0 and data.prefetch >= 1")
    try:
        parse_profile_spec(cfg.log.profile)
    except ValueError as err:
        raise ConfigError(f"log.profile={err}") from None
    if cfg.log.memory_snapshot is not None and cfg.log.memory_snapshot < 0:
        raise ConfigError(f"log.memory_snapshot must be a step >= 0, got {cfg.log.memory_snapshot}")
    if cfg.data.root is not None and not str(cfg.data.root).strip():
        raise ConfigError("data.root is empty: give an ImageFolder path, or data.root=null for the demo data")
    e = cfg.eval
    for section, key in ((cfg.data, "root"), (cfg.init, "encoder"), (e, "knn_train"), (e, "knn_test")):
        if getattr(section, key):  # a preset may name ~/... or $EPG_CACHE_DIR/... paths
            setattr(section, key, os.path.expandvars(os.path.expanduser(getattr(section, key))))
    if e.knn_every < 0 or e.knn_limit < 1:
        raise ConfigError("eval.knn_every must be >= 0 and eval.knn_limit >= 1")
    if e.knn_every and (not e.knn_train or not e.knn_test or cfg.train.zero_stage == 3):
        raise ConfigError("eval.knn_every needs eval.knn_train and eval.knn_test, and ZeRO stage < 3")
    if cfg.train.run_dir is None:
        cfg.train.run_dir = f"runs/{cfg.stage}-{cfg.name}"


def check_world(cfg: Config, world_size: int) -> None:
    """Checks that need the number of ranks; call before building anything."""
    if cfg.train.global_batch % world_size:
        raise ConfigError(
            f"train.global_batch={cfg.train.global_batch} is not divisible by the {world_size} ranks"
        )

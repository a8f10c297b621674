"""The small-scale reproduction on CIFAR-10: does pre-training learn semantic features, and
does it make the fine-tuned generator better than training from scratch?

    python benchmarks/cifar10.py [--quick] [--out benchmarks/results] [--work DIR]
    python benchmarks/cifar10.py --measure     # what the pieces cost here, and the plan

From ../shared/data/cifar10-jpg.tar.gz (relative to the repository root; skipped with a
message when absent), unpacked once into $EPG_CACHE_DIR/cifar10 (default
~/.cache/epg_fast/cifar10), never into the repository:
(a) pre-train the encoder of configs/pretrain/cifar10.yaml (k-NN monitor on);
(b) probe it against a random initialisation of the same architecture (k-NN top-1 and a
    linear probe, epg_fast.probe) and the raw-pixel k-NN floor;
(c) fine-tune configs/denoise/cifar10.yaml from the pre-trained encoder and from scratch,
    equal steps, batch and compute; at every evaluation point draw images with Heun (32
    levels) and classifier-free guidance inside the interval, FID and KID against the
    CIFAR-10 test set (epg_fast.fid, the standard Inception); plus a one-step consistency
    model (configs/consistency/cifar10.yaml) from the pre-trained encoder;
(d) write <out>/cifar10-<date>.json and .md (the table), cifar10-<date>-fid.png (FID
    against training images, both arms) and sample grids.

The test-set Inception features are cached (epg_fast.fid), so only the first run pays for
them. `--quick` runs the same pipeline with a tiny model and a handful of images (a CI smoke
test: its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import REPO, git_commit, write_report  # noqa: E402

ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
TRAIN = REPO / "epg_fast" / "train.py"


@dataclass
class Plan:
    """How much of everything a run does. The defaults are the full run, sized from
    `--measure` on 2 cores (2026-11-30; CPU-seconds per image: pre-training 0.060, denoise and
    consistency 0.052, Inception 0.33, Heun 32 levels with guidance 0.77) to about 88 minutes
    on 2 dedicated cores, with the test-set Inception features already cached (the sanity
    command in benchmarks/results/cifar10-sanity.md does that; else add ~28 minutes)."""

    pretrain_steps: int = 400  # 51,200 images, about one epoch
    finetune_steps: int = 200  # per arm: 25,600 images
    consistency_steps: int = 100
    eval_points: list[int] = field(default_factory=lambda: [100, 200])  # fine-tuning steps
    curve_images: int = 200  # generated images per intermediate point (KID is unbiased at this size)
    final_images: int = 2000  # generated images at the last point and for the consistency model
    reference_images: int = 10_000  # CIFAR-10 test images for the FID reference
    probe_train: int = 10_000  # probe: training images (k-NN memory, linear fit)
    probe_test: int = 2_000
    guidance: float = 2.0
    heun_steps: int = 16  # half the paper's 32 levels: sampling would otherwise cost ~50 of the 90 minutes
    overrides: list[str] = field(default_factory=list)  # model size etc., for every stage


FULL = Plan()
QUICK = Plan(pretrain_steps=6, finetune_steps=6, consistency_steps=4, eval_points=[6], curve_images=20,
             final_images=20, reference_images=50, probe_train=100, probe_test=50, heun_steps=4,
             overrides=["model.depth=2", "model.dim=32", "model.heads=2", "model.decoder_dim=32",
                        "model.decoder_heads=2", "model.proj_hidden=64", "model.proj_dim=16", "train.global_batch=16",
                        "data.workers=0", "optim.warmup_steps=2", "log.tensorboard=false",
                        "finetune.ema=0.5"])  # at 0.999, 6 steps leave the EMA at the zero-initialised output


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def unpack(archive: Path) -> Path:
    """The archive's tree (train/, test/) in the cache folder, unpacked once."""
    base = Path(os.environ.get("EPG_CACHE_DIR") or Path.home() / ".cache" / "epg_fast") / "cifar10"
    stamp = base / ".unpacked"
    key = f"{archive.stat().st_size} {archive.stat().st_mtime_ns}"
    if not (stamp.is_file() and stamp.read_text() == key):
        say(f"unpacking {archive} into {base}")
        base.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(base, filter="data")
        stamp.write_text(key)
    return base


def train(stage: str, run_dir: Path, overrides: list[str], env: dict) -> float:
    """One training run as the user would start it; returns its wall-clock seconds."""
    cmd = [sys.executable, str(TRAIN), "--stage", stage, "--config", str(REPO / "configs" / stage / "cifar10.yaml"),
           f"train.run_dir={run_dir}", "log.progress=false", *overrides]
    say(" ".join(cmd[1:]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (run_dir / "stdout.log").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "stdout.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f"{stage} training failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def evaluate(ckpt: Path, out: Path, num: int, plan: Plan, sampler: str, test_root: Path, env: dict) -> dict:
    """Sample `num` images from a checkpoint and score them against the test set."""
    from epg_fast import fid

    cmd = [sys.executable, "-m", "epg_fast.sample", str(ckpt), "--out", str(out), "--num", str(num),
           "--labels", "balanced", "--batch-size", "100", "--sampler", sampler]
    if sampler == "heun":
        cmd += ["--steps", str(plan.heun_steps), "--guidance", str(plan.guidance)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"sampling {ckpt} failed:\n{proc.stderr[-3000:]}")
    sample_s = time.perf_counter() - start
    nfe = next((line.split(":")[1].split()[0] for line in proc.stdout.splitlines() if line.startswith("NFE")), None)
    (npz,) = out.glob("samples_*.npz")
    start = time.perf_counter()
    scores = fid.evaluate(npz, test_root, batch_size=50, ref_limit=plan.reference_images)
    return {"fid": scores["fid"], "kid": scores["kid"], "kid_std": scores["kid_std"], "images": num,
            "nfe": int(nfe) if nfe else None, "sample_s": sample_s, "score_s": time.perf_counter() - start,
            "grid": str(out / "grid.png")}


def run(plan: Plan, out_dir: Path, work: Path, quick: bool) -> dict:
    from epg_fast import probe

    data = unpack(ARCHIVE)
    train_root, test_root = data / "train", data / "test"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    common = [f"data.root={train_root}", *plan.overrides]
    seconds: dict[str, float] = {}
    results: dict = {"plan": asdict(plan), "quick": quick, "commit": git_commit(),
                     "date": datetime.date.today().isoformat(), "cpus": os.cpu_count()}

    # (a) pre-training
    pre_dir = work / "pretrain"
    seconds["pretrain"] = train("pretrain", pre_dir, common + [
        f"train.total_steps={plan.pretrain_steps}", f"train.save_every={plan.pretrain_steps}",
        f"eval.knn_train={train_root}", f"eval.knn_test={test_root}",
        f"eval.knn_every={max(1, plan.pretrain_steps // (4 if not quick else 2))}", f"eval.knn_limit={plan.probe_test}"], env)
    ckpt = pre_dir / "checkpoints" / f"step_{plan.pretrain_steps:08d}"
    rows = [json.loads(line) for line in (pre_dir / "metrics.jsonl").read_text().splitlines()]
    results["pretrain"] = {"knn_monitor": [(r["step"], r["knn_top1"]) for r in rows if "knn_top1" in r],
                           "final_loss": next(r["loss"] for r in reversed(rows) if "loss" in r)}

    # (b) probes
    start = time.perf_counter()
    limits = dict(limit_train=plan.probe_train, limit_test=plan.probe_test)
    results["probe"] = {
        "pretrained": probe.probe(str(ckpt), str(train_root), str(test_root), **limits),
        "random_init": probe.probe(str(ckpt), str(train_root), str(test_root), random_init=True, **limits),
        "pixels": probe.probe(None, str(train_root), str(test_root), pixels=True, linear=False, **limits),
    }
    seconds["probe"] = time.perf_counter() - start
    for name, r in results["probe"].items():
        say(f"probe {name}: k-NN {100 * r['knn_top1']:.1f}%"
            + ("" if r["linear_top1"] is None else f", linear {100 * r['linear_top1']:.1f}%"))

    # (c) fine-tuning: two arms with equal steps, then the consistency model
    batch = next((int(o.split("=")[1]) for o in plan.overrides if o.startswith("train.global_batch=")), 128)
    arms = {"pretrained": str(ckpt), "scratch": "null"}
    results["denoise"] = {}
    for arm, init in arms.items():
        run_dir = work / f"denoise-{arm}"
        seconds[f"denoise_{arm}"] = train("denoise", run_dir, common + [
            f"init.encoder={init}", f"train.total_steps={plan.finetune_steps}",
            f"train.save_every={min(plan.eval_points)}", f"train.keep_last={len(plan.eval_points) + 1}",
            "train.sample_every=0"], env)
        curve = []
        for step in plan.eval_points:
            num = plan.final_images if step == plan.eval_points[-1] else plan.curve_images
            point = evaluate(run_dir / "checkpoints" / f"step_{step:08d}", work / "samples" / f"{arm}-{step}",
                             num, plan, "heun", test_root, env)
            point.update(step=step, train_images=step * batch)
            say(f"denoise {arm} step {step}: FID {point['fid']:.2f}, KID {point['kid']:.4f} ({num} images)")
            curve.append(point)
        results["denoise"][arm] = curve
    run_dir = work / "consistency"
    seconds["consistency"] = train("consistency", run_dir, common + [
        f"init.encoder={ckpt}", f"train.total_steps={plan.consistency_steps}",
        f"train.save_every={plan.consistency_steps}", "train.sample_every=0",
        f"consistency.round_steps={max(1, plan.consistency_steps // 4)}"], env)
    point = evaluate(run_dir / "checkpoints" / f"step_{plan.consistency_steps:08d}", work / "samples" / "consistency",
                     plan.final_images, plan, "onestep", test_root, env)
    point.update(step=plan.consistency_steps, train_images=plan.consistency_steps * batch)
    results["consistency"] = point
    say(f"consistency (one step): FID {point['fid']:.2f}, KID {point['kid']:.4f}")
    results["seconds"] = seconds
    results["cpu_seconds"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime + resource.getrusage(
        resource.RUSAGE_SELF).ru_utime
    return results


def markdown(results: dict, command: str) -> str:
    p, lines = results["probe"], []
    lines += [f"# CIFAR-10 small-scale reproduction ({results['date']}, commit {results['commit']})", "",
              f"Command: `{command}`" + (" (quick smoke run: the numbers mean nothing)" if results["quick"] else ""), "",
              "## Representation probe (CIFAR-10 test images vs training images)", "",
              "| encoder | k-NN top-1 | linear top-1 |", "|---|---|---|"]
    for name in ("pretrained", "random_init", "pixels"):
        r = p[name]
        lin = "" if r["linear_top1"] is None else f"{100 * r['linear_top1']:.1f}%"
        lines.append(f"| {name.replace('_', ' ')} | {100 * r['knn_top1']:.1f}% | {lin} |")
    lines += ["", f"k-NN: {p['pretrained']['protocol']}; {p['pretrained']['num_train']} train / "
              f"{p['pretrained']['num_test']} test images.", "",
              "## Generation: FID / KID against the CIFAR-10 test set", "",
              "| model | step | training images | generated | NFE | FID | KID |", "|---|---|---|---|---|---|---|"]
    for arm, curve in results["denoise"].items():
        for q in curve:
            lines.append(f"| denoise, {arm} | {q['step']} | {q['train_images']:,} | {q['images']} | {q['nfe']} | "
                         f"{q['fid']:.2f} | {q['kid']:.4f} |")
    c = results["consistency"]
    lines.append(f"| consistency, pretrained | {c['step']} | {c['train_images']:,} | {c['images']} | {c['nfe']} | "
                 f"{c['fid']:.2f} | {c['kid']:.4f} |")
    lines += ["", "Wall-clock seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()), ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for arm, curve in results["denoise"].items():
        ax.plot([q["train_images"] for q in curve], [q["fid"] for q in curve], "o-", label=f"denoise, {arm}")
    ax.set_xlabel("training images seen in fine-tuning")
    ax.set_ylabel("FID vs CIFAR-10 test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (all threads)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(work: Path) -> int:
    """Images per CPU-second of each piece, measured here, and the full plan's cost from them.
    CPU seconds rather than wall time: on a shared machine wall time measures the neighbours;
    a dedicated 2-core machine delivers about 2 CPU-seconds per second to these GEMMs."""
    import numpy as np
    import torch

    from epg_fast import fid

    data = unpack(ARCHIVE)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    costs, steps = {}, 6
    for stage in ("pretrain", "denoise", "consistency"):
        c0, w0 = cpu_seconds(), time.perf_counter()
        train(stage, work / f"measure-{stage}", [f"data.root={data / 'train'}", f"train.total_steps={steps}",
                                                 "log.every=3", "init.encoder=null", "eval.knn_every=0",
                                                 f"train.save_every={steps}", "train.sample_every=0"], env)
        rows = [json.loads(x) for x in (work / f"measure-{stage}" / "metrics.jsonl").read_text().splitlines()]
        costs[stage] = {"images": steps * 128, "cpu_s": cpu_seconds() - c0, "wall_s": time.perf_counter() - w0,
                        "wall_img_per_s_last_window": rows[-1]["img_per_s"]}
    net, _ = fid.load_inception(None)
    images = np.stack(list(fid.ImageSet(data / "test", limit=64).batches(64)))[0]
    c0, w0 = cpu_seconds(), time.perf_counter()
    fid.inception_outputs(net, iter([images[:32], images[32:]]), "cpu")
    costs["inception"] = {"images": 64, "cpu_s": cpu_seconds() - c0, "wall_s": time.perf_counter() - w0}
    (ckpt,) = (work / "measure-denoise" / "checkpoints").glob("step_*")
    c0, w0 = cpu_seconds(), time.perf_counter()
    evaluate_cmd = [sys.executable, "-m", "epg_fast.sample", str(ckpt), "--out", str(work / "measure-samples"),
                    "--num", "100", "--batch-size", "100", "--steps", str(FULL.heun_steps), "--guidance", "2"]
    subprocess.run(evaluate_cmd, env=env, capture_output=True, check=True, cwd=REPO)
    costs["heun_sampling"] = {"images": 100, "cpu_s": cpu_seconds() - c0, "wall_s": time.perf_counter() - w0}
    for name, c in costs.items():
        c["img_per_cpu_s"] = c["images"] / c["cpu_s"]
        say(f"{name}: {c['images']} images, {c['cpu_s']:.0f} CPU-s ({c['img_per_cpu_s']:.2f} img per CPU-s), "
            f"{c['wall_s']:.0f} s wall (load {os.getloadavg()[0]:.1f})")
    p, batch = FULL, 128
    heun_images = 2 * ((len(p.eval_points) - 1) * p.curve_images + p.final_images)  # both denoise arms
    generated = heun_images + p.final_images  # + the consistency model's (one step: its sampling is negligible)
    need = {  # CPU seconds
        "pretrain": p.pretrain_steps * batch / costs["pretrain"]["img_per_cpu_s"],
        "denoise (2 arms)": 2 * p.finetune_steps * batch / costs["denoise"]["img_per_cpu_s"],
        "consistency": p.consistency_steps * batch / costs["consistency"]["img_per_cpu_s"],
        "sampling (Heun)": heun_images / costs["heun_sampling"]["img_per_cpu_s"],
        "inception (generated)": generated / costs["inception"]["img_per_cpu_s"],
        "inception (test set, once)": p.reference_images / costs["inception"]["img_per_cpu_s"],
    }
    for name, cpu in need.items():
        say(f"plan: {name}: {cpu / 2 / 60:.1f} min on 2 dedicated cores")
    say(f"plan total: {sum(need.values()) / 2 / 60:.1f} min ({generated} generated images)")
    print(json.dumps({"costs": costs, "plan_minutes_2_cores": {k: v / 120 for k, v in need.items()}}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, a handful of images: a smoke test")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where the report goes")
    p.add_argument("--measure", action="store_true", help="time the pieces on this machine and print the plan")
    p.add_argument("--work", default=None, help="run folders (default: a temporary folder, removed at the end)")
    args = p.parse_args(argv)
    if not ARCHIVE.is_file():
        print(f"SKIPPED: {ARCHIVE} not found (the CIFAR-10 archive; see ../shared/data/README.md)")
        return 0
    plan = QUICK if args.quick else FULL
    work = Path(args.work) if args.work else Path(os.environ.get("TMPDIR", "/tmp")) / f"epg-cifar10-{os.getpid()}"
    if args.measure:
        return measure(work)
    start = time.perf_counter()
    results = run(plan, Path(args.out), work, args.quick)
    results["total_s"] = time.perf_counter() - start
    out = Path(args.out)
    stem = out / f"cifar10-{results['date']}{'-quick' if args.quick else ''}"
    command = "python benchmarks/cifar10.py" + (" --quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    for name, grid in [(f"{arm}", curve[-1]["grid"]) for arm, curve in results["denoise"].items()] + [
            ("consistency", results["consistency"]["grid"])]:
        shutil.copyfile(grid, f"{stem}-samples-{name}.png")
    plot(results, Path(f"{stem}-fid.png"))
    write_report(f"{stem}.json", f"{stem}.md", results, markdown(results, command))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    say(f"done in {results['total_s'] / 60:.1f} min: {stem}.json, .md, -fid.png, -samples-*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

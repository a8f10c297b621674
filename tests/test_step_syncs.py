"""Issue 13: no host-device synchronisation in a steady-state (non-logging) training step, for
every stage, counted on CPU by benchmarks/sync_count.py (epg_fast.syncs.SyncCounter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("pretrain", "denoise", "consistency")

COUNT = """
import json, sys
sys.path.insert(0, "benchmarks")
from sync_count import stage_syncs
out = {}
for s in sys.argv[1:]:
    syncs = stage_syncs(s, 3, "cpu", ["log.breakdown=true"])
    out[s] = {"steps": syncs.steps, "events": [e.kind + " at " + e.where for e in syncs.events]}
print("COUNTS", json.dumps(out))
"""


# Measured before the fix (per step): pretrain 10 (the level index all-reduce's upload and
# int/bool reads, the draw's int() on the step generator, float() of three level times, three
# torch.tensor(list, device=...) uploads of level times), denoise 3 and consistency 4 (the
# all-reduce's three, and torch.tensor(float(stage), device=...) in the consistency loss).
# The count runs the trainer's own step (epg_fast.train.TrainStep) with the step-time
# breakdown's timers on (log.breakdown=true), as a run does.
def test_no_host_device_syncs_in_a_steady_state_step(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", EPG_CACHE_DIR=str(tmp_path))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", COUNT, *STAGES], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        pytest.fail(out.stderr[-3000:])
    counts = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("COUNTS "))[7:])
    assert {s: c["steps"] for s, c in counts.items()} == {s: 2 for s in STAGES}  # two non-logging steps counted
    assert {s: c["events"] for s, c in counts.items()} == {s: [] for s in STAGES}, json.dumps(counts, indent=1)

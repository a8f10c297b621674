#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (one H200; a session has ~15 minutes of device
# time in all, machine start included). From the repository root on that machine:
#
#     bash benchmarks/device_suite.sh            # or: EPG_GIT_COMMIT=<sha> bash benchmarks/device_suite.sh
#
# The repo arrives as a copied working tree (usually without .git, hence EPG_GIT_COMMIT for
# the reports), not pip-installed, with no internet and no deepspeed: the call carries
# `wheelhouse/` (benchmarks/wheelhouse.sh: deepspeed and the dependencies that machine lacks,
# for its Python 3.12), installed offline. Steps, each under a `timeout`, each run even when
# an earlier one failed, the trainer first (issue 13 item 11):
#   1. environment: nvidia-smi, python / torch / triton / CUDA versions;
#   2. offline installs: `pip install --no-index --find-links wheelhouse deepspeed`, then
#      `pip install -e . --no-deps --no-index` (else a link epg_fast/kernels -> kernels/);
#   3. the real trainer, `deepspeed --num_gpus 1 epg_fast/train.py` on data.source=synthetic:
#      --stage denoise at EPG-XL/16 and --stage pretrain at ViT-B/16, 256 px, 60 steps each,
#      batch 128: EPG-XL's weights, EMA and AdamW state are about 10 GB, and 128 x 257 tokens
#      per matmul fill the GPU while the activations stay far below the H200's 141 GB (a
#      first run must not be lost to an out-of-memory error); logging every 10 steps, a
#      profiler trace of steps 40-42. benchmarks/trainer_report.py puts their metrics.jsonl
#      into trainer.json and the last window's img/s, TFLOP/s, MFU, memory into summary.md;
#   4. `benchmarks/throughput.py --variants fast` (pretrain, denoise);
#   5. `pytest -q tests/kernels` natively on CUDA, then `benchmarks/kernels.py`.
# Everything lands in $OUT (default ./device_out); the script stays under SUITE_BUDGET_S
# (default 420 s: with the machine's start-up, 8 minutes) and ends with $OUT/summary.md.
#
# Files in $OUT (the device tool brings back at most 8 files, no more than 2 folders down):
#   summary.md  trainer.json  trace_denoise.json.gz  trace_pretrain.json.gz  throughput.json
#   throughput.png  pytest.xml  kernels.json                              -> 8 files, 0 free.
# Logs and Markdown reports stay on the machine: summary.md holds the reports and the tails
# of failed steps' logs.
# SUITE_SMOKE=1: a dry run without CUDA (CI, CPU): the trainer runs shrunk to tiny models for
# a few steps in one process, the benchmarks with --smoke, every limit 5x (DeepSpeed builds its
# CPU communication op at each start) within a 30-minute budget.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-./device_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
BUDGET="${SUITE_BUDGET_S:-420}"
SLOW=1  # step limits are for the H200; a CPU dry run gets SLOW times as long (and a larger budget)
if [[ -n ${SUITE_SMOKE:-} ]]; then
    SLOW=5
    BUDGET="${SUITE_BUDGET_S:-1800}"
fi
T0=$(date +%s)
WORK="$(mktemp -d)"
STEPS="$WORK/steps.tsv"
ENV_TXT="$WORK/env.txt"
: >"$STEPS"
export PYTHONUNBUFFERED=1

remaining() { echo $((BUDGET - ($(date +%s) - T0))); }

# run_step NAME LIMIT_S LOG CMD...: CMD under a timeout capped by the time left; never fails.
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left
    left=$(remaining)
    if ((left < 30)); then
        printf '%s\tskipped (no time left)\t0\t%s\n' "$name" "$log" >>"$STEPS"
        return 0
    fi
    limit=$((limit * SLOW))
    ((limit > left - 15)) && limit=$((left - 15))
    local t=$(date +%s) rc status
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT (${limit} s)" ;;
    *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" $(($(date +%s) - t)) "$log" >>"$STEPS"
    echo "[device_suite] $name: $status ($(($(date +%s) - t)) s)"
    return 0
}

# ---- 1. environment ------------------------------------------------------------------------
{
    echo "### nvidia-smi"
    timeout 30 nvidia-smi 2>&1 || echo "(nvidia-smi failed or absent)"
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
        --format=csv 2>&1 || true
    echo
    echo "### python"
    timeout 60 "$PY" -c "
import sys, platform, torch
print('python', sys.version.split()[0], platform.machine())
print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
try:
    import triton; print('triton', triton.__version__)
except ImportError as e:
    print('triton: not importable:', e)
" 2>&1 || echo "(python / torch failed)"
} >"$ENV_TXT" 2>&1
echo "[device_suite] environment recorded"

# ---- 2. offline installs ----------------------------------------------------------------------
# PYTHONPATH=repo root for `python benchmarks/kernels.py` (whose sys.path[0] is benchmarks/).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if timeout 60 "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    DS="already importable"
elif [[ -d wheelhouse ]] && timeout 180 "$PY" -m pip install -q --no-index --find-links wheelhouse deepspeed \
    >"$WORK/wheelhouse.log" 2>&1; then
    DS="installed offline from wheelhouse/"
else
    DS="FAILED: deepspeed is not importable and wheelhouse/ did not install ($(tail -n 1 "$WORK/wheelhouse.log" 2>/dev/null || echo 'no wheelhouse/: carry it'))"
fi
echo "[device_suite] deepspeed: $DS"
KLINK=""
can_import() { timeout 120 "$PY" -c "import epg_fast, epg_fast.kernels.ema" >"$WORK/import.log" 2>&1; }
if can_import; then
    IMPORT="already importable"
elif timeout 120 "$PY" -m pip install -q -e . --no-deps --no-build-isolation --no-index >"$WORK/pip.log" 2>&1 && can_import; then
    IMPORT="offline pip install -e . --no-deps --no-build-isolation"
elif [[ ! -e epg_fast/kernels ]] && ln -s ../kernels epg_fast/kernels && KLINK=epg_fast/kernels && can_import; then
    # the same layout without pip: a link epg_fast/kernels -> kernels/ (removed at the end)
    IMPORT="link epg_fast/kernels -> kernels/ (pip install -e failed: $(tail -n 1 "$WORK/pip.log" 2>/dev/null))"
else
    IMPORT="FAILED: epg_fast.kernels does not import (pip install -e and a link both tried): $(tail -n 1 "$WORK/import.log")"
fi
echo "[device_suite] import: $IMPORT"

# ---- 3. the real trainer ----------------------------------------------------------------------
export EPG_CACHE_DIR="$WORK/cache"  # the measured matmul peak (the MFU denominator), measured once here
if [[ -n ${SUITE_SMOKE:-} ]]; then
    LAUNCH=("$PY")  # CPU: one process, as DeepSpeed's launcher would start it
    TRAIN_SIZE=(model.preset=custom model.depth=2 model.dim=32 model.heads=2 model.decoder_dim=32
        model.decoder_heads=2 model.image_size=32 model.patch_size=8 model.proj_hidden=64 model.proj_dim=16
        train.global_batch=4 train.total_steps=6 log.every=2 log.profile=3:2)
else
    LAUNCH=("$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")/deepspeed" --num_gpus 1)
    TRAIN_SIZE=(train.global_batch=128 train.total_steps=60 log.every=10 log.profile=40:3)
fi
# train_run NAME LIMIT_S STAGE CONFIG OVERRIDES...: one trainer run into $WORK/run_NAME.
train_run() {
    local name=$1 limit=$2 stage=$3 config=$4
    shift 4
    run_step "trainer_$name" "$limit" "$WORK/trainer_$name.log" "${LAUNCH[@]}" epg_fast/train.py --stage "$stage" \
        --config "$config" data.source=synthetic train.run_dir="$WORK/run_$name" train.resume=none \
        train.sample_every=0 log.progress=false log.tensorboard=false "$@" "${TRAIN_SIZE[@]}"
    local trace="$WORK/run_$name/profile/trace_rank0.json.gz"
    if [[ -s $trace ]] && (($(stat -c %s "$trace") < 15 * 1024 * 1024)); then cp "$trace" "$OUT/trace_$name.json.gz"; fi
}
if [[ $DS == FAILED* || $IMPORT == FAILED* ]]; then
    printf 'trainer\tskipped (deepspeed or epg_fast does not import)\t0\t-\n' >>"$STEPS"
else
    train_run denoise 150 denoise configs/denoise/in256_epg_xl16.yaml init.encoder=null
    train_run pretrain 110 pretrain configs/pretrain/in256_vitb16.yaml
fi
"$PY" benchmarks/trainer_report.py "$WORK" "$OUT/trainer.json" >"$WORK/trainer.md" 2>&1 || true

if [[ $IMPORT == FAILED* ]]; then
    printf 'throughput\tskipped (epg_fast does not import)\t0\t-\n' >>"$STEPS"
    printf 'pytest\tskipped (epg_fast does not import)\t0\t-\n' >>"$STEPS"
    printf 'kernels\tskipped (epg_fast does not import)\t0\t-\n' >>"$STEPS"
else
    # ---- 4. training throughput: the fast variant, the trainer's workloads ----------------------
    run_step throughput 100 "$WORK/throughput.log" "$PY" benchmarks/throughput.py --verbose \
        --workloads pretrain denoise --variants fast \
        --json "$OUT/throughput.json" --markdown "$WORK/throughput.md" --chart "$OUT/throughput.png" \
        --time-budget $((60 * SLOW)) ${SUITE_SMOKE:+--smoke}

    # ---- 5. kernel tests, natively on CUDA, then the kernel benchmarks -------------------------
    run_step pytest 90 "$WORK/pytest.log" "$PY" -m pytest -q -p no:cacheprovider tests/kernels \
        --junitxml="$OUT/pytest.xml" --durations=10
    KLIMIT=$((($(remaining) - 20) / SLOW))
    ((KLIMIT < 40)) && KLIMIT=40
    run_step kernels "$KLIMIT" "$WORK/kernels.log" "$PY" benchmarks/kernels.py \
        --json "$OUT/kernels.json" --markdown "$WORK/kernels.md" --time-budget $(((KLIMIT - 30) * SLOW)) ${SUITE_SMOKE:+--smoke}
fi

# ---- summary -------------------------------------------------------------------------------
{
    echo "# Device suite — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- commit: ${EPG_GIT_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo 'unknown (no .git; pass EPG_GIT_COMMIT)')}"
    echo "- deepspeed: $DS"
    echo "- import: $IMPORT"
    echo "- total: $(($(date +%s) - T0)) s of a ${BUDGET} s budget"
    echo
    echo "| step | status | seconds | log |"
    echo "|---|---|---:|---|"
    while IFS=$'\t' read -r name status secs log; do
        echo "| $name | $status | $secs | $(basename "$log") |"
    done <"$STEPS"
    echo
    echo "## The trainer (deepspeed epg_fast/train.py, data.source=synthetic)"
    echo
    cat "$WORK/trainer.md"
    echo
    echo "## Tests (tests/kernels)"
    echo
    if [[ -s "$OUT/pytest.xml" ]]; then
        "$PY" - "$OUT/pytest.xml" <<'EOF' 2>&1 || echo "(could not read pytest.xml)"
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
secs = sum(float(s.get("time", 0)) for s in suites)
print(f"{n['tests']} tests: {n['tests'] - n['failures'] - n['errors'] - n['skipped']} passed, "
      f"{n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped, {secs:.1f} s")
bad = [c for s in suites for c in s.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
for c in bad[:30]:
    msg = (c.find("failure") if c.find("failure") is not None else c.find("error")).get("message", "")
    print(f"- FAILED {c.get('classname')}::{c.get('name')}: {msg.splitlines()[0][:200] if msg else ''}")
EOF
    else
        echo "(no pytest.xml)"
        [[ -s "$WORK/pytest.log" ]] && tail -n 30 "$WORK/pytest.log"
    fi
    echo
    echo "## Kernel benchmarks"
    echo
    if [[ -s "$WORK/kernels.md" ]]; then
        sed 's/^# /### /; s/^## /### /' "$WORK/kernels.md"
    else
        echo "(no kernels.md)"
    fi
    echo
    echo "## Training throughput"
    echo
    if [[ -s "$WORK/throughput.md" ]]; then
        sed 's/^# /### /; s/^## /### /' "$WORK/throughput.md"
    else
        echo "(no throughput report)"
    fi
    # Runs that fail inside the benchmark (a compile error, ...) leave exit 0 and a traceback.
    if [[ -s "$WORK/throughput.log" ]] && { grep -q Traceback "$WORK/throughput.log" ||
        ! grep -E 'throughput.log$' "$STEPS" | grep -q $'\tok\t'; }; then
        echo
        echo "## Tail of throughput.log"
        echo '```'
        tail -n 60 "$WORK/throughput.log"
        echo '```'
    fi
    for log in "$WORK/trainer_denoise.log" "$WORK/trainer_pretrain.log" "$WORK/pytest.log" "$WORK/kernels.log"; do
        if [[ -s "$log" ]] && grep -q -E "$(basename "$log")\$" "$STEPS" && ! grep -E "$(basename "$log")\$" "$STEPS" | grep -q $'\tok\t'; then
            echo
            echo "## Tail of $(basename "$log")"
            echo '```'
            tail -n 40 "$log"
            echo '```'
        fi
    done
    echo
    echo "## Environment"
    echo '```'
    cat "$ENV_TXT"
    echo '```'
} >"$OUT/summary.md" 2>&1
rm -rf "$WORK"
[[ -n $KLINK ]] && rm -f "$KLINK"
echo "[device_suite] done in $(($(date +%s) - T0)) s; summary in $OUT/summary.md"

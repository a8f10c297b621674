#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (one H200; a session has ~15 minutes of device
# time in all, machine start included). From the repository root on that machine:
#
#     bash benchmarks/device_suite.sh            # or: EPG_GIT_COMMIT=<sha> bash benchmarks/device_suite.sh
#
# The repo arrives as a copied working tree (usually without .git, hence EPG_GIT_COMMIT for
# the reports), not pip-installed, with no internet and no deepspeed. Steps, each under a
# `timeout` and each run even when an earlier one failed:
#   1. environment: nvidia-smi, python / torch / triton / CUDA versions;
#   2. make `epg_fast` and `epg_fast.kernels` importable (`kernels/` is installed as
#      `epg_fast.kernels` by setup.py's package_dir): offline `pip install -e . --no-deps`,
#      else a temporary link epg_fast/kernels -> kernels/, else a clear error (python steps
#      are then skipped);
#   3. `pytest -q tests/kernels` natively on CUDA (junit xml + log);
#   4. `benchmarks/kernels.py` (JSON + Markdown + log);
#   5. `benchmarks/throughput.py`: whole training steps (pretrain / denoise / DiT, variants
#      reference / fast / compile), with the time that is left (JSON + chart; its Markdown
#      report goes into summary.md).
# Everything lands in $OUT (default ./device_out); the whole script stays under 8 minutes
# (SUITE_BUDGET_S, default 470 s) and ends with $OUT/summary.md.
#
# Files in $OUT (the device tool brings back at most 8 files, no more than 2 folders down):
# SUITE_SMOKE=1 passes --smoke to the benchmarks (to try the script on a machine without CUDA).
#   summary.md  (environment, steps, test counts, failing tests, the kernel and throughput
#                reports, log tails)
#   pytest.xml  pytest.log  kernels.json  kernels.md  kernels.log  throughput.json
#   throughput.png                                                          -> 8 files, 0 free.
# throughput.md and throughput.log stay on the machine: the report is copied into
# summary.md whole, the log's tail when the step failed or printed a traceback.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-./device_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
BUDGET="${SUITE_BUDGET_S:-470}"
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

# ---- 2. make epg_fast (and epg_fast.kernels) importable --------------------------------------
# PYTHONPATH=repo root for `python benchmarks/kernels.py` (whose sys.path[0] is benchmarks/).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
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

if [[ $IMPORT == FAILED* ]]; then
    printf 'pytest\tskipped (epg_fast does not import)\t0\t-\n' >>"$STEPS"
    printf 'kernels\tskipped (epg_fast does not import)\t0\t-\n' >>"$STEPS"
    printf 'throughput\tskipped (epg_fast does not import)\t0\t-\n' >>"$STEPS"
else
    # ---- 3. kernel tests, natively on CUDA ----------------------------------------------------
    run_step pytest 150 "$OUT/pytest.log" "$PY" -m pytest -q -p no:cacheprovider tests/kernels \
        --junitxml="$OUT/pytest.xml" --durations=10

    # ---- 4. kernel benchmarks -----------------------------------------------------------------
    # The benchmark writes its files after every op; it starts no new op after --time-budget.
    # Capped at 200 s (was 300) to leave the throughput step its few minutes.
    KLIMIT=$(($(remaining) - 20))
    ((KLIMIT > 200)) && KLIMIT=200
    run_step kernels "$KLIMIT" "$OUT/kernels.log" "$PY" benchmarks/kernels.py \
        --json "$OUT/kernels.json" --markdown "$OUT/kernels.md" --time-budget $((KLIMIT - 80)) ${SUITE_SMOKE:+--smoke}

    # ---- 5. training throughput ----------------------------------------------------------------
    # All the time left but a margin for the summary. The benchmark writes its files after
    # every run and starts no new run after --time-budget, which leaves 100 s for the run in
    # flight (a torch.compile run of a large model is the longest) to finish.
    TLIMIT=$(($(remaining) - 25))
    TBUDGET=$((TLIMIT - 100))
    ((TBUDGET < 20)) && TBUDGET=20
    run_step throughput "$TLIMIT" "$WORK/throughput.log" "$PY" benchmarks/throughput.py --verbose \
        --json "$OUT/throughput.json" --markdown "$WORK/throughput.md" --chart "$OUT/throughput.png" \
        --time-budget "$TBUDGET" ${SUITE_SMOKE:+--smoke}
fi

# ---- summary -------------------------------------------------------------------------------
{
    echo "# Device suite — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- commit: ${EPG_GIT_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo 'unknown (no .git; pass EPG_GIT_COMMIT)')}"
    echo "- import: $IMPORT"
    echo "- total: $(($(date +%s) - T0)) s of a ${BUDGET} s budget"
    echo
    echo "| step | status | seconds | log |"
    echo "|---|---|---:|---|"
    while IFS=$'\t' read -r name status secs log; do
        echo "| $name | $status | $secs | $(basename "$log") |"
    done <"$STEPS"
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
        [[ -s "$OUT/pytest.log" ]] && tail -n 30 "$OUT/pytest.log"
    fi
    echo
    echo "## Kernel benchmarks"
    echo
    if [[ -s "$OUT/kernels.md" ]]; then
        sed 's/^# /### /; s/^## /### /' "$OUT/kernels.md"
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
    for log in "$OUT/pytest.log" "$OUT/kernels.log"; do
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

#!/usr/bin/env bash
# Creates .venv with the CPU build of PyTorch and epg-fast (editable) with its test extras.
# Idempotent: a second run only checks. On a GPU machine install your CUDA torch into the
# environment first, then `pip install -e ".[test]"` (see the README).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned to the CPU wheel: an unpinned torch resolves to a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
if ! out=$("${PIP[@]}" -e ".[test]" 2>&1); then echo "$out"; exit 1; fi
# (this machine's pip configuration names index folders that may be absent: quiet that)
[ -z "$out" ] || grep -v "is ignored: it is neither a file nor a directory" <<<"$out" || true
.venv/bin/python -c "import epg_fast, torch; from importlib.metadata import version as v; print('epg-fast ready: torch', torch.__version__, '| deepspeed', v('deepspeed'))"

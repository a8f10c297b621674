#!/usr/bin/env bash
# Builds, on a machine with internet, a folder of wheels that lets the lent GPU machine (Python
# 3.12, Linux x86-64, no internet, torch/triton/numpy preinstalled but no deepspeed) run the
# real trainer:
#
#     bash benchmarks/wheelhouse.sh [OUT_DIR]      # default OUT_DIR: ./wheelhouse (git-ignored)
#     CHECK_PYTHON=/path/to/python3.12 bash benchmarks/wheelhouse.sh   # then the install check
#
# What goes in, and why only that:
#   - deepspeed, the version this repo's .venv holds, built from its sdist with DS_BUILD_OPS=0:
#     pure Python (py3-none-any); its CUDA ops are JIT-built on first use (nvcc and ninja are
#     on that machine);
#   - the deepspeed requirements that machine's image lacks (the device docs list what it
#     holds): hjson, pydantic, pydantic-core, annotated-types, typing-inspection; plus
#     typing-extensions, which the image has at an unread version while pydantic needs a recent
#     one (pip keeps the installed one when it is new enough). msgpack, ninja, py-cpuinfo,
#     einops, numpy, packaging, psutil and tqdm are already there. Binary wheels are fetched
#     for CPython 3.12 manylinux x86-64, pinned to the versions of this repo's .venv;
#   - not epg-fast itself: the device suite installs it from the carried working tree
#     (`pip install -e . --no-deps --no-index`), so what runs is the code of that tree, never a
#     wheel built from an older one.
#
# On the GPU machine (the device tool: `carry: ["wheelhouse"]`, 64 MiB limit; this is ~5 MB):
#
#     python3 -m pip install -q --no-index --find-links wheelhouse deepspeed
#
# pip resolves deepspeed's requirements against the packages already installed there and
# takes only the missing ones from the folder; no index is contacted.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-wheelhouse}"
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || { echo "wheelhouse: no python at $PY (run ./setup.sh or set PYTHON)" >&2; exit 1; }

# version PACKAGE: the version this repo's environment holds (the one tested here).
version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
# (this machine's pip configuration names index folders that may be absent: quiet that)
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

DEEPSPEED_VERSION="$(version deepspeed)"
BINARY_DEPS=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions)

rm -rf "$OUT"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PIP=("$PY" -m pip --disable-pip-version-check)

echo "[wheelhouse] deepspeed $DEEPSPEED_VERSION from its sdist (DS_BUILD_OPS=0)"
quiet "${PIP[@]}" download -q --no-deps --no-binary=:all: -d "$WORK" "deepspeed==$DEEPSPEED_VERSION"
# --no-build-isolation: deepspeed's setup.py imports torch, which this environment has.
DS_BUILD_OPS=0 quiet "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$OUT" \
    "$WORK/deepspeed-$DEEPSPEED_VERSION.tar.gz"
ls "$OUT/deepspeed-$DEEPSPEED_VERSION-py3-none-any.whl" >/dev/null ||
    { echo "wheelhouse: the deepspeed wheel is not pure Python (py3-none-any)" >&2; exit 1; }

PINNED=()
for pkg in "${BINARY_DEPS[@]}"; do PINNED+=("$pkg==$(version "$pkg")"); done
echo "[wheelhouse] ${PINNED[*]} for CPython 3.12 manylinux x86-64"
quiet "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$OUT" "${PINNED[@]}"

echo "[wheelhouse] $(ls "$OUT" | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT:"
ls -1 "$OUT"

[[ -n "${CHECK_PYTHON:-}" ]] || exit 0
# The install check: a clean venv of CHECK_PYTHON (3.12) holding what the GPU machine already
# has (from the index) and, for torch, a metadata-only stand-in at that machine's version (no
# 3.12 CPU torch wheel is reachable here); then the offline install, pip check, the imports.
echo "[wheelhouse] install check with $("$CHECK_PYTHON" -V)"
VENV="$WORK/venv"
STAND_IN="$WORK/torch-2.11.0-py3-none-any.whl"
"$CHECK_PYTHON" -m venv "$VENV"
"$CHECK_PYTHON" - "$STAND_IN" <<'PYEOF'
import base64, hashlib, sys, zipfile

files = {
    "torch/__init__.py": "raise ImportError('stand-in torch: metadata only')\n",
    "torch-2.11.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0\n",
    "torch-2.11.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: wheelhouse.sh\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
def digest(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
record = [f"{name},sha256={digest(text)},{len(text)}" for name, text in files.items()]
record.append("torch-2.11.0.dist-info/RECORD,,")
with zipfile.ZipFile(sys.argv[1], "w") as wheel:
    for name, text in files.items():
        wheel.writestr(name, text)
    wheel.writestr("torch-2.11.0.dist-info/RECORD", "\n".join(record) + "\n")
PYEOF
quiet "$VENV/bin/pip" install -q --disable-pip-version-check "$STAND_IN" \
    numpy einops packaging psutil tqdm msgpack ninja py-cpuinfo
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS="" "$VENV/bin/pip" install -q --disable-pip-version-check \
    --no-index --find-links "$OUT" deepspeed
"$VENV/bin/pip" check
"$VENV/bin/python" -c "import hjson, pydantic; print('[wheelhouse] pydantic', pydantic.VERSION, 'imports')"
# deepspeed's own import goes as far as `import torch`, which the stand-in refuses.
IMPORT_LOG="$("$VENV/bin/python" -c "import deepspeed" 2>&1 || true)"
if grep -q "stand-in torch" <<<"$IMPORT_LOG"; then
    echo "[wheelhouse] install check passed: deepspeed $DEEPSPEED_VERSION installed offline into a clean venv"
else
    echo "[wheelhouse] install check FAILED: import deepspeed broke before reaching torch:" >&2
    tail -n 3 <<<"$IMPORT_LOG" >&2
    exit 1
fi

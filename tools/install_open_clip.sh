#!/usr/bin/env bash
# Creates the separate PyTorch (CPU) + open_clip environment that tools/benchmark.py times
# big_vlp against; open_clip is not a big_vlp dependency, so it gets its own venv.
#
#   tools/install_open_clip.sh [DIR]     # DIR defaults to .venv-open_clip in the repo root
#
# Installs torch / torchvision / open_clip_torch from plain PyPI (CPU-only wheels there),
# checks them with tools/open_clip_worker.py --check, and prints the --open_clip_python
# argument to pass to the benchmark. Re-running on an existing DIR reuses the venv.
# Set PYTHON to choose the interpreter (default: the first python3.1x >= 3.10 on PATH).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.venv-open_clip}"
PACKAGES=(torch==2.13.0 torchvision==0.28.0 open_clip_torch==3.3.0)

py_ok() {  # Is $1 a python >= 3.10 that can make venvs?
  "$1" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null
}

if [[ -n "${PYTHON:-}" ]]; then
  py_ok "$PYTHON" || { echo "PYTHON=$PYTHON is not a python >= 3.10 with venv" >&2; exit 1; }
else
  PYTHON=""
  for cand in python3 python3.13 python3.12 python3.11 python3.10; do
    if command -v "$cand" >/dev/null && py_ok "$cand"; then PYTHON="$cand"; break; fi
  done
  [[ -n "$PYTHON" ]] || { echo "no python >= 3.10 with the venv module on PATH" >&2; exit 1; }
fi

if [[ ! -x "$DIR/bin/python" ]]; then
  echo "creating venv $DIR with $("$PYTHON" -c 'import sys; print(sys.executable)')"
  "$PYTHON" -m venv "$DIR"
fi
"$DIR/bin/python" -m pip install "${PACKAGES[@]}"

# Imports torch and open_clip (incl. the torchvision work-around) and prints their versions.
"$DIR/bin/python" "$ROOT/tools/open_clip_worker.py" --check

PY_ABS="$(cd "$DIR" && pwd)/bin/python"
echo
echo "open_clip environment ready; pass to the benchmark:"
echo "  --open_clip_python $PY_ABS"

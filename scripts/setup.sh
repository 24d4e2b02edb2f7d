#!/usr/bin/env bash
# Creates a virtual environment in the repository root (.venv/, or VENV=DIR) with the CPU build of
# PyTorch and yoco installed editable with its test extras. Safe to run again: it only installs what
# is missing or changed.
#
#   bash scripts/setup.sh                          # the newest releases pyproject.toml admits
#   VENV=.venv-oldest bash scripts/setup.sh --oldest-transformers
#                                                  # the oldest supported transformers (CI tests both ends)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH=2.13.0
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
say() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

extra=()
if [ "${1:-}" = "--oldest-transformers" ]; then
  # The lower bound of the transformers range in pyproject.toml: one place states the supported range.
  oldest=$("$PYTHON" -c 'import re; print(re.search(r"\"transformers>=([0-9.]+)", open("pyproject.toml").read()).group(1))')
  extra=("transformers==$oldest")
elif [ -n "${1:-}" ]; then
  echo "setup.sh: unknown option ${1} (the only option is --oldest-transformers)" >&2
  exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment $VENV/ with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
# Install torch first, pinned: an unpinned torch (or a range admitting newer releases) would pull a
# multi-GB CUDA build; torch==2.13.0 is the CPU build on the project's machines.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  say "installing PyTorch $TORCH, CPU build (the longest step: a few minutes on a fresh machine)"
  "${PIP[@]}" "torch==$TORCH"
fi
say "installing yoco (editable) with its test extras${extra:+ and ${extra[*]}}"
"${PIP[@]}" -e ".[test]" "${extra[@]}"
say "ready: $("$VENV/bin/python" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")') in $VENV/"

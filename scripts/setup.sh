#!/usr/bin/env bash
# Creates .venv/ in the repository root with the CPU build of PyTorch and yoco installed editable
# with its test extras. Safe to run again: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Install torch first, pinned: an unpinned torch (or a range admitting newer releases) would pull a
# multi-GB CUDA build; torch==2.13.0 is the CPU build on the project's machines.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"

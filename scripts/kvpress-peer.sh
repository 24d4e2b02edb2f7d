#!/usr/bin/env bash
# NVIDIA kvpress, the compression peer, beside yoco: the same transformers Llama folder, RULER-style prompts
# and compression ratios on both (scripts/kvpress_compare.py). kvpress 0.5.5 pins transformers < 5.3 and
# yoco needs a newer one, so kvpress gets its own virtual environment (.venv-kvpress/, or KVPRESS_VENV=DIR)
# with the CPU build of PyTorch and the versions in scripts/kvpress-constraints.txt; yoco's is set up by
# scripts/setup.sh. Safe to run again: it installs only what is missing.
#
#   yoco convert --checkpoint runs/long/transformer --to-llama --out runs/llama      # a Llama trained here
#   bash scripts/kvpress-peer.sh --model runs/llama --context 1024 --out runs/kvpress
#
# Any option of scripts/kvpress_compare.py is passed on (--presses, --ratios, --tasks, --samples, --text).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${KVPRESS_VENV:-.venv-kvpress}
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
say() { printf '[kvpress-peer %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

[ -x .venv/bin/python ] || bash scripts/setup.sh
if [ ! -x "$VENV/bin/python" ]; then
  say "creating kvpress's virtual environment $VENV/"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import kvpress" >/dev/null 2>&1; then
  # torch first and pinned (the CPU build on the project's machines; an open range pulls a CUDA build)
  say "installing PyTorch 2.13.0 (CPU) and kvpress 0.5.5 with transformers 5.2.0 into $VENV/"
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" -c scripts/kvpress-constraints.txt kvpress==0.5.5
fi
exec .venv/bin/python scripts/kvpress_compare.py --peer-python "$VENV/bin/python" "$@"

#!/usr/bin/env bash
# One performance check of inca's GPU paths, one table; see tools/gpu_check.py for the rows.
#   bash tools/gpu_check.sh                        # one H200: under 8 minutes
#   bash tools/gpu_check.sh --quick --device cpu   # small models, a couple of minutes
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1  # random weights: nothing to download; one table, no progress bars
exec "$PYTHON" tools/gpu_check.py "$@"

#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with the test extra.
# Usage: bash tools/setup.sh            (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# torch first and pinned, so pip takes the wheels this machine already has rather than resolving anew.
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[test]"

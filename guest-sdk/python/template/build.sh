#!/usr/bin/env bash
# Builds entity.wasm from entity.py: ./build.sh  (creates .venv on first run)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/conflux-build ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt
fi
.venv/bin/python -m pytest -q
.venv/bin/conflux-build entity.py -o entity.wasm

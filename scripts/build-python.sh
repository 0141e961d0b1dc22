#!/usr/bin/env bash
# Builds the Python SDK's components from a clean clone (idempotent):
#   1. finds python3 (>= 3.10) with its venv module (scripts/setup.sh installs it),
#   2. creates/reuses the venv target/py-venv with pinned componentize-py and pytest and the
#      SDK (editable; pip is skipped while the stamp says it is up to date),
#   3. runs pytest for the SDK and each Python example,
#   4. builds target/polyglot/{counter-py,user-py,team-py,escape-py,timer-py}.wasm.
# Usage: scripts/build-python.sh [--no-tests]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/target/py-venv"
OUT="$ROOT/target/polyglot"
SDK="$ROOT/guest-sdk/python"
COMPONENTIZE_PY_VERSION="0.25.1"
PYTEST_VERSION="9.2.0"
RUN_TESTS=1
[ "${1:-}" = "--no-tests" ] && RUN_TESTS=0

export PYTHONDONTWRITEBYTECODE=1 # keep __pycache__ out of the work tree

step_start=0
step() { step_start=$(date +%s%N); echo "==> $*"; }
done_step() {
  local ms=$((($(date +%s%N) - step_start) / 1000000))
  printf '    (%d.%01ds)\n' $((ms / 1000)) $((ms % 1000 / 100))
}

python_ok() {
  command -v "$1" >/dev/null 2>&1 &&
    "$1" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1
}

# --- 1. python3 + venv -------------------------------------------------------------------
step "python3 (>= 3.10) with venv"
PY=""
for candidate in python3 python3.13 python3.12 python3.11 python3.10 /usr/bin/python3; do
  if python_ok "$candidate"; then PY="$candidate"; break; fi
done
if [ -z "$PY" ]; then
  echo "error: Python >= 3.10 with venv is needed: run scripts/setup.sh (it installs Debian's python3-venv)" >&2
  exit 1
fi
echo "    using $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
done_step

# --- 2. venv + pinned packages ---------------------------------------------------------------
step "venv $VENV"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  echo "    created"
fi
STAMP="$VENV/.conflux-stamp"
WANT="componentize-py==$COMPONENTIZE_PY_VERSION pytest==$PYTEST_VERSION sdk=$(sha256sum "$SDK/pyproject.toml" | cut -c1-16) py=$("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/conflux-build" ]; then
  echo "    packages up to date (stamp), skipping pip"
else
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "componentize-py==$COMPONENTIZE_PY_VERSION" "pytest==$PYTEST_VERSION" -e "$SDK"
  echo "$WANT" >"$STAMP"
  echo "    installed componentize-py==$COMPONENTIZE_PY_VERSION pytest==$PYTEST_VERSION conflux-sdk (editable)"
fi
done_step

# --- 3. tests --------------------------------------------------------------------------------
if [ "$RUN_TESTS" = 1 ]; then
  for dir in guest-sdk/python examples/counter-py examples/team-joiner-py tests/guests/timer-py; do
    step "pytest $dir"
    (cd "$ROOT/$dir" && "$VENV/bin/python" -m pytest -q -p no:cacheprovider)
    done_step
  done
fi

# --- 4. components ---------------------------------------------------------------------------
mkdir -p "$OUT"
build() { # name module-file
  step "build $OUT/$1.wasm"
  "$VENV/bin/conflux-build" "$ROOT/$2" -o "$OUT/$1.wasm" -q >/dev/null
  printf '    %s bytes\n' "$(stat -c %s "$OUT/$1.wasm")"
  done_step
}
build counter-py examples/counter-py/counter.py
build user-py examples/team-joiner-py/user.py
build team-py examples/team-joiner-py/team.py
build escape-py tests/guests/escape-py/escape.py
build timer-py tests/guests/timer-py/timer.py
echo "==> done: $(ls "$OUT"/*-py.wasm | xargs -n1 basename | tr '\n' ' ')"

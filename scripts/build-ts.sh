#!/usr/bin/env bash
# Builds the TypeScript SDK, its examples and test guests (issue 24), from a clean clone:
#   1. checks for Node.js >= 20 (scripts/setup.sh installs it);
#   2. `npm ci` at the repo root (skipped when node_modules matches package-lock.json);
#   3. `npm test` in the SDK and every example/guest workspace;
#   4. builds the components into target/polyglot/: counter-ts, user-ts, team-ts,
#      escape-ts, timer-ts and http-ts (the latter imports wasi:http ON PURPOSE: the host must
#      refuse it). A component whose inputs did not change is not rebuilt.
# Idempotent; run it as often as you like. Set CONFLUX_TS_FORCE=1 to rebuild everything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$ROOT/target/polyglot"
STAMPS="$ROOT/target/polyglot/.stamps"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
step_start=0
step() { step_start=$(now_ms); echo "==> $*"; }
done_step() { local d=$(( $(now_ms) - step_start )); printf '    (%d.%d s)\n' $((d / 1000)) $((d % 1000 / 100)); }

# --- 1. Node.js -------------------------------------------------------------------
step "checking Node.js (need >= 20)"
node_ok() {
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 &&
    [ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ]
}
if node_ok; then
  echo "    node $(node --version), npm $(npm --version)"
else
  echo "error: Node.js >= 20 with npm is needed: run scripts/setup.sh (it installs Debian's nodejs)" >&2
  exit 1
fi
done_step

# --- 2. npm ci ----------------------------------------------------------------------
step "installing npm dependencies (npm ci at the repo root)"
lock_sum="$( (cat package-lock.json; node --version) | sha256sum | cut -d' ' -f1)"
stamp="node_modules/.conflux-ci-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$lock_sum" ] && [ -x node_modules/.bin/conflux-build ]; then
  echo "    node_modules is up to date with package-lock.json: skipped"
else
  npm ci --no-audit --no-fund
  echo "$lock_sum" > "$stamp"
fi
done_step

# --- 3. tests -----------------------------------------------------------------------
step "testing (tsc --noEmit + node --test in every workspace)"
log="$ROOT/target/polyglot/ts-test.log"
mkdir -p "$(dirname "$log")"
rc=0
npm test --workspaces --if-present >"$log" 2>&1 || rc=$?
grep -E '^> [^ ]+ test$|^# (tests|pass|fail) ' "$log" | sed 's/^/    /' || true
if [ "$rc" -ne 0 ]; then
  grep -E '^not ok|Error' "$log" | head -20 >&2 || true
  echo "error: tests failed (exit $rc); full output in $log" >&2
  exit 1
fi
done_step

# --- 4. components ------------------------------------------------------------------
mkdir -p "$OUT" "$STAMPS"
# Everything a component depends on: the SDK (sources, build tool, WIT), the lockfile
# and the workspace's own sources.
sdk_inputs() {
  find guest-sdk/typescript/src guest-sdk/typescript/bin -type f | sort
  echo wit/entity.wit package-lock.json
}
build() { # name workspace entry [extra conflux-build flags...]
  local name="$1" ws="$2" entry="$3"; shift 3
  local sum
  sum="$( { sdk_inputs; find "$ws/src" -type f | sort; } | xargs cat | { cat; echo "$*"; node --version; } | sha256sum | cut -d' ' -f1)"
  step "component $name ($ws/$entry $*)"
  if [ -z "${CONFLUX_TS_FORCE:-}" ] && [ -f "$OUT/$name.wasm" ] && [ "$(cat "$STAMPS/$name" 2>/dev/null)" = "$sum" ]; then
    echo "    sources unchanged: kept target/polyglot/$name.wasm"
  else
    (cd "$ws" && "$ROOT/node_modules/.bin/conflux-build" "$entry" -o "$OUT/$name.wasm" "$@")
    echo "$sum" > "$STAMPS/$name"
  fi
  done_step
}
build counter-ts examples/counter-ts src/counter.ts
build user-ts examples/team-joiner-ts src/user.ts
build team-ts examples/team-joiner-ts src/team.ts
build escape-ts tests/guests/escape-ts src/escape.ts
build http-ts tests/guests/escape-ts src/escape.ts --allow-http
build timer-ts tests/guests/timer-ts src/timer.ts

echo "==> components:"
ls -l "$OUT"/*-ts.wasm | awk '{printf "    %-60s %6.1f MiB\n", $9, $5/1048576}'

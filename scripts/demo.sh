#!/usr/bin/env bash
# From a fresh clone to a running node: install, build, start a node on the
# embedded store, deploy the counter example and invoke it.
#   scripts/demo.sh              # runs the demo, then stops the node
#   KEEP_RUNNING=1 scripts/demo.sh   # leaves the node running on 127.0.0.1:7070
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "==> building conflux and the example entities (first build takes a few minutes)"
cargo build --release -p conflux-host --bin conflux
(cd examples/counter && cargo build --release --target wasm32-wasip2)
(cd examples/team-joiner && cargo build --release --target wasm32-wasip2)
(cd examples/team-joiner/team && cargo build --release --target wasm32-wasip2)
BIN=target/release/conflux
WASM=target/wasm32-wasip2/release
DATA=${CONFLUX_DATA_DIR:-./conflux-data}
ADDR=${CONFLUX_LISTEN:-127.0.0.1:7070}
export CONFLUX_ADDR="http://$ADDR"

echo "==> starting a node: $BIN serve --data-dir $DATA --listen $ADDR"
"$BIN" serve --data-dir "$DATA" --listen "$ADDR" > /tmp/conflux-demo.out 2> /tmp/conflux-demo.log &
PID=$!
stop() { kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true; }
if [ -z "${KEEP_RUNNING:-}" ]; then trap stop EXIT; fi
for _ in $(seq 1 100); do
    grep -q "conflux listening" /tmp/conflux-demo.out 2>/dev/null && break
    kill -0 "$PID" 2>/dev/null || { cat /tmp/conflux-demo.log; exit 1; }
    sleep 0.1
done

set -x
"$BIN" deploy counter "$WASM/counter.wasm"
"$BIN" deploy user "$WASM/team_joiner.wasm"
"$BIN" deploy team "$WASM/team.wasm"
"$BIN" invoke counter/demo add 5
"$BIN" invoke counter/demo add 37
"$BIN" invoke counter/demo get
"$BIN" invoke user/sue join '"red"'
"$BIN" invoke user/sue join '"blue"' || true
sleep 0.5   # the join's message to team/red is delivered after the turn commits
"$BIN" invoke team/red members
"$BIN" state counter/demo
"$BIN" entities counter
"$BIN" types
"$BIN" status
if command -v curl >/dev/null; then
    curl -sS -X POST "http://$ADDR/v1/entities/counter/demo/add" -H "Content-Type: application/json" -d 1; echo
fi
set +x
if [ -n "${KEEP_RUNNING:-}" ]; then
    echo "==> node running (pid $PID) on $ADDR; dashboard at http://$ADDR/; logs in /tmp/conflux-demo.log; stop with: kill $PID"
fi

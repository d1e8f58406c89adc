#!/usr/bin/env bash
# Starts `kraken-token-broker simulate` on a free loopback port, runs the given
# command with the simulator's base URL appended, and stops the simulator.
#   ci/with-simulator.sh CMD [ARGS...]   ->   CMD ARGS... http://127.0.0.1:PORT
set -euo pipefail
BIN=${KTB_BIN:-target/debug/kraken-token-broker}
LOG=$(mktemp)
"$BIN" simulate --listen 127.0.0.1:0 --token-ttl 120 >"$LOG" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 100); do
  ADDR=$(sed -n 's/^Kraken simulator listening on \(.*\)$/\1/p' "$LOG")
  [ -n "$ADDR" ] && break
  kill -0 "$PID" 2>/dev/null || { cat "$LOG"; echo "simulator exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "${ADDR:-}" ] || { cat "$LOG"; echo "simulator did not start within 10 s" >&2; exit 1; }
"$@" "http://$ADDR"

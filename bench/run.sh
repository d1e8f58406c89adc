#!/usr/bin/env bash
# Load benchmark: wrk against the broker's GET /v1/token and, in the same run,
# against nginx serving a static body of the same size on loopback; writes
# bench/results.json, bench/results-tls.json (TLS, handshakes, pinned cores),
# bench/results-watch.json (watch streams) and proto-docs/performance.png. Takes about 5 minutes.
#   bash bench/run.sh            (BENCH_DURATION=10s BENCH_SWEEP_DURATION=5s by default)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  OWN_POLICY=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then   # no init system: do not start nginx's service
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    OWN_POLICY=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends wrk nginx-light >/dev/null
  [ -z "$OWN_POLICY" ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi

VENV=.venv-bench
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check matplotlib==3.11.2

cargo build --release --locked
"$VENV/bin/python" bench/bench.py target/release/kraken-token-broker bench/results.json
"$VENV/bin/python" bench/tls.py target/release/kraken-token-broker bench/results-tls.json
"$VENV/bin/python" bench/watch.py target/release/kraken-token-broker bench/results-watch.json
"$VENV/bin/python" bench/plot.py bench/results.json proto-docs/performance.png

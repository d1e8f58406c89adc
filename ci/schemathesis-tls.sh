#!/usr/bin/env bash
# Runs schemathesis with proto-docs/openapi.yaml against `serve` over mutual
# TLS: certificates made here with the openssl CLI (a CA, a server
# certificate for 127.0.0.1, an engine's client certificate whose URI SAN is
# its identity), the simulator as Kraken. No bearer is sent: the client
# certificate alone identifies the consumer.
#   ci/schemathesis-tls.sh SCHEMATHESIS_BINARY
set -euo pipefail
ST=$1
BIN=$(realpath "${KTB_BIN:-target/debug/kraken-token-broker}")
ROOT=$(pwd)
DIR=$(mktemp -d)
SIM_LOG="$DIR/sim.log"
BROKER_LOG="$DIR/broker.log"
"$BIN" simulate --listen 127.0.0.1:0 >"$SIM_LOG" 2>&1 &
SIM=$!
BROKER=""
trap 'kill $SIM $BROKER 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 1 100); do
  grep -q "API secret:" "$SIM_LOG" && break
  sleep 0.1
done
SIM_ADDR=$(sed -n 's/^Kraken simulator listening on \(.*\)$/\1/p' "$SIM_LOG")
sed -n 's/^  API key: *//p' "$SIM_LOG" >"$DIR/api-key"
sed -n 's/^  API secret: *//p' "$SIM_LOG" >"$DIR/api-secret"
[ -s "$DIR/api-secret" ] || { cat "$SIM_LOG"; echo "the simulator did not start" >&2; exit 1; }

cd "$DIR"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=ktb-ci-ca" -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=broker" \
  -keyout tls.key -out tls.csr 2>/dev/null
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -days 2 -out tls.crt \
  -extfile <(printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=engine" \
  -keyout engine.key -out engine.csr 2>/dev/null
openssl x509 -req -in engine.csr -CA ca.crt -CAkey ca.key -days 2 -out engine.crt \
  -extfile <(printf 'subjectAltName=URI:spiffe://ci.local/ns/trading/sa/engine\nextendedKeyUsage=clientAuth\n') 2>/dev/null
cat >broker.toml <<TOML
[listen]
api = "127.0.0.1:0"
admin = "127.0.0.1:0"

[listen.tls]
cert = { file = "$DIR/tls.crt" }
key = { file = "$DIR/tls.key" }
client_ca = { file = "$DIR/ca.crt" }

[kraken]
rest_url = "http://$SIM_ADDR"
ws_url = "ws://$SIM_ADDR/v2"

[[account]]
name = "main"
api_key = { file = "$DIR/api-key" }
api_secret = { file = "$DIR/api-secret" }

[[consumer]]
name = "engine"
client_cert = { uri = "spiffe://ci.local/ns/trading/sa/engine" }
accounts = ["main"]
rate_limit = { per_second = 10000, burst = 100000 }
TOML
"$BIN" serve --config broker.toml >/dev/null 2>"$BROKER_LOG" &
BROKER=$!
for _ in $(seq 1 100); do
  API=$(grep -o '"api":"127.0.0.1:[0-9]*"' "$BROKER_LOG" | head -1 | grep -o '127.0.0.1:[0-9]*' || true)
  [ -n "$API" ] && break
  sleep 0.1
done
[ -n "${API:-}" ] || { cat "$BROKER_LOG"; echo "the broker did not start" >&2; exit 1; }
# Plain HTTP to the TLS port gets no HTTP answer.
if curl -s -m 5 "http://$API/v1/token" -o /dev/null -w '%{http_code}' | grep -q '^[1-5]'; then
  echo "the TLS port answered plain HTTP" >&2; exit 1
fi
curl -fs --cacert ca.crt --cert engine.crt --key engine.key "https://$API/v1/token" >/dev/null
"$ST" --config-file "$ROOT/ci/schemathesis.toml" run "$ROOT/proto-docs/openapi.yaml" \
  --url "https://$API" --mode all --max-examples 30 --seed 42 --checks all \
  --exclude-checks ignored_auth \
  --exclude-operation-id watchToken --exclude-operation-id relay \
  --tls-verify ca.crt --request-cert engine.crt --request-cert-key engine.key
# (ignored_auth is left out here only: every request carries the engine's
# certificate, which is its identity, so one "without authentication" cannot
# be made; the plain run in ci/schemathesis.sh keeps it, with bearers.)
# (watchToken, GET /v1/token/watch, is an event stream that never ends, which a
# request/response checker cannot judge; tests/watch.rs covers it.)
# (relay, GET /v1/relay, is a WebSocket upgrade: its success is 101 Switching
# Protocols and a connection that then speaks Kraken's WebSocket v2, which a
# request/response checker can neither make nor judge; the Rust tests of the
# relay cover it, against the simulator and a second WebSocket server.)

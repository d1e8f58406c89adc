"""The Grafana dashboard (helm/kraken-token-broker/files/dashboard.json)
against a real Prometheus scraping a real broker wired to the simulator.

First the model itself: schema version, a stable uid, the `datasource`,
`instance` and `account` variables, every datasource reference through
`${datasource}` (never a hard-coded uid), unique panel ids, no overlapping
panels, and every metric a query names in src/metrics/catalogue.txt.

Then a broker with three accounts (`main` healthy with a key that expires,
`spare` whose key holds withdraw-funds, `stale` whose key Kraken does not
know) gets traffic that makes every series the dashboard shows exist: tokens
served, an open watch stream, a failed then retried refresh, refusals for
each auth reason, a 429 and a 503. Every panel target, with the variables
substituted as Grafana would ($account = main), runs against /api/v1/query:
a query error fails, and so does an empty result unless the target is in
MAY_BE_EMPTY; the targets in MUST_BE_NONZERO must also show the traffic.
Each variable's own query must find the live label values, and each legend's
{{label}} must be a label of the series it names.

Everything listens on 127.0.0.1; every process is stopped by PID; every wait
has a deadline.

usage: python dashboard_check.py BROKER_BINARY
"""

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from ktb_harness import free_port, start_prometheus, start_simulator, stop_all, wait, write_broker_config
from prometheus_e2e import http

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "helm" / "kraken-token-broker" / "files" / "dashboard.json"
CATALOGUE = ROOT / "src" / "metrics" / "catalogue.txt"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ACCOUNT = "main"

# Grafana's built-in variables, as a 1-second scrape and a 1-hour view would
# make them.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__interval_ms": "15000",
            "__range": "1h", "__range_s": "3600", "__range_ms": "3600000"}

# (panel title, refId) of targets whose result may be empty in a healthy run,
# each with why. The run below makes everything else exist; keep this short.
MAY_BE_EMPTY: dict[tuple[str, str], str] = {
    # None today: every target either reads a series the broker sets to 0 at
    # start, or is filtered (> 0) to events this run causes.
}

# (panel title, refId) of targets that must show the run's traffic (some
# series above 0), not only exist: the evidence that the query reads what
# its title says.
MUST_BE_NONZERO: dict[tuple[str, str], str] = {
    ("Tokens served / s", "A"): "tokens were served",
    ("Requests refused / s", "A"): "requests were refused",
    ("Tokens served, by account and consumer", "A"): "tokens were served",
    ("Open watch streams", "A"): "a watch stream is open",
    ("Refresh calls, by outcome", "A"): "refreshes were made",
    ("Rejected calls in the last 15 minutes, and the budget", "A"): "Kraken rejected stale's key",
    ("Permissions the key holds", "A"): "main's key holds create-ws-token",
    ("Signing key", "A"): "main signs with a key",
    ("Open relay connections", "A"): "a relay connection is open",
    ("Relayed frames / s, by direction", "A"): "frames were relayed",
    ("Relay refusals, by consumer and reason", "A"): "the relay refused a malformed frame",
}


def check_model(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Fails on a malformed model; returns the panels that query."""
    assert dash.get("schemaVersion", 0) >= 36, "schemaVersion 36 or later (Grafana 9+)"
    assert dash.get("uid") == "kraken-token-broker", "a stable uid"
    assert dash.get("id") is None, "no instance id in a provisioned dashboard"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables.get("datasource", {})
    assert ds.get("type") == "datasource" and ds.get("query") == "prometheus", "a prometheus datasource variable"
    for name in ("instance", "account"):
        v = variables.get(name, {})
        assert v.get("type") == "query" and v.get("datasource") == DATASOURCE, f"a query variable {name}"
        assert v["query"]["query"].startswith("label_values("), f"{name}: label_values"

    def refs(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource" and where != "annotations":
                    assert value == DATASOURCE, f"{where}: datasource {value!r} is not {DATASOURCE}"
                else:
                    refs(value, where)
        elif isinstance(node, list):
            for item in node:
                refs(item, where)

    refs(dash["panels"], "panels")
    refs([v for v in dash["templating"]["list"] if v["name"] != "datasource"], "templating")

    known = {line.split()[0] for line in CATALOGUE.read_text().splitlines() if line.strip()}
    ids: set[int] = set()
    cells: dict[tuple[int, int], str] = {}
    queried = []
    for p in dash["panels"]:
        assert p["id"] not in ids, f"panel id {p['id']} twice"
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"{p['title']}: off the 24-column grid"
        for cx in range(g["x"], g["x"] + g["w"]):
            for cy in range(g["y"], g["y"] + g["h"]):
                assert (cx, cy) not in cells, f"{p['title']} overlaps {cells[(cx, cy)]}"
                cells[(cx, cy)] = p["title"]
        if p["type"] == "row":
            assert p.get("collapsed") is False and p.get("panels") == [], f"row {p['title']}: open, panels at top level"
            continue
        assert p["type"] in ("timeseries", "stat"), f"{p['title']}: type {p['type']}"
        assert p.get("description"), f"{p['title']}: a description"
        ref_ids = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(set(ref_ids)) == len(ref_ids), f"{p['title']}: targets with unique refIds"
        for t in p["targets"]:
            for name in re.findall(r"kraken_token_broker_\w+", t["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert name in known or base in known, f"{p['title']}: {name} is not in {CATALOGUE.name}"
        queried.append(p)
    titles = [p["title"] for p in queried]
    assert len(set(titles)) == len(titles), "panel titles are unique (the allow-lists name them)"
    for key in [*MAY_BE_EMPTY, *MUST_BE_NONZERO]:
        assert any(p["title"] == key[0] and any(t["refId"] == key[1] for t in p["targets"]) for p in queried), \
            f"allow-list entry {key} names no target"
    return queried


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replaces $name, ${name} and [[name]] as Grafana does; fails on any
    variable it does not know."""
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in values, f"unknown variable {m.group(0)} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", one, expr)


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    status, body = http("GET", f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    answer = json.loads(body)
    assert status == 200 and answer.get("status") == "success", \
        f"query failed ({status}): {answer.get('errorType')}: {answer.get('error')}\n  {expr}"
    data = answer["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]


def label_values(prom: str, label: str, match: str) -> list[str]:
    _, body = http("GET", f"{prom}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": match}))
    return json.loads(body)["data"]


def add_account(config: Path, tmp: Path, name: str, key: str, secret: str) -> None:
    (tmp / f"{name}-key").write_text(key + "\n")
    (tmp / f"{name}-secret").write_text(secret + "\n")
    with config.open("a") as f:
        f.write(f'\n[[account]]\nname = "{name}"\napi_key = {{ file = "{tmp}/{name}-key" }}\n'
                f'api_secret = {{ file = "{tmp}/{name}-secret" }}\n')


def main() -> None:
    started = time.monotonic()
    binary = sys.argv[1]
    dash = json.loads(DASHBOARD.read_text())
    panels = check_model(dash)
    print(f"model: schemaVersion {dash['schemaVersion']}, uid {dash['uid']}, {len(panels)} panels, "
          "datasource only through ${datasource}")

    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="ktb-dash-"))
    watch = None
    relay = None
    try:
        # The simulator, its key expiring in 30 days (so the key-expiry panel
        # has a series), and a second key that may withdraw.
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 30 * 86400))
        sim_proc, addr = start_simulator(binary, tmp, "--key-expires", expires)
        procs.append(sim_proc)
        sim = f"http://{addr}"
        status, body = http("POST", f"{sim}/_sim/keys",
                            {"permissions": ["query-funds", "create-ws-token", "withdraw-funds"]})
        assert status == 201, body
        spare = json.loads(body)

        api_port, admin_port = free_port(), free_port()
        credential = write_broker_config(tmp, addr, f"127.0.0.1:{api_port}", f"127.0.0.1:{admin_port}",
                                         'timeout = "2s"')
        config = tmp / "broker.toml"
        add_account(config, tmp, "spare", spare["api_key"], spare["api_secret"])
        add_account(config, tmp, "stale", "unknown-" + secrets.token_hex(16),
                    base64.b64encode(secrets.token_bytes(64)).decode())
        greedy = "ktb_" + secrets.token_urlsafe(32)
        with config.open("a") as f:
            # One request in its burst: its second is refused with 429.
            f.write(f'\n[[consumer]]\nname = "greedy"\n'
                    f'credential_sha256 = "{hashlib.sha256(greedy.encode()).hexdigest()}"\n'
                    'accounts = ["main", "stale"]\nrate_limit = { per_second = 0.01, burst = 2 }\n')
        broker = subprocess.Popen([binary, "serve", "--config", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=(tmp / "broker.log").open("w"))
        procs.append(broker)
        api, admin = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{admin_port}"
        wait("the broker to be ready", 20, lambda: http("GET", f"{admin}/readyz")[0] == 200)

        prometheus, prom = start_prometheus(tmp, admin_port)
        procs.append(prometheus)
        # A scrape before the traffic, so every counter has a 0 to rise from.
        wait("Prometheus to scrape the broker", 30,
             lambda: http("GET", f"{prom}/api/v1/query?query=kraken_token_broker_build_info")[0] == 200
             and query(prom, "kraken_token_broker_build_info"))

        # Traffic. Tokens served, and a watch stream kept open to the end.
        auth = {"Authorization": f"Bearer {credential}"}
        for _ in range(3):
            status, body = http("GET", f"{api}/v1/token?account={ACCOUNT}", headers=auth)
            assert status == 200, body
        watch = urllib.request.urlopen(urllib.request.Request(
            f"{api}/v1/token/watch?account={ACCOUNT}", headers=auth), timeout=10)
        # The stream sends the current token at once (comment lines may come first).
        first: list[bytes] = []
        while not any(line.startswith(b"event: token") for line in first):
            assert len(first) < 20, "the stream sends the current token at once"
            first.append(watch.readline())
        # A relay connection kept open to the end: a subscription, an order,
        # and a frame the broker refuses itself.
        relay = connect(f"ws://127.0.0.1:{api_port}/v1/relay?account={ACCOUNT}", additional_headers=auth,
                        open_timeout=10)
        relay.send(json.dumps({"method": "subscribe", "params": {"channel": "executions"}, "req_id": 1}))
        relay.send(json.dumps({"method": "add_order", "req_id": 2, "params": {
            "order_type": "limit", "side": "buy", "order_qty": 0.001, "limit_price": 1000.0, "symbol": "BTC/USD"}}))
        relay.send("not json")
        answered: set[int] = set()
        refused = False
        while len(answered) < 2 or not refused:
            message = json.loads(relay.recv(timeout=10))
            if message.get("req_id") in (1, 2):
                assert message["success"], message
                answered.add(message["req_id"])
            refused = refused or message.get("error") == "EGeneral:Invalid arguments"
        # A refresh that fails once (Kraken unavailable), then succeeds on retry.
        held = json.loads(http("GET", f"{api}/v1/token?account={ACCOUNT}", headers=auth)[1])["token"]
        status, body = http("PUT", f"{sim}/_sim/fault", {"error": "EService:Unavailable", "count": 1})
        assert status == 200, body
        # Answered with the retried refresh's token, or 503 if the retry is
        # still backing off: either way the failure is counted.
        status, _ = http("POST", f"{api}/v1/token/invalidate?account={ACCOUNT}", {"token": held}, auth)
        assert status in (200, 503), status

        def refreshed_after_failure() -> bool:
            metrics = http("GET", f"{admin}/metrics")[1]
            return (f'kraken_token_broker_refreshes_total{{account="{ACCOUNT}",result="failure"}} 1' in metrics
                    and http("GET", f"{api}/v1/token?account={ACCOUNT}", headers=auth)[0] == 200)

        wait("a failed refresh and its successful retry", 15, refreshed_after_failure, every=0.2)
        # Refusals: each auth reason, a 503 (stale has no token) and a 429.
        assert http("GET", f"{api}/v1/token?account={ACCOUNT}")[0] == 401
        assert http("GET", f"{api}/v1/token?account={ACCOUNT}", headers={"Authorization": "Bearer ktb_wrong"})[0] == 401
        assert http("GET", f"{api}/v1/token?account=spare", headers=auth)[0] == 403
        greedy_auth = {"Authorization": f"Bearer {greedy}"}
        assert http("GET", f"{api}/v1/token?account=stale", headers=greedy_auth)[0] == 503
        assert http("GET", f"{api}/v1/token?account={ACCOUNT}", headers=greedy_auth)[0] == 200
        assert http("GET", f"{api}/v1/token?account={ACCOUNT}", headers=greedy_auth)[0] == 429
        # The key facts arrive with GetApiKeyInfo's answers (at start).
        wait("Kraken's answer about main's and spare's keys", 15,
             lambda: 'permission="withdraw-funds"} 1' in http("GET", f"{admin}/metrics")[1])
        done = time.time()
        wait("a scrape after the traffic", 15,
             lambda: float(query(prom, "max(timestamp(kraken_token_broker_build_info))")[0]["value"][1]) > done + 0.5)

        # The variables' own queries find the live values.
        instance = f"127.0.0.1:{admin_port}"
        values = {**BUILTINS, "datasource": "prometheus", "instance": instance, "account": ACCOUNT}
        for v in dash["templating"]["list"]:
            if v["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", substitute(v["query"]["query"], values))
            assert m, f"variable {v['name']}: {v['query']['query']}"
            found = label_values(prom, m.group(2), m.group(1))
            assert values[v["name"]] in found, f"variable {v['name']} finds {found}, not {values[v['name']]}"
            print(f"variable {v['name']}: {found}")

        failures = []
        for p in panels:
            for t in p["targets"]:
                key = (p["title"], t["refId"])
                try:
                    result = query(prom, substitute(t["expr"], values))
                except AssertionError as e:
                    failures.append(f"{key}: {e}")
                    print(f"FAIL {p['title']} [{t['refId']}]: {e}")
                    continue
                line = f"{p['title']} [{t['refId']}]: {len(result)} series"
                if not result and key not in MAY_BE_EMPTY:
                    failures.append(f"{key}: empty, and not in MAY_BE_EMPTY")
                    line += "  <- EMPTY"
                elif not result:
                    line += f"  (may be empty: {MAY_BE_EMPTY[key]})"
                if key in MUST_BE_NONZERO:
                    top = max((float(r["value"][1]) for r in result), default=0.0)
                    if not top > 0:
                        failures.append(f"{key}: all 0, but {MUST_BE_NONZERO[key]}")
                        line += "  <- ALL ZERO"
                    else:
                        line += f", max {top:.3g}"
                for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")):
                    if any(label not in r["metric"] for r in result):
                        failures.append(f"{key}: legend names {label}, which its series lack")
                        line += f"  <- LEGEND {label}"
                print(line)
        assert not failures, "dashboard check failed:\n  " + "\n  ".join(failures)
        print(f"dashboard check: {sum(len(p['targets']) for p in panels)} targets pass "
              f"({time.monotonic() - started:.1f} s)")
    finally:
        if watch is not None:
            watch.close()
        if relay is not None:
            relay.close()
        stop_all(procs)
        if os.environ.get("KEEP_TMP") is None:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()

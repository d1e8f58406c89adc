"""A real Prometheus scraping a real broker wired to the simulator, with the
chart's alert rules loaded: the key-rejected alert fires when Kraken starts
rejecting the key and resolves when it is healed. Also lints the broker's
/metrics with `promtool check metrics`.

Everything listens on 127.0.0.1; every process is stopped by PID; every wait
has a deadline.

usage: python prometheus_e2e.py BROKER_BINARY
"""

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "helm" / "kraken-token-broker" / "files" / "alert-rules.yaml"
ALERT = "KrakenTokenBrokerKeyRejected"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait(what: str, seconds: float, probe):
    deadline = time.monotonic() + seconds
    while True:
        try:
            result = probe()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.25)


def read_line(path: Path, prefix: str) -> str | None:
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


def alerts(prom: str) -> list[dict]:
    _, body = http("GET", f"{prom}/api/v1/alerts")
    return [a for a in json.loads(body)["data"]["alerts"] if a["labels"]["alertname"] == ALERT]


def main() -> None:
    binary = sys.argv[1]
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="ktb-prom-"))
    try:
        # The simulator, with its generated key.
        sim_out = tmp / "sim.out"
        procs.append(subprocess.Popen([binary, "simulate", "--listen", "127.0.0.1:0"],
                                      stdout=sim_out.open("w"), stderr=subprocess.STDOUT))
        addr = wait("the simulator", 20, lambda: read_line(sim_out, "Kraken simulator listening on"))
        wait("the simulator's key", 5, lambda: read_line(sim_out, "API secret:"))
        sim = f"http://{addr}"
        (tmp / "api-key").write_text(read_line(sim_out, "API key:") + "\n")
        (tmp / "api-secret").write_text(read_line(sim_out, "API secret:") + "\n")

        # The broker, with one consumer whose credential only this script knows.
        credential = "ktb_" + secrets.token_urlsafe(32)
        api_port, admin_port = free_port(), free_port()
        config = tmp / "broker.toml"
        config.write_text(f"""
[listen]
api = "127.0.0.1:{api_port}"
admin = "127.0.0.1:{admin_port}"
[kraken]
rest_url = "{sim}"
ws_url = "ws://{addr}/v2"
timeout = "2s"
[[account]]
name = "main"
api_key = {{ file = "{tmp}/api-key" }}
api_secret = {{ file = "{tmp}/api-secret" }}
[[consumer]]
name = "engine"
credential_sha256 = "{hashlib.sha256(credential.encode()).hexdigest()}"
accounts = ["main"]
""")
        broker_log = tmp / "broker.log"
        broker = subprocess.Popen([binary, "serve", "--config", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=broker_log.open("w"))
        procs.append(broker)
        api, admin = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{admin_port}"
        wait("the broker to be ready", 20, lambda: http("GET", f"{admin}/readyz")[0] == 200)

        # promtool lints the exposition.
        _, metrics = http("GET", f"{admin}/metrics")
        lint = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True)
        assert lint.returncode == 0, f"promtool check metrics: {lint.stdout}{lint.stderr}"
        print("promtool check metrics: clean")

        # Prometheus, scraping and evaluating every second.
        prom_port = free_port()
        prom_config = tmp / "prometheus.yml"
        prom_config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES}
scrape_configs:
  - job_name: kraken-token-broker
    static_configs:
      - targets: ["127.0.0.1:{admin_port}"]
""")
        procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={prom_config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=(tmp / "prometheus.log").open("w")))
        prom = f"http://127.0.0.1:{prom_port}"

        def target_up():
            status, body = http("GET", f"{prom}/api/v1/targets")
            targets = json.loads(body)["data"]["activeTargets"] if status == 200 else []
            return any(t["health"] == "up" for t in targets)

        wait("Prometheus to scrape the broker", 60, target_up)
        wait("a first rule evaluation", 30, lambda: http("GET", f"{prom}/api/v1/rules")[0] == 200
             and json.loads(http("GET", f"{prom}/api/v1/rules")[1])["data"]["groups"][0]["rules"][0].get("lastEvaluation", "").startswith("2"))
        assert alerts(prom) == [], f"{ALERT} is silent while the key works"

        # Break it: Kraken starts rejecting the key. An engine reports its token
        # rejected, which makes the broker call Kraken now.
        status, body = http("PUT", f"{sim}/_sim/fault", {"error": "EAPI:Invalid key"})
        assert status == 200, body
        auth = {"Authorization": f"Bearer {credential}"}
        _, token = http("GET", f"{api}/v1/token", headers=auth)
        status, body = http("POST", f"{api}/v1/token/invalidate", {"token": json.loads(token)["token"]}, auth)
        assert status == 503, f"no token can be had now: {status} {body}"
        broke = time.monotonic()
        firing = wait(f"{ALERT} to fire", 60, lambda: [a for a in alerts(prom) if a["state"] == "firing"])
        assert firing[0]["labels"]["account"] == "main", firing
        assert firing[0]["labels"]["severity"] == "critical", firing
        assert firing[0]["annotations"]["runbook_url"].endswith("#krakentokenbrokerkeyrejected"), firing
        print(f"{ALERT} firing {time.monotonic() - broke:.1f} s after the key was rejected")

        # Heal it: Kraken accepts the key again, and the operator reloads
        # (SIGHUP retries a rejected account at once instead of in 5 minutes).
        status, _ = http("DELETE", f"{sim}/_sim/fault")
        assert status == 204
        broker.send_signal(signal.SIGHUP)
        wait("the broker to be ready again", 30, lambda: http("GET", f"{admin}/readyz")[0] == 200)
        healed = time.monotonic()
        wait(f"{ALERT} to resolve", 60, lambda: alerts(prom) == [])
        print(f"{ALERT} resolved {time.monotonic() - healed:.1f} s after the key was accepted again")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if os.environ.get("KEEP_TMP") is None:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()

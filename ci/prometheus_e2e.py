"""A real Prometheus scraping a real broker wired to the simulator, with the
chart's alert rules loaded: the key-expiry alert fires from the expiry Kraken
reports (GetApiKeyInfo's validUntil, 10 days ahead, with no key_expires_at in
the config); the key-rejected alert fires when Kraken starts rejecting the key
and resolves when it is healed; and krakenex, signing with the broker's key
with a nonce ahead of the broker's, is seen as use elsewhere within one
key_info_interval, firing the key-used-elsewhere alert. Also lints the
broker's /metrics with `promtool check metrics`.

Everything listens on 127.0.0.1; every process is stopped by PID; every wait
has a deadline.

usage: python prometheus_e2e.py BROKER_BINARY
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ktb_harness import free_port, start_prometheus, start_simulator, stop_all, wait, write_broker_config

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "helm" / "kraken-token-broker" / "files" / "alert-rules.yaml"
ALERT = "KrakenTokenBrokerKeyRejected"


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


def alerts(prom: str, name: str = ALERT) -> list[dict]:
    _, body = http("GET", f"{prom}/api/v1/alerts")
    return [a for a in json.loads(body)["data"]["alerts"] if a["labels"]["alertname"] == name]


EXPIRY_ALERT = "KrakenTokenBrokerKeyExpiresWithin14Days"
ELSEWHERE_ALERT = "KrakenTokenBrokerKeyUsedElsewhere"
INTERVAL_SECS = 60  # key_info_interval = "1m", the least the config allows


def main() -> None:
    binary = sys.argv[1]
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="ktb-prom-"))
    try:
        # The simulator, with its generated key expiring in 10 days (set at
        # "Kraken" only), and a broker wired to it.
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 10 * 86400))
        sim_proc, addr = start_simulator(binary, tmp, "--key-expires", expires)
        procs.append(sim_proc)
        sim = f"http://{addr}"
        api_port, admin_port = free_port(), free_port()
        credential = write_broker_config(tmp, addr, f"127.0.0.1:{api_port}", f"127.0.0.1:{admin_port}",
                                         'timeout = "2s"\nkey_info_interval = "1m"')
        config = tmp / "broker.toml"
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
        prometheus, prom = start_prometheus(tmp, admin_port, RULES)
        procs.append(prometheus)

        def target_up():
            status, body = http("GET", f"{prom}/api/v1/targets")
            targets = json.loads(body)["data"]["activeTargets"] if status == 200 else []
            return any(t["health"] == "up" for t in targets)

        wait("Prometheus to scrape the broker", 60, target_up)
        def evaluated():
            status, body = http("GET", f"{prom}/api/v1/rules")
            rules = json.loads(body)["data"]["groups"][0]["rules"] if status == 200 else []
            return rules and rules[0].get("lastEvaluation", "").startswith("2")

        wait("a first rule evaluation", 30, evaluated)
        assert alerts(prom) == [], f"{ALERT} is silent while the key works"

        # The expiry Kraken reports reaches the 14-day alert.
        expiring = wait(f"{EXPIRY_ALERT} to fire", 60,
                        lambda: [a for a in alerts(prom, EXPIRY_ALERT) if a["state"] == "firing"])
        assert expiring[0]["labels"]["account"] == "main", expiring
        assert expiring[0]["labels"]["severity"] == "warning", expiring
        assert "GetApiKeyInfo" in expiring[0]["annotations"]["description"], expiring
        assert alerts(prom, ELSEWHERE_ALERT) == [], "no use elsewhere yet"
        print(f"{EXPIRY_ALERT} firing from Kraken's validUntil ({expires})")

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

        # krakenex signs with the broker's key, its nonce an hour ahead of the
        # broker's nanosecond clock (as another broker, or a script using
        # nanoseconds, would be): the broker's next GetApiKeyInfo is refused,
        # and again re-signed, so the key is used elsewhere.
        import krakenex
        other = krakenex.API(key=(tmp / "api-key").read_text().strip(),
                             secret=(tmp / "api-secret").read_text().strip())
        other.uri = sim
        other._nonce = lambda: time.time_ns() + 3600 * 10**9
        answer = other.query_private("GetApiKeyInfo")
        assert answer["error"] == [], answer
        assert "create-ws-token" in answer["result"]["permissions"], answer
        signed = time.monotonic()
        used = wait(f"{ELSEWHERE_ALERT} to fire", INTERVAL_SECS + 30,
                    lambda: [a for a in alerts(prom, ELSEWHERE_ALERT) if a["state"] == "firing"])
        took = time.monotonic() - signed
        assert used[0]["labels"]["account"] == "main", used
        assert used[0]["labels"]["severity"] == "critical", used
        assert took <= INTERVAL_SECS + 15, f"seen within one key_info_interval: {took:.1f} s"
        _, metrics = http("GET", f"{admin}/metrics")
        assert 'kraken_token_broker_api_key_foreign_use_total{account="main"} 1' in metrics, metrics
        rejected = [c for c in json.loads(http("GET", f"{sim}/_sim/calls")[1])["calls"]
                    if c["outcome"] == "EAPI:Invalid nonce"]
        assert len(rejected) <= 2, f"at most two rejected calls: {rejected}"
        print(f"{ELSEWHERE_ALERT} firing {took:.1f} s after krakenex signed with the key "
              f"({len(rejected)} rejected calls)")
    finally:
        stop_all(procs)
        if os.environ.get("KEEP_TMP") is None:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()

"""Shared by the Python checks and the benchmark: free ports, polling with a
deadline, and a simulator plus a broker config on loopback."""

import hashlib
import secrets
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what: str, seconds: float, probe, every: float = 0.05):
    """Polls `probe` until it returns something truthy; fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = probe()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(every)


def read_line(path: Path, prefix: str) -> str | None:
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


def start_simulator(binary: str, tmp: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """Starts `simulate` on a free loopback port; writes its key and secret to
    tmp/api-key and tmp/api-secret. Returns the process and its address."""
    out = tmp / "sim.out"
    proc = subprocess.Popen([binary, "simulate", "--listen", "127.0.0.1:0", *args],
                            stdout=out.open("w"), stderr=subprocess.STDOUT)
    addr = wait("the simulator", 20, lambda: read_line(out, "Kraken simulator listening on"))
    wait("the simulator's key", 5, lambda: read_line(out, "API secret:"))
    (tmp / "api-key").write_text(read_line(out, "API key:") + "\n")
    (tmp / "api-secret").write_text(read_line(out, "API secret:") + "\n")
    return proc, addr


def write_broker_config(tmp: Path, sim_addr: str, api: str, admin: str, extra: str = "", consumer_extra: str = "") -> str:
    """A config for one account `main` (the simulator's key) and one consumer
    `engine` (with `consumer_extra` lines, e.g. a rate_limit); returns the
    consumer's credential."""
    credential = "ktb_" + secrets.token_urlsafe(32)
    (tmp / "broker.toml").write_text(f"""
[listen]
api = "{api}"
admin = "{admin}"
[kraken]
rest_url = "http://{sim_addr}"
ws_url = "ws://{sim_addr}/v2"
{extra}
[[account]]
name = "main"
api_key = {{ file = "{tmp}/api-key" }}
api_secret = {{ file = "{tmp}/api-secret" }}
[[consumer]]
name = "engine"
credential_sha256 = "{hashlib.sha256(credential.encode()).hexdigest()}"
accounts = ["main"]
{consumer_extra}
""")
    return credential


def start_prometheus(tmp: Path, admin_port: int, rules: Path | None = None) -> tuple[subprocess.Popen, str]:
    """A Prometheus scraping the broker's admin port every second (and
    evaluating `rules`, if given, as often). Returns the process and its URL."""
    port = free_port()
    rule_files = f"rule_files:\n  - {rules}\n" if rules else ""
    config = tmp / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
{rule_files}scrape_configs:
  - job_name: kraken-token-broker
    static_configs:
      - targets: ["127.0.0.1:{admin_port}"]
""")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp / "prometheus.log").open("w"))
    return proc, f"http://127.0.0.1:{port}"


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Terminates the processes (last started first), killing any that linger."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()

"""Fixtures: `kraken-token-broker demo` (a simulator and a broker wired to
it, on loopback) started once for the session; for the relay tests,
`simulate` and `serve` with consumers that use the relay (`relay`). KTB_BIN
names the binary (default: the repository's target/debug build)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Demo:
    api: str
    admin: str
    sim: str
    ws_url: str
    credential: str
    account: str

    def sim_post(self, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else b"{}"
        req = urllib.request.Request(f"{self.sim}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read()
        return json.loads(text) if text else {}

    def sim_get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.sim}{path}", timeout=5) as r:
            return json.loads(r.read())

    def api_key(self) -> str:
        """The simulator's API key (its public half; the secret is never shown)."""
        return self.sim_get("/_sim/state")["keys"][0]["api_key"]


def _wait(what: str, seconds: float, probe):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = probe()
        except urllib.error.HTTPError:
            # Not ready yet (503 while the first token is minted, after the
            # broker has asked Kraken about its key).
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _binary() -> str:
    return os.environ.get("KTB_BIN", str(ROOT / "target" / "debug" / "kraken-token-broker"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Demo:
    binary = _binary()
    out = tmp_path_factory.mktemp("demo") / "demo.out"
    env = dict(os.environ, RUST_LOG="warn")
    env.pop("KTB_CONSUMER_CREDENTIAL", None)
    proc = subprocess.Popen([binary, "demo", "--api-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
                            stdout=out.open("w"), stderr=subprocess.DEVNULL, env=env)
    try:
        text = _wait("the demo", 20, lambda: (t := out.read_text()) and "Ctrl-C" in t and t)
        api = re.search(r"(http://127\.0\.0\.1:\d+)/v1/token", text).group(1)
        admin = re.search(r"(http://127\.0\.0\.1:\d+)/readyz", text).group(1)
        ws = re.search(r"(ws://127\.0\.0\.1:\d+/v2)", text).group(1)
        sim = ws.replace("ws://", "http://").removesuffix("/v2")
        credential = re.search(r"KTB_CONSUMER_CREDENTIAL=(ktb_\S+)", text).group(1)
        account = re.search(r"account:\s+(\S+)", text).group(1)
        _wait("readiness", 20, lambda: urllib.request.urlopen(f"{admin}/readyz", timeout=2).status == 200)
        yield Demo(api=api, admin=admin, sim=sim, ws_url=ws, credential=credential, account=account)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# The relay's consumers: what each may do through it (`relay.allow`).
RELAY_CONSUMERS = {
    # An engine that trades through the relay only (/v1/token answers it 403).
    "relay-engine": 'relay_only = true\nrelay = { allow = ["subscribe:executions", "subscribe:balances", '
                    '"unsubscribe", "add_order", "cancel_order"] }',
    # A read-only one: balances, nothing else.
    "relay-reader": 'relay_only = true\nrelay = { allow = ["subscribe:balances"] }',
    # The tests' own view of the account's token (to look for it in an engine).
    "monitor": "",
}


@dataclass
class Relay:
    """`simulate` and `serve` on loopback, the broker's account `main`
    granted to RELAY_CONSUMERS. `api`/`account`/`credential` are
    relay-engine's (what Engine gives an engine)."""

    api: str
    admin: str
    sim: str
    account: str
    credentials: dict[str, str]
    audit: Path

    @property
    def credential(self) -> str:
        return self.credentials["relay-engine"]

    def sim_get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.sim}{path}", timeout=5) as r:
            return json.loads(r.read())

    def sim_post(self, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(f"{self.sim}{path}", data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read()
        return json.loads(text) if text else {}

    def api_key(self) -> str:
        return self.sim_get("/_sim/state")["keys"][0]["api_key"]

    def minted(self) -> set[str]:
        """The fingerprints (first 8 hex characters of the SHA-256) of every
        token the simulator has issued."""
        return {t["fingerprint"] for t in self.sim_get("/_sim/tokens")["tokens"]}

    def metric(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels` (0 if none)."""
        with urllib.request.urlopen(f"{self.admin}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for match in re.finditer(rf"^{re.escape(name)}(?:\{{(.*?)\}})? (\S+)$", text, re.M):
            have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(match.group(2))
        return total

    def audit_lines(self) -> list[dict]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def relay(tmp_path_factory) -> Relay:
    binary = _binary()
    tmp = tmp_path_factory.mktemp("relay")
    procs: list[subprocess.Popen] = []
    try:
        sim_out = tmp / "sim.out"
        procs.append(subprocess.Popen([binary, "simulate", "--listen", "127.0.0.1:0"],
                                      stdout=sim_out.open("w"), stderr=subprocess.STDOUT))

        def line(prefix: str) -> str | None:
            for text in sim_out.read_text().splitlines():
                if text.strip().startswith(prefix):
                    return text.strip()[len(prefix):].strip()
            return None

        sim_addr = _wait("the simulator", 20, lambda: line("Kraken simulator listening on"))
        _wait("the simulator's key", 5, lambda: line("API secret:"))
        (tmp / "api-key").write_text(line("API key:") + "\n")
        (tmp / "api-secret").write_text(line("API secret:") + "\n")
        (tmp / "audit-key").write_text(secrets.token_hex(32) + "\n")
        api, admin = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
        credentials = {name: "ktb_" + secrets.token_urlsafe(32) for name in RELAY_CONSUMERS}
        consumers = "".join(f"""
[[consumer]]
name = "{name}"
credential_sha256 = "{hashlib.sha256(credentials[name].encode()).hexdigest()}"
accounts = ["main"]
{extra}
""" for name, extra in RELAY_CONSUMERS.items())
        (tmp / "broker.toml").write_text(f"""
[listen]
api = "{api}"
admin = "{admin}"
[kraken]
rest_url = "http://{sim_addr}"
ws_url = "ws://{sim_addr}/v2"
[audit]
to = "{tmp}/audit.jsonl"
fingerprint_key = {{ file = "{tmp}/audit-key" }}
[[account]]
name = "main"
api_key = {{ file = "{tmp}/api-key" }}
api_secret = {{ file = "{tmp}/api-secret" }}
{consumers}""")
        env = dict(os.environ, RUST_LOG="warn")
        env.pop("KTB_CONSUMER_CREDENTIAL", None)
        procs.append(subprocess.Popen([binary, "serve", "--config", str(tmp / "broker.toml")],
                                      stdout=subprocess.DEVNULL, stderr=(tmp / "broker.err").open("w"), env=env))
        def ready() -> bool:
            if procs[-1].poll() is not None:
                raise AssertionError("the broker exited")
            try:
                return urllib.request.urlopen(f"http://{admin}/readyz", timeout=2).status == 200
            except OSError:  # not listening yet, or 503 until the first token
                return False

        try:
            _wait("readiness", 20, ready)
        except AssertionError:
            raise AssertionError(f"the broker did not get ready:\n{(tmp / 'broker.err').read_text()[-3000:]}") from None
        yield Relay(api=f"http://{api}", admin=f"http://{admin}", sim=f"http://{sim_addr}", account="main",
                    credentials=credentials, audit=tmp / "audit.jsonl")
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

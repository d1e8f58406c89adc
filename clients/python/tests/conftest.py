"""Fixtures: `kraken-token-broker demo` (a simulator and a broker wired to
it, on loopback) started once for the session. KTB_BIN names the binary
(default: the repository's target/debug build)."""

from __future__ import annotations

import json
import os
import re
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


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Demo:
    binary = os.environ.get("KTB_BIN", str(ROOT / "target" / "debug" / "kraken-token-broker"))
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

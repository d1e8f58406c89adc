"""Helpers of the relay tests: looking for tokens in frames, and stand-ins
for the relay and for Kraken's public WebSocket that record what they got."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from websockets.asyncio.server import serve

# The simulator's tokens: 32 random bytes in unpadded standard base64 (43
# characters); runs of such characters are where one could hide.
_TOKEN_LENGTH = 43
_RUN = re.compile(r"[A-Za-z0-9+/=_-]{16,}")


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def tokens_in(frame: str | bytes, fingerprints: set[str]) -> set[str]:
    """The fingerprints in `fingerprints` of tokens found in `frame`: any JSON
    string in it, and any run of base64 characters or 43-character window of
    one, whose SHA-256 starts with a fingerprint."""
    text = frame.decode("utf-8", "replace") if isinstance(frame, bytes) else frame
    candidates: set[str] = set()
    try:
        candidates.update(_strings(json.loads(text)))
    except ValueError:
        pass
    for run in _RUN.findall(text):
        candidates.add(run)
        candidates.update(run[i:i + _TOKEN_LENGTH] for i in range(len(run) - _TOKEN_LENGTH + 1))
    found = set()
    for candidate in candidates:
        fingerprint = hashlib.sha256(candidate.encode()).hexdigest()[:8]
        if fingerprint in fingerprints:
            found.add(fingerprint)
    return found


class FakeRelay:
    """A WebSocket server on loopback that records each connection's request
    (path and headers) and every message, and answers as Kraken would: a
    pong, a subscribe's success (and a balances snapshot), a trading
    request's success. As Kraken's public endpoint it does the same."""

    def __init__(self, ssl: Any = None) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.messages: list[dict] = []
        self.url = ""
        self._ssl = ssl

    async def __aenter__(self) -> FakeRelay:
        self._server = await serve(self._serve, "127.0.0.1", 0, ssl=self._ssl)
        scheme = "wss" if self._ssl is not None else "ws"
        self.url = f"{scheme}://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        await self._server.wait_closed()

    def headers(self, name: str) -> list[str | None]:
        """`name`'s value in each connection's request, in order."""
        return [headers.get(name.lower()) for _, headers in self.requests]

    async def _serve(self, conn) -> None:
        self.requests.append((conn.request.path, {k.lower(): v for k, v in conn.request.headers.raw_items()}))
        async for data in conn:
            message = json.loads(data)
            self.messages.append(message)
            method, req_id = message.get("method"), message.get("req_id")
            if method == "ping":
                await conn.send(json.dumps({"method": "pong", "req_id": req_id}))
            elif method == "subscribe":
                result = dict(message.get("params", {}))
                channel = result.get("channel")
                if isinstance(result.get("symbol"), list):
                    result["symbol"] = result["symbol"][0]  # Kraken answers each symbol on its own
                await conn.send(json.dumps({"method": "subscribe", "success": True, "req_id": req_id,
                                            "result": result}))
                if channel == "balances":
                    await conn.send(json.dumps({"channel": "balances", "type": "snapshot", "data": [
                        {"asset": "BTC", "asset_class": "currency", "balance": 1.5, "wallets": []}]}))
            elif method is not None:
                await conn.send(json.dumps({"method": method, "success": True, "req_id": req_id,
                                            "result": {"order_id": "OFAKE1-AAAAA-BBBBBB"}}))


def make_pki(tmp) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate,
    made with openssl in `tmp`; answers their file names."""
    import subprocess

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=ktb-test-ca")
    for name, san in (("server", "IP:127.0.0.1"), ("client", "DNS:engine.test")):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (tmp / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext")
    return {n: str(tmp / n) for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}

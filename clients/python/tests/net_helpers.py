"""Test helpers on loopback: a scripted stand-in for the broker (for
answers the demo cannot be made to give on demand), a forwarder that makes
the demo's broker appear on a port at a chosen moment, the demo's metrics,
and waiting on a condition with a deadline."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.request

# Markets as ccxt would load them from Kraken's public REST API, which these
# offline tests do not reach (one pair is enough).
MARKETS = [{
    "id": "XBTUSD", "symbol": "BTC/USD", "base": "BTC", "quote": "USD", "baseId": "XXBT", "quoteId": "ZUSD",
    "active": True, "type": "spot", "spot": True, "precision": {"amount": 1e-8, "price": 0.1}, "limits": {},
}]
# A limit order far below the simulator's market: it rests, and can be cancelled.
ORDER = {"order_type": "limit", "side": "buy", "order_qty": 0.001, "limit_price": 1000, "symbol": "BTC/USD"}

FAKE_TOKEN = {
    "token": "fake-token-not-from-kraken", "account": "demo", "issued_at": "2026-01-01T00:00:00Z",
    "expires_at": "2026-01-01T00:15:00Z", "expires_in": 900, "ws_url": "ws://127.0.0.1:9/v2",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_answered(demo, route: str, status: int) -> int:
    """The demo broker's kraken_token_broker_http_requests_total{route, status}."""
    with urllib.request.urlopen(f"{demo.admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    pattern = rf'^kraken_token_broker_http_requests_total\{{route="{re.escape(route)}",status="{status}"\}} (\S+)$'
    match = re.search(pattern, text, re.M)
    return int(float(match.group(1))) if match else 0


def sim_put(demo, path: str, body: dict) -> None:
    req = urllib.request.Request(f"{demo.sim}{path}", data=json.dumps(body).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()


async def until(what: str, seconds: float, probe) -> None:
    """Waits (without blocking the loop) until `probe()` is true."""
    deadline = time.monotonic() + seconds
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class ScriptedBroker:
    """Answers each request with the next of `script` (status, headers) and
    the last one ever after: 200 with `token` (default FAKE_TOKEN), else a
    problem JSON. `paths` are the request targets, in order; `raw`, if set,
    is sent instead of any answer (a malformed one)."""

    def __init__(self, script: list[tuple[int, dict[str, str]]], token: dict | None = None) -> None:
        self.script = script
        self.token = token or FAKE_TOKEN
        self.raw: bytes | None = None
        self.requests = 0
        self.paths: list[str] = []
        self.url = ""

    async def __aenter__(self) -> ScriptedBroker:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = (await reader.readline()).decode("latin-1").split(" ")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        self.paths.append(request_line[1] if len(request_line) > 1 else "")
        status, headers = self.script[min(self.requests, len(self.script) - 1)]
        self.requests += 1
        if self.raw is not None:
            writer.write(self.raw)
            await writer.drain()
            writer.close()
            return
        if status == 200:
            body, kind = json.dumps(self.token).encode(), "application/json"
        else:
            body = json.dumps({"type": "about:blank", "title": "scripted", "status": status,
                               "detail": f"scripted {status}"}).encode()
            kind = "application/problem+json"
        head = [f"HTTP/1.1 {status} X", f"Content-Type: {kind}", f"Content-Length: {len(body)}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        writer.close()


class Forwarder:
    """Listens on `port` and pipes every connection to `target` (host, port):
    the broker appears there when this starts."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target

    async def __aenter__(self) -> Forwarder:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

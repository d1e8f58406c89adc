"""Watch-stream benchmark: the cost of one watcher (the broker's RSS with
1,000 open streams against none), and the time from a new token to the
200th watcher having it (an invalidation reported while 200 watch).

Starts the simulator and a release broker on loopback with 20 consumers
(a consumer holds at most 64 streams), opens the streams with asyncio.

usage: python bench/watch.py BROKER_BINARY OUT.json
"""

import asyncio
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ci"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import rss_kib  # noqa: E402
from ktb_harness import free_port, start_simulator, stop_all, wait, write_broker_config  # noqa: E402

CONSUMERS = 20
PER_CONSUMER = 50


class Watcher:
    def __init__(self, port: int, credential: str, source: str):
        self.port, self.credential, self.source = port, credential, source
        self.tokens: list[tuple[float, str]] = []

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(self.source, 0))
        self.writer.write(
            f"GET /v1/token/watch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.credential}\r\n\r\n".encode())
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:100]

    async def next_token(self) -> str:
        while True:
            block = await self.reader.readuntil(b"\n\n")
            text = block.decode(errors="replace")
            if "event: token" in text:
                data = next(line[6:] for line in text.splitlines() if line.startswith("data: "))
                token = json.loads(data)["token"]
                self.tokens.append((time.monotonic(), token))
                return token


async def scenario(api_port: int, admin_port: int, credentials: list[str], pid: int) -> dict:
    base_rss = rss_kib(pid)
    # From four loopback addresses: the broker takes 512 connections per address.
    watchers = [Watcher(api_port, c, f"127.0.0.{2 + n % 4}")
                for n, c in enumerate(c for c in credentials for _ in range(PER_CONSUMER))]
    for i in range(0, len(watchers), 100):
        await asyncio.gather(*(w.open() for w in watchers[i:i + 100]))
    firsts = await asyncio.gather(*(w.next_token() for w in watchers))
    assert len(set(firsts)) == 1
    await asyncio.sleep(1.0)
    open_rss = rss_kib(pid)
    per_watcher = (open_rss - base_rss) / len(watchers)

    # 200 of them wait for the next token; the rest are closed.
    for w in watchers[200:]:
        w.writer.close()
    watchers = watchers[:200]
    waits = [asyncio.create_task(w.next_token()) for w in watchers]
    await asyncio.sleep(0.5)
    body = json.dumps({"token": firsts[0]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/token/invalidate", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {credentials[0]}", "Content-Type": "application/json"})
    sent = time.monotonic()
    with urllib.request.urlopen(req, timeout=10) as r:
        new = json.loads(r.read())["token"]
    answered = time.monotonic()
    got = await asyncio.gather(*waits)
    assert all(t == new for t in got)
    times = sorted((w.tokens[-1][0] - sent) * 1000 for w in watchers)
    for w in watchers:
        w.writer.close()
    return {
        "watchers": len(credentials) * PER_CONSUMER,
        "rss_kib_without": base_rss,
        "rss_kib_with": open_rss,
        "kib_per_watcher": round(per_watcher, 2),
        "report_answered_ms": round((answered - sent) * 1000, 2),
        "to_200th_watcher_ms": round(times[-1], 2),
        "median_watcher_ms": round(statistics.median(times), 2),
    }


def main() -> None:
    binary, out_path = sys.argv[1], Path(sys.argv[2])
    tmp = Path(tempfile.mkdtemp(prefix="ktb-bench-watch-"))
    procs: list[subprocess.Popen] = []
    try:
        sim, addr = start_simulator(binary, tmp, "--tier", "pro")
        procs.append(sim)
        api_port, admin_port = free_port(), free_port()
        # The harness's consumer `engine` and CONSUMERS - 1 more.
        more = ["ktb_" + secrets.token_urlsafe(32) for _ in range(CONSUMERS - 1)]
        extra = "".join(
            f'\n[[consumer]]\nname = "engine-{i}"\ncredential_sha256 = "{hashlib.sha256(c.encode()).hexdigest()}"\n'
            f'accounts = ["main"]\n' for i, c in enumerate(more))
        credentials = [write_broker_config(tmp, addr, f"127.0.0.1:{api_port}", f"127.0.0.1:{admin_port}",
                                           consumer_extra=extra)] + more
        broker = subprocess.Popen([binary, "serve", "--config", str(tmp / "broker.toml")],
                                  env=dict(os.environ, RUST_LOG="warn"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(broker)
        wait("the broker", 10, lambda: urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2).status == 200)
        results = asyncio.run(scenario(api_port, admin_port, credentials, broker.pid))
        results["machine"] = {"cpus": os.cpu_count(), "kernel": os.uname().release}
        print(json.dumps(results, indent=2))
    finally:
        stop_all(procs)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    out_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The asyncio client against the demo: fetch, invalidate and watch, with the
loop free while a watch waits; refusals typed; patience waits out 503/429
(and honours Retry-After) but never a 401; the back-off's bounds."""

from __future__ import annotations

import asyncio
import os
import time
from urllib.parse import urlsplit

import pytest

from ktb_client import AsyncBroker, Broker, BrokerError, Token
from ktb_client.aio import retry_delay
from net_helpers import ScriptedBroker, free_port, until


def connections_to(port: int) -> int:
    """This process's established TCP connections to 127.0.0.1:`port`."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as table:
        for row in list(table)[1:]:
            fields = row.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == port:
                count += 1
    return count


def test_fetch_invalidate_and_watch_leave_the_loop_free(demo):
    async def main() -> None:
        broker = AsyncBroker(demo.api, account=demo.account, credential=demo.credential)
        token = await broker.fetch(min_ttl=10)
        assert isinstance(token, Token) and token.token and token.ws_url == demo.ws_url
        assert token.token not in repr(token) and demo.credential not in repr(broker)

        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        other = asyncio.create_task(ticker())
        stream = broker.watch(idle_timeout=20)
        first = await anext(stream)
        assert isinstance(first, Token) and first.token == token.token
        nxt = asyncio.create_task(anext(stream))
        # The watch waits for a new token (none comes until the report below);
        # meanwhile the other task runs.
        before = ticks
        await until("the other task to run while the watch waits", 5, lambda: ticks >= before + 30)
        assert not nxt.done()
        replaced = await broker.invalidate(token)
        second = await asyncio.wait_for(nxt, 10)
        assert isinstance(second, Token) and second.token == replaced.token != token.token
        await stream.aclose()

        # Cancelling a task that waits in a watch ends it at once.
        async def follow() -> None:
            async for _ in broker.watch():
                pass

        port = urlsplit(demo.api).port
        follower = asyncio.create_task(follow())
        await until("the follower's connection", 5, lambda: connections_to(port) == 1)
        follower.cancel()
        with pytest.raises(asyncio.CancelledError):
            await follower
        await until("the follower's connection to close", 5, lambda: connections_to(port) == 0)
        other.cancel()

    asyncio.run(main())


def test_refusals_are_typed(demo):
    async def main() -> None:
        wrong = AsyncBroker(demo.api, account=demo.account, credential="ktb_not-a-real-credential-0000000000000")
        with pytest.raises(BrokerError) as e:
            await wrong.fetch()
        assert e.value.status == 401 and e.value.permanent and not e.value.transient
        with pytest.raises(BrokerError) as e:
            await anext(wrong.watch())
        assert e.value.status == 401
        other = AsyncBroker.like(Broker(demo.api, account="not-granted", credential=demo.credential))
        with pytest.raises(BrokerError) as e:
            await other.invalidate("whatever")
        assert e.value.status == 403
        down = AsyncBroker(f"http://127.0.0.1:{free_port()}", credential=demo.credential)
        with pytest.raises(BrokerError) as e:
            await down.fetch()
        assert e.value.status == 0 and e.value.transient

    asyncio.run(main())


def test_patience_waits_out_503_and_429_honouring_retry_after():
    async def main() -> None:
        script = [(503, {"Retry-After": "1"}), (429, {"Retry-After": "1"}), (200, {})]
        async with ScriptedBroker(script) as fake:
            broker = AsyncBroker(fake.url, credential="c")
            started = time.monotonic()
            token = await broker.fetch(patience=10)
            assert token.token == "fake-token-not-from-kraken"
            assert fake.requests == 3
            assert time.monotonic() - started >= 2, "waited each Retry-After (1 s)"

        async with ScriptedBroker([(503, {"Retry-After": "1"})]) as fake:
            broker = AsyncBroker(fake.url, credential="c")
            with pytest.raises(BrokerError) as e:
                await broker.fetch()  # no patience: the first refusal
            assert e.value.status == 503 and e.value.retry_after == 1 and fake.requests == 1
            with pytest.raises(BrokerError):
                await broker.invalidate("t", patience=1.5)  # asks, waits 1 s, asks, 1 s more would overrun
            assert fake.requests == 3

        async with ScriptedBroker([(401, {})]) as fake:
            with pytest.raises(BrokerError) as e:
                await AsyncBroker(fake.url, credential="c").fetch(patience=60)
            assert e.value.status == 401 and fake.requests == 1, "a permanent refusal is not retried"

        # A broker that hangs up at once: asked at 0, after 0.25-0.5 s, and
        # (waits of at least 0.25 + 0.5) perhaps once more; the next wait,
        # at least 1 s, would overrun the patience.
        async with ScriptedBroker([(200, {})]) as fake:
            fake.raw = b""
            with pytest.raises(BrokerError) as e:
                await AsyncBroker(fake.url, credential="c").fetch(patience=1)
            assert e.value.status == 0 and e.value.transient and 2 <= fake.requests <= 3

    asyncio.run(main())


def test_malformed_answers_and_timeouts_are_transient_broker_errors():
    token_head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"

    async def main() -> None:
        cases = {
            b"garbage\r\n\r\n": "not an HTTP answer",
            token_head + b"Content-Length: 2\r\n\r\n{}": "malformed answer",
            token_head + b"Content-Length: 5\r\n\r\n{oops": "malformed answer",
            token_head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n": "chunk",
        }
        for raw, words in cases.items():
            async with ScriptedBroker([(200, {})]) as fake:
                fake.raw = raw
                with pytest.raises(BrokerError) as e:
                    await AsyncBroker(fake.url, credential="c").fetch()
                assert e.value.status == 0 and e.value.transient and words in str(e.value), (raw, e.value)
                # Transient, so patience asks again (and gets a token once the answers mend).
                fake.script, fake.raw = [(200, {})], None
                token = await AsyncBroker(fake.url, credential="c").fetch(patience=5)
                assert token.token == "fake-token-not-from-kraken"
                if raw.startswith(token_head) and b"chunked" not in raw:
                    fake.raw = raw
                    with pytest.raises(BrokerError) as e:
                        await asyncio.to_thread(Broker(fake.url, credential="c").fetch)
                    assert e.value.status == 0 and e.value.transient and "malformed answer" in str(e.value)

        async with ScriptedBroker([(200, {})]) as fake:
            fake.raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\nevent: token\ndata: {bad\n\n"
            with pytest.raises(BrokerError) as e:
                await anext(AsyncBroker(fake.url, credential="c").watch())
            assert e.value.status == 0 and "malformed event" in str(e.value)

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # never answers; the client hangs up

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(BrokerError) as e:
                await AsyncBroker(f"http://127.0.0.1:{port}", credential="c", timeout=0.2).fetch()
            assert e.value.status == 0 and e.value.transient and "timed out after 0.2 s" in str(e.value)
        finally:
            server.close()

    asyncio.run(main())


def test_retry_delay_doubles_to_its_cap_jitters_down_and_honours_retry_after():
    top, bottom = (lambda: 1.0), (lambda: 0.0)
    assert [retry_delay(n, None, initial=0.5, cap=30, rand=top) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert retry_delay(3, None, initial=0.5, cap=30, rand=bottom) == 2.0  # half of 4
    assert retry_delay(1000, None, cap=30, rand=top) == 30
    assert retry_delay(0, 7, rand=top) == 7
    assert retry_delay(10, 7, cap=30, rand=top) == 30

"""The asyncio client: ``Broker``'s calls, awaited, for engines that are
asyncio programs (a blocking ``Broker.watch()`` would stall their loop).

    broker = AsyncBroker("http://broker:8080", account="main")
    token = await broker.fetch(min_ttl=60)
    token = await broker.invalidate(token)        # after ESession:Invalid session
    async for event in broker.watch():            # a Token, or an Unavailable
        ...
    token = await broker.fetch(patience=900)      # waits out 503/429/unreachable

Why asyncio streams rather than the sync client in a thread: a watch is a
stream held open for hours; in a thread it would hold one of the default
executor's few workers for as long (starving every other ``to_thread`` of
the engine), and cancelling the awaiting task could not stop a thread
blocked in ``recv``. On streams a cancelled ``fetch`` or ``watch`` stops at
once and closes its socket. HTTP/1.1 is spoken with ``Connection: close``
(one request per connection, as ``Broker`` does), so the reader needs only
a status line, headers, and a body by length, chunks or end of stream.

``patiently`` is the one retry loop of this package (the providers use it):
it waits out transient refusals (unreachable, 429, 5xx) with capped,
jittered exponential back-off, never shorter than the broker's
``Retry-After``, for at most ``patience`` seconds in all.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from . import Broker, BrokerError, Token, Unavailable, _refusal, _SseParser

__all__ = ["AsyncBroker", "SingleFlight", "patiently", "retry_delay"]

LOG = logging.getLogger("ktb_client")
T = TypeVar("T")

# Back-off of `patiently`: the first wait, and the longest.
DEFAULT_BACKOFF_INITIAL = 0.5
DEFAULT_BACKOFF_MAX = 30.0
# Longest header section accepted from the broker.
_MAX_HEADER_LINES = 100


class AsyncBroker:
    """One broker, one account, for asyncio. Takes ``Broker``'s arguments,
    or wraps a ``Broker`` with ``AsyncBroker.like(broker)``."""

    def __init__(self, url: str, account: str | None = None, **kwargs: object) -> None:
        self._config = Broker(url, account, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def like(cls, broker: Broker) -> AsyncBroker:
        """The same broker, account and identity as a sync ``Broker``."""
        self = cls.__new__(cls)
        self._config = broker
        return self

    @property
    def account(self) -> str | None:
        return self._config.account

    @property
    def relay_url(self) -> str:
        """As ``Broker.relay_url``."""
        return self._config.relay_url

    def relay_headers(self) -> dict[str, str]:
        """As ``Broker.relay_headers()``."""
        return self._config.relay_headers()

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """As ``Broker.ssl_context``."""
        return self._config.ssl_context

    def __repr__(self) -> str:
        return "Async" + repr(self._config)

    async def fetch(self, min_ttl: int | None = None, *, patience: float = 0.0) -> Token:
        """A token with at least ``min_ttl`` seconds left to open a
        connection. With ``patience``, transient refusals are waited out for
        up to that many seconds in all (see ``patiently``)."""
        path = self._config._path("/v1/token", min_ttl=min_ttl)
        return await patiently(lambda: self._call("GET", path), patience)

    async def invalidate(self, token: Token | str, *, patience: float = 0.0) -> Token:
        """Reports a token Kraken rejected; answers the token to use instead.
        Asking again is harmless: a report of a token the broker no longer
        holds changes nothing and answers the current one."""
        value = token.token if isinstance(token, Token) else token
        body = json.dumps({"token": value}).encode()
        path = self._config._path("/v1/token/invalidate")
        return await patiently(lambda: self._call("POST", path, body), patience)

    async def watch(self, idle_timeout: float = 45.0) -> AsyncIterator[Token | Unavailable]:
        """As ``Broker.watch``: the current token at once, then each new
        one; ``Unavailable`` while the broker has none. Ends when the broker
        ends the stream; raises ``BrokerError`` on a refusal and
        ``TimeoutError`` after ``idle_timeout`` seconds without a byte.
        Cancelling the consuming task closes the connection."""
        headers = self._config._headers()
        headers["Accept"] = "text/event-stream"
        reader, writer = await self._open(idle_timeout)
        try:
            status, fields, body = await asyncio.wait_for(
                self._exchange(reader, writer, "GET", self._config._path("/v1/token/watch"), headers, None),
                idle_timeout,
            )
            if status != 200:
                raise _refusal(status, await body.read_all(), fields.get("retry-after"))
            events = _SseParser()
            while True:
                line = await asyncio.wait_for(body.readline(), idle_timeout)
                if not line:
                    return
                try:
                    event = events.feed(line)
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise BrokerError(0, f"a malformed event from the broker at {self._where()}: {_what(e)}") from None
                if event is not None:
                    yield event
        except TimeoutError:
            raise
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            raise BrokerError(0, f"lost the broker at {self._where()}: {_what(e)}") from None
        finally:
            writer.close()

    # -- one request on its own connection --------------------------------

    def _where(self) -> str:
        return f"{self._config._host}:{self._config._port}"

    async def _open(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        config = self._config
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    config._host, config._port, ssl=config._ssl,
                    server_hostname=config._host if config._ssl is not None else None,
                ),
                timeout,
            )
        except (OSError, TimeoutError) as e:
            raise BrokerError(0, f"cannot reach the broker at {self._where()}: {_what(e, timeout)}") from None

    async def _call(self, method: str, path: str, body: bytes | None = None) -> Token:
        headers = self._config._headers()
        if body is not None:
            headers["Content-Type"] = "application/json"
        timeout = self._config._timeout
        reader, writer = await self._open(timeout)
        try:
            async with asyncio.timeout(timeout):
                status, fields, response = await self._exchange(reader, writer, method, path, headers, body)
                data = await response.read_all()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            raise BrokerError(0, f"no answer from the broker at {self._where()}: {_what(e, timeout)}") from None
        finally:
            writer.close()
        if status != 200:
            raise _refusal(status, data, fields.get("retry-after"))
        try:
            return Token.from_json(json.loads(data))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # Transient (status 0): a proxy's page or a cut body; asking again may get a token.
            raise BrokerError(0, f"a malformed answer from the broker at {self._where()}: {_what(e)}") from None

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
    ) -> tuple[int, dict[str, str], _Body]:
        """Sends one request; answers the status, the headers (lower-case
        names) and a reader of the body."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._where()}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        await writer.drain()
        status_line = (await reader.readline()).decode("latin-1").split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/") or not status_line[1].isdigit():
            raise ValueError("not an HTTP answer")
        fields: dict[str, str] = {}
        for _ in range(_MAX_HEADER_LINES):
            line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
            if not line:
                break
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        else:
            raise ValueError("too many header lines")
        chunked = "chunked" in fields.get("transfer-encoding", "").lower()
        length = fields.get("content-length")
        return int(status_line[1]), fields, _Body(reader, chunked, int(length) if length and length.isdigit() else None)


class _Body:
    """A response body read by lines or whole: chunked, of a known length,
    or up to the end of the stream."""

    def __init__(self, reader: asyncio.StreamReader, chunked: bool, length: int | None) -> None:
        self._reader = reader
        self._chunked = chunked
        self._left = length  # bytes left of the body (not chunked) or of the current chunk
        self._buffer = b""
        self._done = False

    async def _more(self) -> bytes:
        """The next piece of the body, b"" at its end."""
        if self._done:
            return b""
        if not self._chunked:
            if self._left is None:
                piece = await self._reader.read(65536)
            else:
                piece = await self._reader.read(min(self._left, 65536)) if self._left else b""
                self._left -= len(piece)
            self._done = not piece
            return piece
        size_line = await self._reader.readline()
        if not size_line:
            self._done = True
            return b""
        try:
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
        except ValueError:
            raise ValueError("a malformed chunk size") from None
        if size == 0:
            self._done = True
            return b""
        piece = await self._reader.readexactly(size)
        await self._reader.readexactly(2)  # the chunk's CRLF
        return piece

    async def readline(self) -> bytes:
        while b"\n" not in self._buffer:
            piece = await self._more()
            if not piece:
                line, self._buffer = self._buffer, b""
                return line
            self._buffer += piece
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    async def read_all(self) -> bytes:
        data, self._buffer = self._buffer, b""
        while piece := await self._more():
            data += piece
        return data


def retry_delay(
    attempt: int,
    retry_after: float | None,
    *,
    initial: float = DEFAULT_BACKOFF_INITIAL,
    cap: float = DEFAULT_BACKOFF_MAX,
    rand: Callable[[], float] = random.random,
) -> float:
    """How long to wait before try ``attempt + 1`` (0-based): ``initial``
    doubling per attempt up to ``cap``, jittered down by at most half so
    engines spread out, and never less than the broker's ``Retry-After``."""
    backoff = min(cap, initial * 2 ** min(attempt, 32))
    jittered = backoff * (0.5 + rand() / 2)
    return max(jittered, float(retry_after or 0))


async def patiently(
    call: Callable[[], Awaitable[T]],
    patience: float,
    *,
    initial: float = DEFAULT_BACKOFF_INITIAL,
    cap: float = DEFAULT_BACKOFF_MAX,
) -> T:
    """``call()``, asked again after each transient ``BrokerError``
    (unreachable, 429, 5xx) as ``retry_delay`` says, for up to ``patience``
    seconds in all. A permanent or other refusal is raised at once; so is
    the last transient one when the next wait would overrun the patience."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    attempt = 0
    while True:
        try:
            return await call()
        except BrokerError as e:
            if not e.transient:
                raise
            delay = retry_delay(attempt, e.retry_after, initial=initial, cap=cap)
            if loop.time() + delay > deadline:
                raise
            LOG.warning("kraken-token-broker: %s; asking again in %.1f s", _reason(e), delay)
            await asyncio.sleep(delay)
            attempt += 1


def _what(error: BaseException, timeout: float | None = None) -> str:
    """An exception as a message that is never empty (a TimeoutError's is)."""
    if isinstance(error, TimeoutError) and not str(error):
        return f"timed out after {timeout:g} s" if timeout is not None else "timed out"
    return str(error) or type(error).__name__


def _reason(error: BrokerError) -> str:
    if error.status == 0:
        return "unreachable"
    return f"HTTP {error.status} {http.client.responses.get(error.status, '')}".rstrip()


class SingleFlight:
    """One call per key at a time: callers that ask for a key while its call
    runs wait for that call's result (or its error) instead of making their
    own. The providers use it so that concurrent watches share one fetch and
    concurrent rejections of one token share one report."""

    def __init__(self) -> None:
        self._running: dict[object, asyncio.Task] = {}

    async def run(self, key: object, call: Callable[[], Awaitable[T]]) -> T:
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(call())
            self._running[key] = task
            task.add_done_callback(lambda _t: self._running.pop(key, None))
        # shield: one waiter cancelled must not cancel the others' call
        return await asyncio.shield(task)

    def cancel(self) -> None:
        """Cancels every call running (their waiters get CancelledError)."""
        for task in list(self._running.values()):
            task.cancel()

"""python-kraken-sdk's ``SpotWSClient`` with its WebSocket token from
kraken-token-broker: the engine holds no API key.

    from ktb_client import Broker
    from ktb_client.kraken_sdk import BrokerSpotWSClient

    client = BrokerSpotWSClient(Broker("http://broker:8080", account="main"), callback=on_message)
    await client.start()
    await client.subscribe(params={"channel": "executions"})
    await client.send_message({"method": "add_order", "params": {...}})

What it takes care of, found in python-kraken-sdk 3.5's source:

- its private connection opens only when a key and a secret are given, so it
  is given placeholders (never a key; the REST client is never used);
- ``get_ws_token`` is what it calls on every (re)connect: here it asks the
  broker (through ``AsyncBroker``, so the loop never blocks), and waits out
  a broker that is unreachable or answers 429/5xx (a Kraken outage: 503 with
  ``Retry-After``) for up to ``patience`` seconds (``DEFAULT_PATIENCE``),
  with back-off capped at ``backoff_max``. The SDK gives up for good after
  7 failed reconnects in a row (``MaxReconnectError``), which a token fetch
  that raised at once used up within a minute or two of an outage;
- nothing is asked at construction: ``start()`` fetches the first token
  (with the same patience, so an engine started before its broker waits for
  it) and the private URL is where the token says (``ws_url``); the SDK
  would append ``/v2`` to a URL given at construction, so the connection's
  endpoint is set from each token instead;
- error replies carry only the ``req_id``, and its own resubscription after
  a reconnect sends none: every subscribe and every trading request
  (``add_order``, ``cancel_order``, ... the SDK's ``private_methods``) gets
  a ``req_id`` here, remembered with its parameters and the token it went
  with, so an ``ESession:Invalid session`` (or ``Token(s) not found``) can
  be matched to what to send again. On the wire each request carries a
  ``req_id`` of this client's own (unique, so two requests the caller gave
  the same ``req_id`` are both followed); the callback sees the caller's.
  The rejected token is reported to the broker once however many requests
  it failed, and the request sent again with the token the broker answers:
  a subscription up to 3 times in a row, a trading request once (Kraken did
  not act on a request refused for its token) and only within
  ``resend_within`` seconds (default 5) of when it was first sent: an order
  is never placed minutes after the engine asked. The refusal reaches the
  callback when no retry is left (or the report failed, or the deadline
  passed); the retried request's answer does, under the same ``req_id``;
- it puts the token into the parameters it keeps and logs them at INFO when
  it resubscribes (and the token itself at DEBUG): requests are sent with a
  copy of their parameters, and a logging filter on its loggers replaces the
  last tokens this client has held with ``<redacted>`` (removed by
  ``close()``). The ``websockets`` library's own DEBUG log of every frame is
  not filtered: keep the ``websockets`` logger above DEBUG;
- ``close()`` ends a token fetch or report waiting out a broker outage and
  any request waiting to be sent again (the SDK's ``stop()`` would wait for
  them).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kraken.spot import SpotWSClient

from . import Broker, BrokerError, Token
from .aio import DEFAULT_BACKOFF_MAX, LOG, AsyncBroker, SingleFlight, patiently

__all__ = ["BrokerSpotWSClient", "DEFAULT_PATIENCE", "DEFAULT_RESEND_WITHIN"]

# The SDK opens its private connection only with a non-empty key and secret.
# These are not credentials: nothing signs with them (the REST client, which
# would, is never called).
_PLACEHOLDER = "kraken-token-broker"
# Kraken's answers to a request whose token it does not accept: an unknown,
# revoked or expired one, and none at all (as recorded from the live API).
_TOKEN_REJECTIONS = ("ESession:Invalid session", "Token(s) not found")
_SDK_LOGGERS = ("kraken.spot.websocket", "kraken.spot.websocket.connectors", "kraken.spot.ws_client")
# Reports of one subscription in a row before its error is handed on (a
# trading request is sent again once only).
_MAX_REPORTS = 3
# How long a token fetch or report waits out an unreachable or refusing
# broker before it raises (a Kraken outage of minutes is survived).
DEFAULT_PATIENCE = 900.0
# How long after a trading request was sent it may still be sent again (with
# a new token): past this its refusal is handed on instead.
DEFAULT_RESEND_WITHIN = 5.0
# Tokens the log filter redacts: the last few this client held (it logs only
# the one in use).
_REDACT_LAST = 8
# Own req_ids remembered to give the callback the caller's back.
_REQ_IDS_KEPT = 4096
# The SDK's private attribute holding the connection's URL (read after
# get_ws_token on every connect).
_ENDPOINT = "_ConnectSpotWebsocketBase__ws_endpoint"


def _rejects_token(error: object) -> bool:
    return any(r in str(error) for r in _TOKEN_REJECTIONS)


class _Redact(logging.Filter):
    """Replaces every token in `tokens` with <redacted> in a log record."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: collections.deque[str] = collections.deque(maxlen=_REDACT_LAST)

    def add(self, token: str) -> None:
        if token not in self.tokens:
            self.tokens.append(token)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.tokens:
            message = record.getMessage()
            redacted = message
            for token in self.tokens:
                redacted = redacted.replace(token, "<redacted>")
            if redacted != message:
                record.msg, record.args = redacted, ()
        return True


@dataclass
class _Sent:
    """A request that may have to be sent again: a subscription's
    parameters, or a whole trading message, without a token; the token it
    last went with (to report that one, not a newer one); and when (loop
    time) it was first sent."""

    subscribe: bool
    body: dict
    token: str
    sent_at: float


class BrokerSpotWSClient(SpotWSClient):
    """A ``SpotWSClient`` (private channels only, unless ``no_public=False``)
    whose token comes from the broker and is replaced when Kraken rejects it."""

    def __init__(
        self,
        broker: Broker | AsyncBroker,
        callback: Callable | None = None,
        *,
        no_public: bool = True,
        ws_url: str | None = None,
        patience: float = DEFAULT_PATIENCE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        resend_within: float = DEFAULT_RESEND_WITHIN,
        **kwargs: Any,
    ) -> None:
        self._broker = broker if isinstance(broker, AsyncBroker) else AsyncBroker.like(broker)
        self._patience = patience
        self._resend_within = resend_within
        self._backoff_max = backoff_max
        self._token: Token | None = None
        self._unused: Token | None = None  # fetched by start() for the first connect
        self._redact = _Redact()
        for name in _SDK_LOGGERS:
            logging.getLogger(name).addFilter(self._redact)
        # By the req_id sent (always this client's own): what to send again,
        # the reports made for it, and the caller's req_id.
        self._sent: dict[int, _Sent] = {}
        self._reports: dict[int, int] = {}
        self._callers: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._req_ids = itertools.count(1_000_001)
        self._flights = SingleFlight()
        self._tasks: set[asyncio.Task] = set()
        self._closing = asyncio.Event()
        self._user_callback = callback
        super().__init__(
            key=_PLACEHOLDER, secret=_PLACEHOLDER, callback=None, no_public=no_public, ws_url=ws_url, **kwargs
        )

    @property
    def token(self) -> Token | None:
        """The token in use (its ``repr`` hides the value); ``None`` before
        ``start()``."""
        return self._token

    def _use(self, token: Token) -> None:
        self._token = token
        self._redact.add(token.token)
        if self._priv_conn is not None:
            self._priv_conn.ws_conn_details = {"token": token.token, "expires": token.expires_in}
            setattr(self._priv_conn, _ENDPOINT, token.ws_url)

    async def _fetch(self) -> Token:
        token = await self._unless_closed(patiently(self._broker.fetch, self._patience, cap=self._backoff_max))
        self._use(token)
        return token

    async def _unless_closed(self, call: Awaitable[Token]) -> Token:
        """`call`, ended by ``close()`` (then raises ``ConnectionError``, which
        the SDK's reconnect loop takes as a failed connect)."""
        if self._closing.is_set():
            if asyncio.iscoroutine(call):
                call.close()
            raise ConnectionError("the client is closed")
        work = asyncio.ensure_future(call)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((work, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            raise ConnectionError("the client is closed")
        return work.result()

    async def close(self) -> None:
        """As the SDK's, and at once even while a token fetch or report
        waits out a broker outage: those end, requests waiting to be sent
        again are dropped, and the log filter is removed."""
        self._closing.set()
        self._flights.cancel()
        for task in list(self._tasks):
            task.cancel()
        try:
            # The SDK's receive loop sees keep_alive only between messages
            # (up to 10 s apart without a subscription): close its sockets.
            for conn in (self._priv_conn, self._pub_conn):
                if conn is not None:
                    conn.keep_alive = False
                    if conn.socket is not None:
                        await conn.socket.close()
            await super().close()
        finally:
            for name in _SDK_LOGGERS:
                logging.getLogger(name).removeFilter(self._redact)

    async def start(self) -> None:
        """As the SDK's, once the broker has answered a first token (waited
        for up to ``patience`` seconds; a refusal of this client's identity,
        401 or 403, raises ``BrokerError`` at once)."""
        if self._token is None:
            self._unused = await self._fetch()
        await super().start()

    async def get_ws_token(self) -> dict:
        """Called by the SDK on every (re)connect: the broker's current token."""
        if self._closing.is_set():
            raise ConnectionError("the client is closed")
        token, self._unused = self._unused, None
        if token is None:
            token = await self._fetch()
        return {"token": token.token, "expires": token.expires_in}

    async def _report(self, rejected: str) -> Token:
        """Reports `rejected` once, however many requests it failed; answers
        the token to use (the current one if `rejected` was replaced)."""
        if self._token is not None and self._token.token != rejected:
            return self._token

        async def report() -> Token:
            token = await patiently(
                lambda: self._broker.invalidate(rejected), self._patience, cap=self._backoff_max
            )
            self._use(token)
            return token

        return await self._flights.run(rejected, report)

    # -- requests that may be sent again ------------------------------------

    def _current(self) -> str:
        return self._token.token if self._token is not None else ""

    async def subscribe(self, params: dict, req_id: int | None = None) -> None:
        """As the SDK's, with a ``req_id`` always (to match an error reply)
        and a copy of ``params`` (the SDK would put the token into it)."""
        wire = self._wire_id(req_id)
        clean = {k: v for k, v in params.items() if k != "token"}
        self._sent[wire] = _Sent(subscribe=True, body=clean, token=self._current(), sent_at=self._now())
        await super().subscribe(params=copy.deepcopy(clean), req_id=wire)

    async def send_message(self, message: dict, *, raw: bool = False) -> None:
        """As the SDK's; a trading request (one of ``private_methods``) gets
        a ``req_id`` if it has none, and is remembered to be sent again if
        Kraken refuses its token."""
        if raw or message.get("method") not in self.private_methods:
            await super().send_message(message, raw=raw)
            return
        clean = copy.deepcopy(message)
        if isinstance(clean.get("params"), dict):
            clean["params"].pop("token", None)
        wire = clean["req_id"] = self._wire_id(clean.get("req_id"))
        self._sent[wire] = _Sent(subscribe=False, body=clean, token=self._current(), sent_at=self._now())
        await super().send_message(copy.deepcopy(clean))

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _wire_id(self, caller: Any) -> int:
        """A req_id of this client's own for a request; the caller's (or,
        if none, this one) is what the callback sees in the answers."""
        wire = next(self._req_ids)
        self._callers[wire] = wire if caller is None else caller
        while len(self._callers) > _REQ_IDS_KEPT:
            self._callers.popitem(last=False)
        return wire

    def _may_send_again(self, sent: _Sent) -> bool:
        return sent.subscribe or self._now() < sent.sent_at + self._resend_within

    async def _send_again(self, wire: int, sent: _Sent, refusal: dict) -> None:
        try:
            if sent.subscribe:
                token = await self._report(sent.token)
            else:
                left = sent.sent_at + self._resend_within - self._now()
                # The report goes on for the connection's sake (the flight is
                # shared); this request stops waiting for it at its deadline.
                token = await asyncio.wait_for(self._report(sent.token), max(left, 0.0))
                if not self._may_send_again(sent):
                    raise TimeoutError
            sent.token = token.token
            if sent.subscribe:
                await super().subscribe(params=copy.deepcopy(sent.body), req_id=wire)
            else:
                await super().send_message(copy.deepcopy(sent.body))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 (whatever failed, the caller must hear of the refusal)
            if isinstance(e, TimeoutError):
                why = f"not sent again: more than {self._resend_within:g} s since it was sent"
            elif isinstance(e, BrokerError):
                why = f"cannot replace the rejected token: {e}"
            else:
                why = f"sending it again failed: {type(e).__name__}: {e}"
            LOG.warning("kraken-token-broker: %s refused for its token; %s", refusal.get("method"), why)
            self._sent.pop(wire, None)
            self._reports.pop(wire, None)
            await self._deliver(refusal)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def on_message(self, message: dict | list) -> None:
        req_id = message.get("req_id") if isinstance(message, dict) else None
        sent = self._sent.get(req_id) if isinstance(req_id, int) else None
        if sent is not None and isinstance(message, dict):
            if message.get("success") is False and _rejects_token(message.get("error", "")):
                reports = self._reports.get(req_id, 0)
                if reports < (_MAX_REPORTS if sent.subscribe else 1) and self._may_send_again(sent):
                    self._reports[req_id] = reports + 1
                    # In a task: a report may wait out a broker outage, and
                    # the SDK's receive loop awaits this callback.
                    self._spawn(self._send_again(req_id, sent, message))
                    return
            # Answered for good (a reconnect subscribes again with a new req_id).
            self._sent.pop(req_id, None)
            self._reports.pop(req_id, None)
        await self._deliver(message)

    async def _deliver(self, message: dict | list) -> None:
        if isinstance(message, dict):
            req_id = message.get("req_id")
            if isinstance(req_id, int) and req_id in self._callers:
                message = {**message, "req_id": self._callers[req_id]}
        if self._user_callback is not None:
            await self._user_callback(message)

"""python-kraken-sdk's ``SpotWSClient`` through the broker's relay: the
engine holds no API key and no token, ever.

    from ktb_client import Broker
    from ktb_client.kraken_sdk_relay import RelaySpotWSClient

    client = RelaySpotWSClient(Broker("http://broker:8080", account="main"), callback=on_message)
    await client.start()
    await client.subscribe(params={"channel": "executions"})
    await client.send_message({"method": "add_order", "params": {...}})

The private connection goes to the broker's relay
(``ws://broker:8080/v1/relay?account=main``), which opens one to Kraken for
it and sets the token on every request that needs one. What it takes, found
in python-kraken-sdk 3.5's source (``kraken/spot/websocket/``):

- the SDK opens its private connection only when a key and a secret are
  given, so it is given placeholders, as the token mode does (never a key;
  the REST client, which would sign with them, is never called);
- the URL: the SDK appends ``/v2`` to ``auth_ws_url`` (which would land in
  the relay URL's query), so the private connection's endpoint is set to
  the relay URL instead, on the attribute the token mode sets too;
- the identity: the SDK opens the socket with ``websockets``' ``connect``
  and its own fixed ``User-Agent`` header, with no way to add one. This
  module wraps that ``connect`` (``kraken.spot.websocket.connectors.connect``)
  once: a call adds ``Authorization`` (read anew for each connection) and
  the broker's TLS context only when it is opening the relay URL of a
  ``RelaySpotWSClient``'s own private connection (marked in the connecting
  task by ``get_ws_token``, which the SDK awaits just before it connects).
  Any other connection, public or another client's, is passed through as it
  was: the credential never goes to Kraken;
- no token: ``get_ws_token`` (the SDK's one call of ``GetWebSocketsToken``,
  on every connect) asks nothing and answers no token, and requests are
  sent as given (the SDK's ``raw`` path, which skips only its token
  insertion; the request still goes to the private connection). The broker
  adds ``params.token``, and sends a request again once itself when Kraken
  refuses the token;
- the broker unreachable, or refusing the upgrade with 429 (``relay.max_connections``)
  or 5xx, is waited out inside the handshake for up to ``patience`` seconds
  with back-off (the SDK gives up for good after 7 failed connects in a
  row). A refusal of the identity (401, 403) or of the request (400) is
  raised as a ``BrokerError``: by ``start()`` at once, and later (a reload
  revoked this consumer: the relay closes with 1008, the reconnect is
  refused) by the SDK's reconnects until its ``MaxReconnectError``;
- ``close()`` ends a handshake waiting out a broker outage (the SDK's own
  ``stop()`` would wait for it).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

from kraken.spot import SpotWSClient
from kraken.spot.websocket import connectors
from websockets.exceptions import InvalidHandshake, InvalidStatus

from . import Broker, BrokerError, _refusal
from .aio import DEFAULT_BACKOFF_MAX, AsyncBroker, patiently

__all__ = ["RelaySpotWSClient", "DEFAULT_PATIENCE"]

# The SDK opens its private connection only with a non-empty key and secret.
# Not a credential: nothing signs with it.
_PLACEHOLDER = "kraken-token-broker"
# The SDK's private attribute holding a connection's URL.
_ENDPOINT = "_ConnectSpotWebsocketBase__ws_endpoint"
# How long a handshake waits out an unreachable or refusing (429, 5xx) broker.
DEFAULT_PATIENCE = 900.0

# The relay client whose private connection the current task is opening:
# set by get_ws_token, which the SDK awaits in the connecting task just
# before it calls connect (a task's context is its own, so clients and
# connections opening at once do not see each other's).
_OPENING: contextvars.ContextVar[RelaySpotWSClient | None] = contextvars.ContextVar("ktb_relay_opening", default=None)


def _connect(uri: str, **kwargs: Any) -> Any:
    """The SDK's ``connect``, or, for a relay client's own private
    connection, one that proves the client's identity to the broker."""
    client = _OPENING.get()
    if client is None or uri != client.relay_url:
        return _connect.sdk(uri, **kwargs)  # type: ignore[attr-defined]
    return _RelayHandshake(client, uri, kwargs)


if not hasattr(connectors.connect, "sdk"):  # once, however often this module is loaded
    _connect.sdk = connectors.connect  # type: ignore[attr-defined]
    connectors.connect = _connect
else:
    _connect.sdk = connectors.connect.sdk  # type: ignore[attr-defined]


class _RelayHandshake:
    """``async with`` as the SDK uses ``connect``: opens the relay (waiting
    out transient refusals), then closes it on the way out."""

    def __init__(self, client: RelaySpotWSClient, uri: str, kwargs: dict[str, Any]) -> None:
        self._client, self._uri, self._kwargs = client, uri, kwargs
        self._opened: Any = None

    async def __aenter__(self) -> Any:
        self._opened, socket = await self._client._open_relay(self._uri, self._kwargs)
        return socket

    async def __aexit__(self, *exc: object) -> Any:
        return await self._opened.__aexit__(*exc)


class RelaySpotWSClient(SpotWSClient):
    """A ``SpotWSClient`` (private channels only, unless ``no_public=False``)
    whose private connection is the broker's relay: no token in the engine."""

    def __init__(
        self,
        broker: Broker | AsyncBroker,
        callback: Callable | None = None,
        *,
        no_public: bool = True,
        ws_url: str | None = None,
        patience: float = DEFAULT_PATIENCE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        **kwargs: Any,
    ) -> None:
        self._broker = broker
        self._patience = patience
        self._backoff_max = backoff_max
        self._closing = asyncio.Event()
        self._starting: asyncio.Future | None = None  # set while start() waits: a refusal ends it
        super().__init__(
            key=_PLACEHOLDER, secret=_PLACEHOLDER, callback=callback, no_public=no_public, ws_url=ws_url, **kwargs
        )
        self.relay_url = broker.relay_url
        setattr(self._priv_conn, _ENDPOINT, self.relay_url)

    async def get_ws_token(self) -> dict:
        """Called by the SDK on every (re)connect, just before it connects:
        asks nothing (the broker holds the token) and marks the connecting
        task as this client's, for ``connect``."""
        if self._closing.is_set():
            raise ConnectionError("the client is closed")
        _OPENING.set(self)
        return {}

    async def _open_relay(self, uri: str, kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """Opens the relay with this client's identity; answers the
        ``connect`` object (to close it) and the socket."""
        ssl = self._broker.ssl_context

        async def attempt() -> tuple[Any, Any]:
            headers = dict(kwargs.get("additional_headers") or {})
            headers["Authorization"] = self._broker.relay_headers().get("Authorization", "")
            if not headers["Authorization"]:
                del headers["Authorization"]  # a client certificate proves it
            opening = _connect.sdk(  # type: ignore[attr-defined]
                uri, **{**kwargs, "additional_headers": headers, **({"ssl": ssl} if ssl is not None else {})}
            )
            try:
                return opening, await opening.__aenter__()
            except InvalidStatus as e:
                r = e.response
                raise _refusal(r.status_code, r.body or b"", r.headers.get("Retry-After")) from None
            except (OSError, TimeoutError, InvalidHandshake) as e:
                raise BrokerError(0, f"cannot open the relay at {self._where()}: {str(e) or type(e).__name__}") from None

        try:
            return await self._unless_closed(patiently(attempt, self._patience, cap=self._backoff_max))
        except BrokerError as e:
            if self._starting is not None and not self._starting.done():
                self._starting.set_exception(e)
            raise

    def _where(self) -> str:
        return self.relay_url.split("/v1/relay")[0]

    async def _unless_closed(self, call: Any) -> Any:
        """`call`, ended by ``close()`` (then raises ``ConnectionError``,
        which the SDK's reconnect loop takes as a failed connect)."""
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

    async def start(self) -> None:
        """As the SDK's, once the relay is open (a broker that is unreachable
        or answers 429/5xx is waited for, up to ``patience`` seconds). A
        refusal, or the patience run out, raises ``BrokerError``; ``close()``
        meanwhile ends it with ``ConnectionError``."""
        self._starting = asyncio.get_running_loop().create_future()
        starting = asyncio.ensure_future(super().start())
        try:
            await asyncio.wait((starting, self._starting), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not starting.done():
                starting.cancel()
        if starting.done() and not starting.cancelled():
            self._starting = None
            return starting.result()
        refusal = self._starting.exception()
        self._starting = None
        if not self._closing.is_set():
            await self.close()
        raise refusal

    async def send_message(self, message: dict, *, raw: bool = False) -> None:
        """As the SDK's, without a token: the request is sent as given (a
        trading request given no ``params`` gets empty ones); the broker
        sets ``params.token`` on its way to Kraken."""
        if isinstance(message, dict) and message.get("method") in self.private_methods and not message.get("params"):
            message = {**message, "params": {}}
        await super().send_message(message, raw=True)

    async def close(self) -> None:
        """As the SDK's, and at once even while a handshake waits out a
        broker outage."""
        self._closing.set()
        if self._starting is not None and not self._starting.done():
            self._starting.set_exception(ConnectionError("the client is closed"))
        # The SDK's receive loop sees keep_alive only between messages (up
        # to 10 s apart without a subscription): close its sockets.
        for conn in (self._priv_conn, self._pub_conn):
            if conn is not None:
                conn.keep_alive = False
                if conn.socket is not None:
                    await conn.socket.close()
        await super().close()

"""ccxt.pro's kraken through the broker's relay: private WebSocket channels
and WebSocket orders with no API key and no token in the engine.

    from ktb_client import Broker
    from ktb_client.ccxt_kraken_relay import RelayKraken

    exchange = RelayKraken(Broker("http://broker:8080", account="main"))
    balance = await exchange.watch_balance()
    order = await exchange.create_order_ws("BTC/USD", "limit", "buy", 0.01, 30000)

What it takes, found in ccxt 4.5's source (``ccxt/pro/kraken.py``,
``ccxt/async_support/base/exchange.py`` and ``ws/client.py``):

- the URL: every private call sends to ``urls['api']['ws']['privateV2']``,
  set to the relay's URL (``ws://broker:8080/v1/relay?account=main``);
- no token: every private call awaits ``authenticate()`` for a token (ccxt's
  calls ``privatePostGetWebSocketsToken`` with the key) and puts it into
  ``params.token``. Here ``authenticate()`` asks nothing and answers none,
  and ``watch``/``watch_multiple`` (through which every request goes) drop
  ``params.token`` from requests to the relay: the broker sets it, and
  sends a request again once itself when Kraken refuses the token. No API
  key is given, so any private REST call fails at once;
- the identity: ccxt opens a socket with the ``headers`` of its client's
  options (``options['ws']['options']['headers']``), which would go to every
  URL, Kraken's public one too. Here only the relay's client (created anew
  for each connection) gets ``Authorization`` (read anew each time), and,
  for an ``https://`` broker, its TLS context (the CA and the client
  certificate; ccxt's session would trust only the public CAs);
- ``ping``: ccxt sends Kraken's v1 ping (``{"event": "ping"}``) to any URL
  without ``v2`` in it, which the relay's URL has not: here the relay gets
  v2's ``{"method": "ping"}``;
- refusals: the broker refusing the upgrade is a ccxt error by status
  (401/403 ``AuthenticationError``, 429 ``RateLimitExceeded`` and 5xx
  ``ExchangeNotAvailable`` with ``retry_after``, else ``ExchangeError``); ccxt
  waits ``Retry-After`` before it dials again. A request outside the
  consumer's ``relay.allow`` (``EGeneral:Permission denied``) raises
  ``PermissionDenied``; a subscribe so refused (which ccxt alone would leave
  its watch waiting forever) fails the watches waiting on it.
"""

from __future__ import annotations

from typing import Any

import ccxt.pro
from aiohttp import WSServerHandshakeError
from ccxt.base.errors import (
    AuthenticationError,
    BaseError,
    ExchangeError,
    ExchangeNotAvailable,
    NetworkError,
    PermissionDenied,
    RateLimitExceeded,
)

from . import Broker
from .aio import AsyncBroker

__all__ = ["RelayKraken"]

# The broker's answer to a request outside the consumer's relay.allow.
_NOT_ALLOWED = "EGeneral:Permission denied"
# Subscribe requests remembered, by req_id, to fail their watches if refused.
_SUBSCRIBES_KEPT = 1024


class RelayKraken(ccxt.pro.kraken):
    """ccxt.pro's kraken with its private WebSocket through the broker's relay."""

    def __init__(self, broker: Broker | AsyncBroker, config: dict | None = None) -> None:
        super().__init__(config or {})
        self._broker = broker
        self.relay_url = broker.relay_url
        self.urls["api"]["ws"]["privateV2"] = self.relay_url
        self.exceptions = self.deep_extend(self.exceptions, {"ws": {"broad": {_NOT_ALLOWED: PermissionDenied}}})
        # req_id of a subscribe sent to the relay -> (its watches' message hashes, its subscribe hashes)
        self._subscribes: dict[str, tuple[list[str], list[str]]] = {}

    async def authenticate(self, params: dict = {}) -> None:  # noqa: B006 (ccxt's signature)
        """No token here: the broker sets it on the way to Kraken."""
        return None

    # -- requests to the relay go without a token ------------------------

    def _to_relay(self, url: str, message: Any, message_hashes: list, subscribe_hashes: list) -> Any:
        if url != self.relay_url or not isinstance(message, dict):
            return message
        if isinstance(message.get("params"), dict) and "token" in message["params"]:
            message = {**message, "params": {k: v for k, v in message["params"].items() if k != "token"}}
        if message.get("method") == "subscribe" and message.get("req_id") is not None:
            self._subscribes[str(message["req_id"])] = (
                [h for h in message_hashes if h is not None],
                [h for h in subscribe_hashes if h is not None],
            )
            while len(self._subscribes) > _SUBSCRIBES_KEPT:
                self._subscribes.pop(next(iter(self._subscribes)))
        return message

    def watch(self, url, message_hash, message=None, subscribe_hash=None, subscription=None):
        message = self._to_relay(url, message, [message_hash], [subscribe_hash])
        return super().watch(url, message_hash, message, subscribe_hash, subscription)

    def watch_multiple(self, url, message_hashes, message=None, subscribe_hashes=None, subscription=None):
        message = self._to_relay(url, message, list(message_hashes), list(subscribe_hashes or []))
        return super().watch_multiple(url, message_hashes, message, subscribe_hashes, subscription)

    def ping(self, client: Any) -> dict:
        if client.url == self.relay_url:
            return {"method": "ping"}
        return super().ping(client)

    # -- the relay's connection --------------------------------------------

    def client(self, url: str) -> Any:
        fresh = url not in (self.clients or {})
        client = super().client(url)
        if fresh and url == self.relay_url:
            self._dress(client)
        return client

    def _dress(self, client: Any) -> None:
        """Gives the relay's client (only) this engine's identity, and turns
        the broker's refusals of the upgrade into ccxt's errors."""
        headers = dict(client.options.get("headers") or {})
        authorization = self._broker.relay_headers().get("Authorization")
        if authorization:
            headers["Authorization"] = authorization
        client.options = {**client.options, "headers": headers}

        context = self._broker.ssl_context
        if context is not None:
            create_connection = client.create_connection
            client.create_connection = lambda session: create_connection(_WithSsl(session, context))

        on_error = client.on_error

        def on_refusal(error: Any) -> None:
            cause = error.args[0] if isinstance(error, NetworkError) and error.args else None
            if isinstance(cause, WSServerHandshakeError):
                error = self._refused(cause)
            on_error(error)

        client.on_error = on_refusal

    def _refused(self, error: WSServerHandshakeError) -> BaseError:
        status = error.status
        message = f"{self.id} kraken-token-broker relay refused the connection: HTTP {status} {error.message}"
        if status in (401, 403):
            return AuthenticationError(message)
        if status != 429 and status < 500:
            return ExchangeError(message)
        mapped: NetworkError = RateLimitExceeded(message) if status == 429 else ExchangeNotAvailable(message)
        retry_after = (error.headers or {}).get("Retry-After")
        mapped.retry_after = int(retry_after) if retry_after and retry_after.isdigit() else None  # type: ignore[attr-defined]
        return mapped

    def handle_error_message(self, client: Any, message: dict) -> bool:
        request = str(message.get("req_id")) if isinstance(message, dict) and message.get("req_id") is not None else None
        hashes = self._subscribes.pop(request, None) if request is not None else None
        if hashes is not None and message.get("error") and client.url == self.relay_url:
            # ccxt rejects only a future keyed by the req_id, which no watch waits on.
            error = message["error"]
            refusal = PermissionDenied(f"{self.id} {error}") if _NOT_ALLOWED in error else ExchangeError(f"{self.id} {error}")
            message_hashes, subscribe_hashes = hashes
            for key in subscribe_hashes:
                client.subscriptions.pop(key, None)
            for key in message_hashes:
                if key in client.futures:
                    client.reject(refusal, key)
        return super().handle_error_message(client, message)


class _WithSsl:
    """An aiohttp session whose ``ws_connect`` uses the broker's TLS
    context (ccxt's own call, with its own arguments, plus ``ssl``)."""

    def __init__(self, session: Any, context: Any) -> None:
        self._session, self._context = session, context

    @property
    def cookie_jar(self) -> Any:
        return self._session.cookie_jar

    def ws_connect(self, *args: Any, **kwargs: Any) -> Any:
        return self._session.ws_connect(*args, ssl=self._context, **kwargs)

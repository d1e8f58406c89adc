"""python-kraken-sdk's ``SpotWSClient`` with its WebSocket token from
kraken-token-broker: the engine holds no API key.

    from ktb_client import Broker
    from ktb_client.kraken_sdk import BrokerSpotWSClient

    client = BrokerSpotWSClient(Broker("http://broker:8080", account="main"), callback=on_message)
    await client.start()
    await client.subscribe(params={"channel": "executions"})

What it takes care of, found in python-kraken-sdk 3.5's source:

- its private connection opens only when a key and a secret are given, so it
  is given placeholders (never a key; the REST client is never used);
- it appends ``/v2`` to ``auth_ws_url``, while the broker's ``ws_url`` ends in
  ``/v2``: the suffix is taken off first;
- ``get_ws_token`` is what it calls on every (re)connect: here it asks the
  broker;
- error replies to a subscribe carry only the ``req_id``, and its own
  resubscription after a reconnect sends none: every subscribe gets a
  ``req_id`` here, remembered with its parameters, so an
  ``ESession:Invalid session`` can be matched to what to subscribe again;
  the rejected token is reported to the broker and the subscription sent
  again with the token the broker answers;
- it puts the token into the parameters it keeps and logs them at INFO when
  it resubscribes (and the token itself at DEBUG): subscriptions are sent
  with a copy of their parameters, and a logging filter on its loggers
  replaces every token this client has held with ``<redacted>``.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
from collections.abc import Callable
from typing import Any

from kraken.spot import SpotWSClient

from . import Broker, Token

__all__ = ["BrokerSpotWSClient"]

# The SDK opens its private connection only with a non-empty key and secret.
# These are not credentials: nothing signs with them (the REST client, which
# would, is never called).
_PLACEHOLDER = "kraken-token-broker"
_INVALID_SESSION = "ESession:Invalid session"
_SDK_LOGGERS = ("kraken.spot.websocket", "kraken.spot.websocket.connectors", "kraken.spot.ws_client")
# Reports of one subscription in a row before its error is handed on.
_MAX_REPORTS = 3


class _Redact(logging.Filter):
    """Replaces every token in `tokens` with <redacted> in a log record."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.tokens:
            message = record.getMessage()
            redacted = message
            for token in self.tokens:
                redacted = redacted.replace(token, "<redacted>")
            if redacted != message:
                record.msg, record.args = redacted, ()
        return True


class BrokerSpotWSClient(SpotWSClient):
    """A ``SpotWSClient`` (private channels only, unless ``no_public=False``)
    whose token comes from the broker and is replaced when Kraken rejects it."""

    def __init__(
        self,
        broker: Broker,
        callback: Callable | None = None,
        *,
        no_public: bool = True,
        ws_url: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._broker = broker
        self._token: Token = broker.fetch()
        self._redact = _Redact()
        self._redact.tokens.add(self._token.token)
        for name in _SDK_LOGGERS:
            logging.getLogger(name).addFilter(self._redact)
        self._requests: dict[int, dict] = {}
        self._reports: dict[int, int] = {}
        self._req_ids = itertools.count(1_000_001)
        self._user_callback = callback
        super().__init__(
            key=_PLACEHOLDER,
            secret=_PLACEHOLDER,
            callback=None,
            no_public=no_public,
            ws_url=ws_url,
            auth_ws_url=self._token.ws_url.removesuffix("/").removesuffix("/v2"),
            **kwargs,
        )

    @property
    def token(self) -> Token:
        """The token in use (its ``repr`` hides the value)."""
        return self._token

    def _use(self, token: Token) -> None:
        self._token = token
        self._redact.tokens.add(token.token)
        if self._priv_conn is not None:
            self._priv_conn.ws_conn_details = {"token": token.token, "expires": token.expires_in}

    async def get_ws_token(self) -> dict:
        """Called by the SDK on every (re)connect: the broker's current token."""
        token = await asyncio.to_thread(self._broker.fetch)
        self._use(token)
        return {"token": token.token, "expires": token.expires_in}

    async def subscribe(self, params: dict, req_id: int | None = None) -> None:
        """As the SDK's, with a ``req_id`` always (to match an error reply)
        and a copy of ``params`` (the SDK would put the token into it)."""
        if req_id is None:
            req_id = next(self._req_ids)
        clean = {k: v for k, v in params.items() if k != "token"}
        self._requests[req_id] = clean
        await super().subscribe(params=copy.deepcopy(clean), req_id=req_id)

    async def on_message(self, message: dict | list) -> None:
        if (
            isinstance(message, dict)
            and message.get("method") == "subscribe"
            and message.get("success") is False
            and _INVALID_SESSION in str(message.get("error", ""))
        ):
            req_id = message.get("req_id")
            params = self._requests.get(req_id) if isinstance(req_id, int) else None
            reports = self._reports.get(req_id, 0) if isinstance(req_id, int) else _MAX_REPORTS
            if params is not None and reports < _MAX_REPORTS:
                self._reports[req_id] = reports + 1
                rejected = self._token
                fresh = await asyncio.to_thread(self._broker.invalidate, rejected)
                self._use(fresh)
                await self.subscribe(params=params)
                return
        elif isinstance(message, dict) and message.get("method") == "subscribe" and message.get("success"):
            req_id = message.get("req_id")
            if isinstance(req_id, int):
                self._reports.pop(req_id, None)
        if self._user_callback is not None:
            await self._user_callback(message)

"""ccxt's ``kraken`` (ccxt.pro, WebSocket v2) with its WebSocket token from
kraken-token-broker: the engine holds no API key.

    from ktb_client import Broker
    from ktb_client.ccxt_kraken import BrokerKraken

    exchange = BrokerKraken(Broker("http://broker:8080", account="main"))
    trades = await exchange.watch_my_trades()
    balance = await exchange.watch_balance()

What it takes care of, found in ccxt 4.5's source:

- ``authenticate()`` is what every private watch calls for a token (it would
  call ``privatePostGetWebSocketsToken`` with the key): here it asks the
  broker, and the private URLs point where the broker says (``ws_url``);
- a subscribe refused with ``ESession:Invalid session`` rejects only a
  future keyed by its ``req_id``, which no watch waits on, so the watch
  would hang: here the refusal wakes every private watch with an
  ``AuthenticationError``, drops the cached subscription, and the watch is
  tried again once the rejected token is reported to the broker (which
  answers the replacement).
"""

from __future__ import annotations

import asyncio
from typing import Any

import ccxt.pro
from ccxt.base.errors import AuthenticationError

from . import Broker, Token

__all__ = ["BrokerKraken"]

_INVALID_SESSION = "ESession:Invalid session"
_PRIVATE_HASHES = ("myTrades", "orders", "balances", "executions")
# Reports in a row before the refusal is handed to the caller.
_MAX_REPORTS = 3


class BrokerKraken(ccxt.pro.kraken):
    """ccxt.pro's kraken with private WebSocket channels through the broker."""

    def __init__(self, broker: Broker, config: dict | None = None) -> None:
        super().__init__(config or {})
        self._broker = broker
        self._token: Token = broker.fetch()
        ws = self.urls["api"]["ws"]
        ws["privateV2"] = self._token.ws_url
        ws["private"] = self._token.ws_url.removesuffix("/").removesuffix("/v2")

    @property
    def token(self) -> Token:
        """The token in use (its ``repr`` hides the value)."""
        return self._token

    async def authenticate(self, params: dict = {}) -> str:  # noqa: B006 (ccxt's signature)
        token = await asyncio.to_thread(self._broker.fetch)
        self._token = token
        return token.token

    def handle_error_message(self, client: Any, message: dict) -> bool:
        error = message.get("error") if isinstance(message, dict) else None
        if error and _INVALID_SESSION in str(error) and message.get("method") == "subscribe":
            refusal = AuthenticationError(f"{self.id} {error}")
            for key in list(client.subscriptions):
                if key in _PRIVATE_HASHES or key.split(":")[0] in _PRIVATE_HASHES:
                    del client.subscriptions[key]
            for key in list(client.futures):
                if key in _PRIVATE_HASHES or str(key).split(":")[0] in _PRIVATE_HASHES:
                    client.reject(refusal, key)
            return False
        return super().handle_error_message(client, message)

    async def _reporting(self, watch):
        for attempt in range(_MAX_REPORTS + 1):
            try:
                return await watch()
            except AuthenticationError as e:
                if _INVALID_SESSION not in str(e) or attempt == _MAX_REPORTS:
                    raise
                rejected = self._token
                self._token = await asyncio.to_thread(self._broker.invalidate, rejected)
        raise AssertionError("unreachable")

    async def watch_private(self, name: str, symbol=None, since=None, limit=None, params: dict = {}):  # noqa: B006
        return await self._reporting(lambda: super(BrokerKraken, self).watch_private(name, symbol, since, limit, params))

    async def watch_balance(self, params: dict = {}):  # noqa: B006
        return await self._reporting(lambda: super(BrokerKraken, self).watch_balance(params))

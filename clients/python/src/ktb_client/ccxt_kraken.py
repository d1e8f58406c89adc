"""ccxt's ``kraken`` (ccxt.pro, WebSocket v2) with its WebSocket token from
kraken-token-broker: the engine holds no API key.

    from ktb_client import Broker
    from ktb_client.ccxt_kraken import BrokerKraken

    exchange = BrokerKraken(Broker("http://broker:8080", account="main"))
    trades = await exchange.watch_my_trades()
    balance = await exchange.watch_balance()
    order = await exchange.create_order_ws("BTC/USD", "limit", "buy", 0.01, 30000)

What it takes care of, found in ccxt 4.5's source:

- ``authenticate()`` is what every private watch and every WebSocket order
  call awaits for a token (ccxt's own calls ``privatePostGetWebSocketsToken``
  with the key, and caches the answer on a client object for 900 s): here
  the token comes from the broker and is kept per private connection (ccxt's
  ``Client`` for the private URL, replaced by a new one when the connection
  closes). The broker is asked again only for a new connection, after Kraken
  rejected the token, or when less than ``renew_before`` seconds are left to
  its use-by (asking for a token with ``min_ttl`` more than that, so one
  answer lasts); concurrent callers share one request. The use-by limits
  only opening a connection (Kraken: the token "does not expire once a
  successful WebSockets connection and private subscription has been made"),
  so while the connection is open its token is used on and the renewal runs
  in the background: a broker outage never fails a call on a working
  connection (a failed renewal is tried again after 5 s, or the broker's
  ``Retry-After``). Only Kraken refusing the token forces a report. The
  private URLs point where the broker says (``ws_url``). Nothing is fetched
  at construction, and nothing fetched after ``close()`` opens a connection;
- the broker's refusals become ccxt's errors, so watch loops that catch
  ccxt errors keep working: unreachable, 429 and 5xx are ``NetworkError``
  (``RateLimitExceeded`` for 429, else ``ExchangeNotAvailable``; with a
  ``retry_after`` attribute, and the broker is not asked again before it has
  passed: calls meanwhile fail at once with the same class), 401 and 403
  ``AuthenticationError`` (permanent: fix the identity), others
  ``ExchangeError``. With ``patience=`` (seconds; default 0) transient
  refusals are first waited out as ``AsyncBroker.fetch(patience=)`` does;
- a subscribe refused with ``ESession:Invalid session`` rejects only a
  future keyed by its ``req_id``, which no watch waits on, so the watch
  would hang: here the refusal wakes every private watch with an
  ``AuthenticationError``, drops the cached subscription, and the watch is
  tried again once the rejected token is reported to the broker (which
  answers the replacement);
- an order call (``create_order_ws``, ``edit_order_ws``, ``cancel_order_ws``,
  ``cancel_orders_ws``, ``cancel_all_orders_ws``) refused with
  ``ESession:Invalid session`` or ``Token(s) not found`` reports the token
  and is sent once more with the replacement (Kraken did not act on a
  request it refused for its token); a second refusal is raised.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any

import ccxt.pro
from ccxt.base.errors import (
    AuthenticationError,
    BaseError,
    ExchangeClosedByUser,
    ExchangeError,
    ExchangeNotAvailable,
    NetworkError,
    RateLimitExceeded,
)

from . import Broker, BrokerError, Token
from .aio import LOG, AsyncBroker, SingleFlight, patiently

__all__ = ["BrokerKraken", "DEFAULT_RENEW_BEFORE"]

# Kraken's answers to a request whose token it does not accept: an unknown,
# revoked or expired one, and none at all (as recorded from the live API).
_TOKEN_REJECTIONS = ("ESession:Invalid session", "Token(s) not found")
_PRIVATE_HASHES = ("myTrades", "orders", "balances", "executions")
# Reports in a row before a watch's refusal is handed to the caller.
_MAX_REPORTS = 3
# Ask the broker again when a connection's token has less than this left to
# its use-by (a token is checked when a request carries it).
DEFAULT_RENEW_BEFORE = 30.0
# After a background renewal failed, not again before this (or Retry-After).
_RENEW_RETRY = 5.0


def _rejects_token(error: object) -> bool:
    return any(r in str(error) for r in _TOKEN_REJECTIONS)


@dataclass(frozen=True)
class _Held:
    """A connection's token and when (monotonic) its use-by passes."""

    token: Token
    use_by: float


class BrokerKraken(ccxt.pro.kraken):
    """ccxt.pro's kraken with private WebSocket channels through the broker."""

    def __init__(
        self,
        broker: Broker | AsyncBroker,
        config: dict | None = None,
        *,
        renew_before: float = DEFAULT_RENEW_BEFORE,
        patience: float = 0.0,
    ) -> None:
        super().__init__(config or {})
        self._broker = broker if isinstance(broker, AsyncBroker) else AsyncBroker.like(broker)
        self._renew_before = renew_before
        self._patience = patience  # 0: a refusal is raised at once, for the caller's own retry loop
        # The token of each private connection (ccxt's Client), gone with it.
        self._held: weakref.WeakKeyDictionary[Any, _Held] = weakref.WeakKeyDictionary()
        self._token: Token | None = None
        self._ws_url: str | None = None
        self._quiet_until = 0.0  # monotonic: the broker's Retry-After not yet passed
        self._quiet_error: NetworkError | None = None
        self._flights = SingleFlight()
        self._renewals: set[asyncio.Task] = set()
        self._renew_not_before = 0.0  # monotonic: after a failed background renewal
        self._epoch = 0  # close() counts up: an answer asked for before then is not kept

    @property
    def token(self) -> Token | None:
        """The token last used (its ``repr`` hides the value); ``None``
        before the first private call."""
        return self._token

    # -- the token of a connection ----------------------------------------

    def _private_client(self, create: bool) -> Any | None:
        if self._ws_url is None:
            return None
        if create:
            return self.client(self._ws_url)
        return (self.clients or {}).get(self._ws_url)

    def _keep(self, token: Token, epoch: int) -> None:
        """Uses `token` for the current (or next) private connection; asked
        for before a ``close()`` (`epoch` passed), it is dropped instead."""
        if epoch != self._epoch:
            raise ExchangeClosedByUser(f"{self.id} closed while asking kraken-token-broker")
        if token.ws_url != self._ws_url:
            ws = self.urls["api"]["ws"]
            ws["privateV2"] = token.ws_url
            ws["private"] = token.ws_url.removesuffix("/").removesuffix("/v2")
            self._ws_url = token.ws_url
        self._token = token
        self._held[self._private_client(create=True)] = _Held(token, time.monotonic() + token.expires_in)

    async def authenticate(self, params: dict = {}) -> str:  # noqa: B006 (ccxt's signature)
        client = self._private_client(create=False)
        held = self._held.get(client) if client is not None else None
        if held is not None:
            if held.use_by - time.monotonic() > self._renew_before:
                self._token = held.token
                return held.token.token
            if not client.closed():
                # The open connection goes on with its token; renew aside.
                self._renew_later(client)
                self._token = held.token
                return held.token.token
        token = await self._flight(("fetch", id(client)), self._fetch)
        return token.token

    async def _fetch(self) -> Token:
        epoch = self._epoch
        min_ttl = math.ceil(self._renew_before) + 1
        token = await self._ask(lambda: self._broker.fetch(min_ttl=min_ttl))
        self._keep(token, epoch)
        return token

    def _renew_later(self, client: Any) -> None:
        now = time.monotonic()
        if now < max(self._renew_not_before, self._quiet_until) or self._renewals:
            return

        async def renew() -> None:
            try:
                await self._flight(("fetch", id(client)), self._fetch)
            except ExchangeClosedByUser:
                pass
            except BaseError as e:
                retry_after = getattr(e, "retry_after", None) or 0
                self._renew_not_before = time.monotonic() + max(_RENEW_RETRY, retry_after)
                LOG.warning("kraken-token-broker: cannot renew the token of an open connection (kept): %s", e)

        task = asyncio.ensure_future(renew())
        self._renewals.add(task)
        task.add_done_callback(self._renewals.discard)

    async def close(self, *args: Any, **kwargs: Any) -> None:
        """As ccxt's; broker requests under way are ended first, so none
        opens a connection (or session) after this."""
        self._epoch += 1
        self._flights.cancel()
        for task in list(self._renewals):
            task.cancel()
        await super().close(*args, **kwargs)

    async def _report(self, rejected: Token) -> Token:
        """Reports `rejected` once, however many calls it failed; answers
        the token to use (already the replacement if another call reported)."""
        client = self._private_client(create=False)
        held = self._held.get(client) if client is not None else None
        if held is not None and held.token.token != rejected.token:
            return held.token

        async def report() -> Token:
            epoch = self._epoch
            token = await self._ask(lambda: self._broker.invalidate(rejected))
            self._keep(token, epoch)
            return token

        return await self._flight(("report", rejected.token), report)

    async def _flight(self, key: object, call) -> Token:
        """A shared broker request; one ended by ``close()`` raises
        ``ExchangeClosedByUser`` in its waiters (not a cancellation of theirs)."""
        epoch = self._epoch
        try:
            return await self._flights.run(key, call)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if epoch != self._epoch and task is not None and not task.cancelling():
                raise ExchangeClosedByUser(f"{self.id} closed while asking kraken-token-broker") from None
            raise

    async def _ask(self, call) -> Token:
        """One request to the broker, its refusal as a ccxt error."""
        now = time.monotonic()
        if now < self._quiet_until and self._quiet_error is not None:
            error = type(self._quiet_error)(f"{self._quiet_error} (asking again in {self._quiet_until - now:.0f} s)")
            error.retry_after = self._quiet_error.retry_after  # type: ignore[attr-defined]
            raise error
        try:
            return await patiently(call, self._patience)
        except BrokerError as e:
            raise self._ccxt_error(e) from None

    def _ccxt_error(self, error: BrokerError) -> BaseError:
        message = f"{self.id} kraken-token-broker: {error}"
        if error.permanent:
            return AuthenticationError(message)
        if not error.transient:
            return ExchangeError(message)
        mapped: NetworkError = RateLimitExceeded(message) if error.status == 429 else ExchangeNotAvailable(message)
        mapped.retry_after = error.retry_after  # type: ignore[attr-defined]
        if error.retry_after:
            self._quiet_until = time.monotonic() + error.retry_after
            self._quiet_error = mapped
        return mapped

    # -- Kraken's refusals of a token --------------------------------------

    def handle_error_message(self, client: Any, message: dict) -> bool:
        error = message.get("error") if isinstance(message, dict) else None
        if error and _rejects_token(error) and message.get("method") == "subscribe":
            refusal = AuthenticationError(f"{self.id} {error}")
            for key in list(client.subscriptions):
                if key in _PRIVATE_HASHES or key.split(":")[0] in _PRIVATE_HASHES:
                    del client.subscriptions[key]
            for key in list(client.futures):
                if key in _PRIVATE_HASHES or str(key).split(":")[0] in _PRIVATE_HASHES:
                    client.reject(refusal, key)
            return False
        return super().handle_error_message(client, message)

    async def _used(self) -> Token:
        """The token the next private request will carry."""
        await self.authenticate()
        assert self._token is not None  # authenticate() set it or raised
        return self._token

    async def _watching(self, watch):
        for attempt in range(_MAX_REPORTS + 1):
            used = await self._used()
            try:
                return await watch()
            except AuthenticationError as e:
                if not _rejects_token(e) or attempt == _MAX_REPORTS:
                    raise
                await self._report(used)
        raise AssertionError("unreachable")

    async def _trading(self, request):
        """An order call, sent once more with a new token if Kraken refused
        the token (a refused request was not acted on)."""
        used = await self._used()
        try:
            return await request()
        except BaseError as e:
            if not _rejects_token(e):
                raise
        await self._report(used)
        return await request()

    async def watch_private(self, name: str, symbol=None, since=None, limit=None, params: dict = {}):  # noqa: B006
        return await self._watching(lambda: super(BrokerKraken, self).watch_private(name, symbol, since, limit, params))

    async def watch_balance(self, params: dict = {}):  # noqa: B006
        return await self._watching(lambda: super(BrokerKraken, self).watch_balance(params))

    async def create_order_ws(self, symbol, type, side, amount, price=None, params: dict = {}):  # noqa: A002, B006
        return await self._trading(
            lambda: super(BrokerKraken, self).create_order_ws(symbol, type, side, amount, price, params)
        )

    async def edit_order_ws(self, id, symbol, type, side, amount=None, price=None, params: dict = {}):  # noqa: A002, B006
        return await self._trading(
            lambda: super(BrokerKraken, self).edit_order_ws(id, symbol, type, side, amount, price, params)
        )

    async def cancel_order_ws(self, id, symbol=None, params: dict = {}):  # noqa: A002, B006
        return await self._trading(lambda: super(BrokerKraken, self).cancel_order_ws(id, symbol, params))

    async def cancel_orders_ws(self, ids, symbol=None, params: dict = {}):  # noqa: B006
        return await self._trading(lambda: super(BrokerKraken, self).cancel_orders_ws(ids, symbol, params))

    async def cancel_all_orders_ws(self, symbol=None, params: dict = {}):  # noqa: B006
        return await self._trading(lambda: super(BrokerKraken, self).cancel_all_orders_ws(symbol, params))

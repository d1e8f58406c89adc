"""A client of kraken-token-broker: Kraken WebSocket tokens for an engine
that never holds the API key.

    broker = Broker("http://broker:8080", account="main")   # credential from KTB_CONSUMER_CREDENTIAL
    token = broker.fetch()            # Token(token=<redacted>, expires_in=812, ...)
    token = broker.invalidate(token)  # after Kraken answered ESession:Invalid session
    for event in broker.watch():      # a Token, or an Unavailable, as the broker holds them
        ...

In an asyncio program use ``AsyncBroker`` (``ktb_client.aio``): the same
calls, awaited, and ``async for event in broker.watch()``, none of which
blocks the event loop.

The identity is one of: a credential (``credential=`` or the
``KTB_CONSUMER_CREDENTIAL`` variable), a projected ServiceAccount token file
(``token_file=``, re-read on every request), or a client certificate
(``cert_file=``/``key_file=``). ``ca_file=`` trusts the CA of an ``https://``
broker. Standard library only.

Providers for libraries engines already use: ``ktb_client.kraken_sdk``
(python-kraken-sdk) and ``ktb_client.ccxt_kraken`` (ccxt). Their relay
modes, ``ktb_client.kraken_sdk_relay`` and ``ktb_client.ccxt_kraken_relay``,
trade through the broker's relay (``Broker.relay_url``) and never hold a
token at all.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["AsyncBroker", "Broker", "BrokerError", "Token", "Unavailable", "CREDENTIAL_ENV"]

CREDENTIAL_ENV = "KTB_CONSUMER_CREDENTIAL"


@dataclass(frozen=True)
class Token:
    """A token as the broker hands it out. ``repr`` never shows the token."""

    token: str = field(repr=False)
    account: str
    issued_at: str
    expires_at: str
    expires_in: int
    ws_url: str

    @classmethod
    def from_json(cls, data: dict) -> Token:
        return cls(
            token=str(data["token"]),
            account=str(data["account"]),
            issued_at=str(data["issued_at"]),
            expires_at=str(data["expires_at"]),
            expires_in=int(data["expires_in"]),
            ws_url=str(data["ws_url"]),
        )

    def __str__(self) -> str:
        return f"Token(account={self.account}, expires_at={self.expires_at})"


@dataclass(frozen=True)
class Unavailable:
    """The broker has no token good enough now (a watch stream's event)."""

    detail: str


class BrokerError(Exception):
    """The broker refused or could not answer: ``status`` (0 if it could not
    be reached), its ``detail``, and ``retry_after`` seconds when it said."""

    def __init__(self, status: int, detail: str, retry_after: int | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after

    @property
    def permanent(self) -> bool:
        """401 or 403: retrying will not help until the identity is fixed."""
        return self.status in (401, 403)

    @property
    def transient(self) -> bool:
        """Unreachable (0), 429 or 5xx: asking again later may succeed
        (after ``retry_after`` seconds when the broker said)."""
        return self.status == 0 or self.status == 429 or self.status >= 500


class Broker:
    """One broker, one account (``account=None``: the consumer's only one)."""

    def __init__(
        self,
        url: str,
        account: str | None = None,
        *,
        credential: str | None = None,
        token_file: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(url.rstrip("/").removesuffix("/v1/token"))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        self._scheme = parsed.scheme
        self._host = parsed.hostname
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._prefix = parsed.path
        self.account = account
        self._timeout = timeout
        self._token_file = token_file
        self._credential = credential if credential is not None else os.environ.get(CREDENTIAL_ENV)
        if self._token_file is None and not self._credential and cert_file is None:
            raise ValueError(f"give an identity: credential=, {CREDENTIAL_ENV}, token_file=, or cert_file=/key_file=")
        self._ssl: ssl.SSLContext | None = None
        if parsed.scheme == "https":
            self._ssl = ssl.create_default_context(cafile=ca_file)
            if cert_file is not None:
                self._ssl.load_cert_chain(cert_file, key_file)

    def __repr__(self) -> str:
        return f"Broker({self._scheme}://{self._host}:{self._port}, account={self.account!r})"

    # -- the relay -------------------------------------------------------

    @property
    def relay_url(self) -> str:
        """The broker's relay, ``ws(s)://HOST:PORT/v1/relay?account=NAME``:
        a WebSocket that speaks Kraken's v2 API without tokens (the broker
        adds them). Open it with ``relay_headers()`` and ``ssl_context``."""
        scheme = "wss" if self._scheme == "https" else "ws"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self._port}" + self._path("/v1/relay")

    def relay_headers(self) -> dict[str, str]:
        """The headers that prove this client's identity when it opens the
        relay: ``Authorization`` (none with a client certificate), read anew
        each time (a projected token file rotates)."""
        headers = self._headers()
        headers.pop("Accept", None)
        return headers

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """For an ``https://`` broker: the TLS context that trusts its CA and
        holds the client certificate, if any (for ``wss://`` too)."""
        return self._ssl

    # -- requests --------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        # The token file is read on every request, synchronously (also on
        # AsyncBroker's event loop): a projected ServiceAccount token is a
        # file of about a kilobyte on a tmpfs, read once per fetch or report
        # (not per Kraken message), so this is a microsecond-scale read.
        headers = {"Accept": "application/json", "User-Agent": "ktb-client-python/0.1"}
        bearer = self._credential
        if self._token_file is not None:
            with open(self._token_file, encoding="utf-8") as f:
                bearer = f.read().strip()
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        return headers

    def _path(self, path: str, **query: str | int | None) -> str:
        params = {"account": self.account, **query}
        qs = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        return f"{self._prefix}{path}" + (f"?{qs}" if qs else "")

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._ssl is not None:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _request(self, method: str, path: str, body: bytes | None = None) -> dict:
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn = self._connection(self._timeout)
        try:
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as e:
                raise BrokerError(0, f"cannot reach the broker at {self._host}:{self._port}: "
                                     f"{str(e) or type(e).__name__}") from None
            if response.status != 200:
                raise _refusal(response.status, data, response.getheader("Retry-After"))
            try:
                answer = json.loads(data)
                Token.from_json(answer)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise BrokerError(0, f"a malformed answer from the broker at {self._host}:{self._port}: "
                                     f"{str(e) or type(e).__name__}") from None
            return answer
        finally:
            conn.close()

    def fetch(self, min_ttl: int | None = None) -> Token:
        """A token with at least ``min_ttl`` seconds left to open a connection."""
        return Token.from_json(self._request("GET", self._path("/v1/token", min_ttl=min_ttl)))

    def invalidate(self, token: Token | str) -> Token:
        """Reports a token Kraken rejected (``ESession:Invalid session``);
        answers the token to use instead."""
        value = token.token if isinstance(token, Token) else token
        body = json.dumps({"token": value}).encode()
        return Token.from_json(self._request("POST", self._path("/v1/token/invalidate"), body))

    def watch(self, idle_timeout: float = 45.0) -> Iterator[Token | Unavailable]:
        """The account's tokens as the broker holds them: the current one at
        once, then each new one; ``Unavailable`` while it has none. Ends when
        the broker ends the stream (reconnect with back-off); raises
        ``BrokerError`` on a refusal, ``TimeoutError`` after ``idle_timeout``
        seconds without a byte (the broker sends a keep-alive every 15 s)."""
        conn = self._connection(idle_timeout)
        try:
            headers = self._headers()
            headers["Accept"] = "text/event-stream"
            try:
                conn.request("GET", self._path("/v1/token/watch"), headers=headers)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                raise BrokerError(0, f"cannot reach the broker at {self._host}:{self._port}: {e}") from None
            if response.status != 200:
                raise _refusal(response.status, response.read(), response.getheader("Retry-After"))
            events = _SseParser()
            while True:
                line = response.readline()
                if not line:
                    return
                event = events.feed(line)
                if event is not None:
                    yield event
        finally:
            conn.close()


class _SseParser:
    """The broker's watch stream (Server-Sent Events), one line at a time:
    ``feed`` answers a ``Token`` or ``Unavailable`` when a line completes one,
    else ``None``. Comment lines (keep-alives) and other events are skipped.
    Shared by ``Broker.watch`` and ``AsyncBroker.watch``."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: bytes) -> Token | Unavailable | None:
        text = line.decode("utf-8").rstrip("\r\n")
        if text == "":
            event, data = self._event, self._data
            self._event, self._data = "message", []
            if data:
                payload = "\n".join(data)
                if event == "token":
                    return Token.from_json(json.loads(payload))
                if event == "unavailable":
                    return Unavailable(detail=json.loads(payload).get("detail", ""))
        elif text.startswith(":"):
            pass
        elif text.startswith("event:"):
            self._event = text[6:].strip()
        elif text.startswith("data:"):
            self._data.append(text[5:].removeprefix(" "))
        return None


def _refusal(status: int, data: bytes, retry_after: str | None) -> BrokerError:
    try:
        detail = json.loads(data).get("detail") or ""
    except (ValueError, AttributeError):
        detail = ""
    seconds = int(retry_after) if retry_after and retry_after.isdigit() else None
    return BrokerError(status, detail or http.client.responses.get(status, "error"), seconds)


# Last: the asyncio client builds on the names above.
from .aio import AsyncBroker  # noqa: E402

"""The relay modes against stand-ins (no broker needed): the relay's URL and
headers; the credential goes to the relay's connection only, never to
Kraken's public one; no request carries a token; no token is asked for."""

from __future__ import annotations

import asyncio

import pytest

from ktb_client import AsyncBroker, Broker
from net_helpers import MARKETS, until
from relay_helpers import FakeRelay


def test_the_relay_url_and_headers_follow_the_broker_url():
    broker = Broker("http://broker.example:8080/", account="main", credential="c")
    assert broker.relay_url == "ws://broker.example:8080/v1/relay?account=main"
    assert broker.relay_headers()["Authorization"] == "Bearer c"
    assert "Accept" not in broker.relay_headers()
    assert broker.ssl_context is None
    assert Broker("https://b:8443/ktb", credential="c").relay_url == "wss://b:8443/ktb/v1/relay"
    assert Broker("http://[::1]:80", account="a b", credential="c").relay_url == "ws://[::1]:80/v1/relay?account=a+b"
    wrapped = AsyncBroker.like(broker)
    assert wrapped.relay_url == broker.relay_url and wrapped.relay_headers() == broker.relay_headers()


def _broker(fake: FakeRelay) -> Broker:
    return Broker(fake.url.replace("ws://", "http://"), account="main", credential="relay-credential")


def test_the_sdk_relay_client_sends_its_credential_to_the_relay_only_and_no_token():
    pytest.importorskip("kraken.spot")
    from ktb_client.kraken_sdk_relay import RelaySpotWSClient

    seen: list[dict] = []

    async def on_message(message) -> None:
        if isinstance(message, dict):
            seen.append(message)

    async def main() -> None:
        async with FakeRelay() as relay, FakeRelay() as public:
            client = RelaySpotWSClient(_broker(relay), callback=on_message, no_public=False, ws_url=public.url)
            await client.start()
            try:
                await client.subscribe(params={"channel": "executions"})
                await client.send_message({"method": "add_order", "params": {"symbol": "BTC/USD", "side": "buy",
                                                                             "order_type": "market", "order_qty": 1}})
                await client.send_message({"method": "cancel_all"})
                await client.subscribe(params={"channel": "ticker", "symbol": ["BTC/USD"]})
                await until("the answers", 10, lambda: len([m for m in seen if m.get("success")]) >= 4)
            finally:
                await client.close()
            assert relay.requests[0][0] == "/v1/relay?account=main"
            assert relay.headers("Authorization") == ["Bearer relay-credential"]
            assert public.headers("Authorization") == [None], "Kraken's public endpoint never gets the credential"
            assert public.requests[0][0] == "/v2"
            private = [m for m in relay.messages if m.get("method") != "ping"]
            assert [m["method"] for m in private] == ["subscribe", "add_order", "cancel_all"]
            assert all("token" not in m.get("params", {}) for m in relay.messages), "no token on the wire"
            assert private[2]["params"] == {}, "a trading request without params gets empty ones"
            assert [m["params"]["channel"] for m in public.messages if m.get("method") == "subscribe"] == ["ticker"]

    asyncio.run(main())


def test_the_sdk_relay_client_never_asks_for_a_token():
    pytest.importorskip("kraken.spot")
    from ktb_client.kraken_sdk_relay import RelaySpotWSClient

    async def main() -> None:
        async with FakeRelay() as relay:
            client = RelaySpotWSClient(_broker(relay))

            async def no_rest(*args, **kwargs):
                raise AssertionError(f"a REST call: {args}")

            client.request = no_rest  # the SDK's GetWebSocketsToken goes through request()
            await client.start()
            try:
                assert await client.get_ws_token() == {}
                assert client._priv_conn.ws_conn_details == {}
            finally:
                await client.close()

    asyncio.run(main())


def test_the_ccxt_relay_exchange_sends_its_credential_to_the_relay_only_and_no_token():
    pytest.importorskip("ccxt.pro")
    from ktb_client.ccxt_kraken_relay import RelayKraken

    async def main() -> None:
        async with FakeRelay() as relay, FakeRelay() as public:
            exchange = RelayKraken(_broker(relay), {"enableRateLimit": False})
            exchange.set_markets(MARKETS)
            exchange.urls["api"]["ws"]["publicV2"] = public.url + "/v2"
            try:
                balance = await exchange.watch_balance()
                assert balance["BTC"]["total"] == 1.5
                order = await exchange.create_order_ws("BTC/USD", "limit", "buy", 0.001, 1000)
                assert order["id"] == "OFAKE1-AAAAA-BBBBBB"
                ticker = asyncio.ensure_future(exchange.watch_ticker("BTC/USD"))
                await until("the public subscribe", 10, lambda: public.messages)
                ticker.cancel()
                client = exchange.client(exchange.relay_url)
                assert exchange.ping(client) == {"method": "ping"}, "v2's ping, though the URL has no v2"
            finally:
                await exchange.close()
            assert not exchange.apiKey and not exchange.secret
            assert relay.requests[0][0] == "/v1/relay?account=main"
            assert relay.headers("Authorization") == ["Bearer relay-credential"]
            assert public.headers("Authorization") == [None], "Kraken's public endpoint never gets the credential"
            assert [m["method"] for m in relay.messages] == ["subscribe", "add_order"]
            assert all("token" not in m.get("params", {}) for m in relay.messages), "no token on the wire"

    asyncio.run(main())


class _Refusing:
    """A server that refuses every WebSocket upgrade with `status` (and a
    problem+json body, and Retry-After), as the broker refuses the relay."""

    def __init__(self, status: int) -> None:
        self.status, self.url, self.refused = status, "", 0

    async def __aenter__(self):
        import http
        import json as _json

        from websockets.asyncio.server import serve
        from websockets.datastructures import Headers
        from websockets.http11 import Response

        def refuse(connection, request):
            self.refused += 1
            body = _json.dumps({"type": "about:blank", "title": "no", "status": self.status,
                                "detail": f"refused {self.status}"}).encode()
            headers = Headers([("Content-Type", "application/problem+json"), ("Retry-After", "7"),
                               ("Content-Length", str(len(body)))])
            return Response(self.status, http.HTTPStatus(self.status).phrase, headers, body)

        self._server = await serve(lambda conn: None, "127.0.0.1", 0, process_request=refuse)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self._server.close()
        await self._server.wait_closed()


def test_the_sdk_relay_client_raises_refusals_and_waits_out_transient_ones():
    pytest.importorskip("kraken.spot")
    from ktb_client import BrokerError
    from ktb_client.kraken_sdk_relay import RelaySpotWSClient

    async def main() -> None:
        async with _Refusing(403) as refusing:
            client = RelaySpotWSClient(Broker(refusing.url, credential="c"), patience=30)
            with pytest.raises(BrokerError) as refused:
                await asyncio.wait_for(client.start(), 10)
            assert refused.value.status == 403 and refused.value.detail == "refused 403"
            assert refusing.refused == 1
        async with _Refusing(429) as refusing:
            # Retry-After (7 s) past the patience: raised at once.
            client = RelaySpotWSClient(Broker(refusing.url, credential="c"), patience=5)
            with pytest.raises(BrokerError) as refused:
                await asyncio.wait_for(client.start(), 10)
            assert refused.value.status == 429 and refused.value.retry_after == 7
            # Within the patience: waited out, until close() ends the wait.
            client = RelaySpotWSClient(Broker(refusing.url, credential="c"), patience=30)
            starting = asyncio.ensure_future(client.start())
            await until("the refusal", 5, lambda: refusing.refused == 2)
            await asyncio.sleep(0.5)  # a duration: the Retry-After is waited out
            assert not starting.done() and refusing.refused == 2
            await asyncio.wait_for(client.close(), 5)
            done, _ = await asyncio.wait({starting}, timeout=5)
            assert starting in done and isinstance(starting.exception(), ConnectionError)
            assert refusing.refused == 2

    asyncio.run(main())


def test_the_ccxt_relay_exchange_raises_refusals_as_ccxt_errors():
    pytest.importorskip("ccxt.pro")
    import ccxt

    from ktb_client.ccxt_kraken_relay import RelayKraken

    async def watch(status: int) -> Exception:
        async with _Refusing(status) as refusing:
            exchange = RelayKraken(Broker(refusing.url, credential="c"))
            exchange.set_markets(MARKETS)
            try:
                await asyncio.wait_for(exchange.watch_balance(), 10)
            except Exception as e:  # noqa: BLE001 (the test inspects what escaped)
                return e
            finally:
                await exchange.close()
        raise AssertionError("the watch succeeded")

    async def main() -> None:
        for status in (401, 403):
            error = await watch(status)
            assert isinstance(error, ccxt.AuthenticationError) and str(status) in str(error), repr(error)
        error = await watch(429)
        assert isinstance(error, ccxt.RateLimitExceeded) and error.retry_after == 7, repr(error)
        error = await watch(503)
        assert isinstance(error, ccxt.ExchangeNotAvailable), repr(error)

    asyncio.run(main())


def test_both_relay_modes_open_a_tls_relay_with_a_client_certificate(tmp_path):
    """An https:// broker with its own CA, requiring a client certificate:
    the relay is opened over wss:// with the broker's TLS context (ccxt's
    session alone would trust only the public CAs), and no Authorization."""
    pytest.importorskip("kraken.spot")
    pytest.importorskip("ccxt.pro")
    import shutil
    import ssl

    from ktb_client.ccxt_kraken_relay import RelayKraken
    from ktb_client.kraken_sdk_relay import RelaySpotWSClient
    from relay_helpers import make_pki

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make certificates")
    pki = make_pki(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca.crt"])
    server.load_cert_chain(pki["server.crt"], pki["server.key"])
    server.verify_mode = ssl.CERT_REQUIRED

    async def main() -> None:
        async with FakeRelay(ssl=server) as relay:
            broker = Broker(relay.url.replace("wss://", "https://"), account="main", ca_file=pki["ca.crt"],
                            cert_file=pki["client.crt"], key_file=pki["client.key"])
            assert broker.relay_url.startswith("wss://") and "Authorization" not in broker.relay_headers()
            client = RelaySpotWSClient(broker)
            await client.start()
            try:
                await client.subscribe(params={"channel": "balances"})
                await until("the subscribe", 10, lambda: any(m.get("method") == "subscribe" for m in relay.messages))
            finally:
                await client.close()
            exchange = RelayKraken(broker)
            exchange.set_markets(MARKETS)
            try:
                assert (await exchange.watch_balance())["BTC"]["total"] == 1.5
            finally:
                await exchange.close()
            assert len(relay.requests) == 2 and relay.headers("Authorization") == [None, None]

    asyncio.run(main())

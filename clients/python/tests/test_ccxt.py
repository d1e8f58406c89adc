"""ccxt.pro's kraken through the broker: an engine watches `balances` with no
API key in its process; the simulator revokes the token and drops the
connection; the provider reports the token and the watch resubscribes with
the new one. The engine's environment and memory never held the key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ktb_client import Broker

pytest.importorskip("ccxt.pro")

from engine_harness import Engine  # noqa: E402

ENGINE = Path(__file__).parent / "engines" / "ccxt_engine.py"


def test_ccxt_watches_balances_and_recovers_a_revoked_token_with_no_key(demo):
    broker = Broker(demo.api, account=demo.account, credential=demo.credential)
    engine = Engine(demo, ENGINE)
    try:
        first = engine.expect(lambda e: e["kind"] == "balance")
        assert first["assets"], "a balances snapshot"
        held = broker.fetch().token
        calls_before = len(demo.sim_get("/_sim/calls")["calls"])

        demo.sim_post("/_sim/tokens/revoke")
        demo.sim_post("/_sim/ws/drop")
        again = engine.expect(lambda e: e["kind"] == "balance" and e["token"] != first["token"], seconds=60)
        assert again["assets"]
        calls = demo.sim_get("/_sim/calls")["calls"][calls_before:]
        assert len(calls) == 1, f"one Kraken call for the new token: {calls}"
        assert broker.fetch().token != held

        key = demo.api_key()
        environ = Path(f"/proc/{engine.proc.pid}/environ").read_bytes()
        assert key.encode() not in environ
        assert not engine.memory_holds(key.encode()), "the key is nowhere in the engine's memory"
    finally:
        engine.stop()


def test_ccxt_asks_the_broker_once_per_connection_and_once_per_rejection(demo):
    from ktb_client.ccxt_kraken import BrokerKraken
    from net_helpers import MARKETS, requests_answered, until

    def fetches() -> int:
        return requests_answered(demo, "/v1/token", 200)

    def reports() -> int:
        return requests_answered(demo, "/v1/token/invalidate", 200)

    async def main() -> None:
        # The demo's tokens live 60 s: renew only within 5 s of the use-by. Patience:
        # earlier tests may have spent this consumer's share of forced refreshes
        # (a report answered 429 with Retry-After, waited out).
        broker = Broker(demo.api, account=demo.account, credential=demo.credential)
        exchange = BrokerKraken(broker, renew_before=5, patience=30)
        exchange.set_markets(MARKETS)
        f0, r0 = fetches(), reports()
        try:
            assert exchange.token is None and fetches() == f0, "nothing is fetched at construction"
            await exchange.watch_balance()
            assert fetches() == f0 + 1
            orders = asyncio.create_task(exchange.watch_orders())
            placed = [await exchange.create_order_ws("BTC/USD", "limit", "buy", 0.001, 1000) for _ in range(3)]
            for order in placed[:2]:
                await exchange.cancel_order_ws(order["id"])
            assert (await asyncio.wait_for(orders, 10)), "an order update on the same connection"
            assert fetches() == f0 + 1 and reports() == r0, "one fetch for one connection, seven private calls"

            # Kraken forgets the token: two orders at once are refused, one report, both sent again.
            calls = len(demo.sim_get("/_sim/calls")["calls"])
            demo.sim_post("/_sim/tokens/revoke")
            both = await asyncio.gather(*(exchange.create_order_ws("BTC/USD", "limit", "buy", 0.001, 1000)
                                          for _ in range(2)))
            assert all(o["id"] for o in both)
            assert reports() == r0 + 1 and fetches() == f0 + 1, "one report for one rejected token"
            assert len(demo.sim_get("/_sim/calls")["calls"]) == calls + 1, "one Kraken call"

            # A new connection asks again, once.
            url = exchange.urls["api"]["ws"]["privateV2"]
            demo.sim_post("/_sim/ws/drop")
            await until("ccxt to see the connection close", 10, lambda: url not in exchange.clients)
            fresh = await exchange.create_order_ws("BTC/USD", "limit", "buy", 0.001, 1000)
            await exchange.cancel_order_ws(fresh["id"])
            assert fetches() == f0 + 2 and reports() == r0 + 1
        finally:
            await exchange.close()

    asyncio.run(main())


def test_ccxt_raises_broker_refusals_as_ccxt_errors(demo):
    import ccxt

    from ktb_client.ccxt_kraken import BrokerKraken
    from net_helpers import MARKETS, ScriptedBroker, free_port

    async def watch(broker: Broker) -> Exception:
        exchange = BrokerKraken(broker)
        exchange.set_markets(MARKETS)
        try:
            await exchange.watch_balance()
        except Exception as e:  # noqa: BLE001 (the test inspects what escaped)
            return e
        finally:
            await exchange.close()
        raise AssertionError("the watch succeeded")

    async def main() -> None:
        async with ScriptedBroker([(429, {"Retry-After": "30"})]) as fake:
            exchange = BrokerKraken(Broker(fake.url, credential="c"))
            exchange.set_markets(MARKETS)
            try:
                with pytest.raises(ccxt.RateLimitExceeded) as e:
                    await exchange.watch_balance()
                assert isinstance(e.value, ccxt.NetworkError) and e.value.retry_after == 30
                with pytest.raises(ccxt.NetworkError):
                    await exchange.watch_my_trades()
                assert fake.requests == 1, "the broker is not asked again before its Retry-After"
            finally:
                await exchange.close()
        async with ScriptedBroker([(503, {})]) as fake:
            error = await watch(Broker(fake.url, credential="c"))
            assert isinstance(error, ccxt.NetworkError) and not isinstance(error, ccxt.AuthenticationError)
        error = await watch(Broker(f"http://127.0.0.1:{free_port()}", credential="c"))
        assert isinstance(error, ccxt.NetworkError), "unreachable"
        error = await watch(Broker(demo.api, account=demo.account, credential="ktb_wrong-000000000000000000000000"))
        assert isinstance(error, ccxt.AuthenticationError) and "401" in str(error)
        error = await watch(Broker(demo.api, account="not-granted", credential=demo.credential))
        assert isinstance(error, ccxt.AuthenticationError) and "403" in str(error)

    asyncio.run(main())


def test_ccxt_sends_an_order_again_once_then_raises_the_refusal(demo):
    """The broker (a fake) answers a token the simulator never issued, and
    the same one to the report: the order is refused, sent once more after
    one report, refused again, and that refusal is raised."""
    import ccxt

    from ktb_client.ccxt_kraken import BrokerKraken
    from net_helpers import FAKE_TOKEN, MARKETS, ScriptedBroker

    async def main() -> None:
        async with ScriptedBroker([(200, {})], token=dict(FAKE_TOKEN, ws_url=demo.ws_url)) as fake:
            exchange = BrokerKraken(Broker(fake.url, credential="c"))
            exchange.set_markets(MARKETS)
            try:
                with pytest.raises(ccxt.BaseError) as e:
                    await exchange.create_order_ws("BTC/USD", "limit", "buy", 0.001, 1000)
                assert "Invalid session" in str(e.value)
                assert fake.requests == 2, "one fetch, one report"
                assert fake.paths[0].startswith("/v1/token?") and "min_ttl=31" in fake.paths[0]
                assert fake.paths[1].startswith("/v1/token/invalidate")
            finally:
                await exchange.close()

    asyncio.run(main())


def test_ccxt_keeps_an_open_connection_working_while_the_broker_is_down(demo):
    """The fake broker serves the demo's real token as having 32 s left
    (renew_before 30 s: min_ttl 31 is met), then refuses with 503. About 2 s
    on, the token is within renew_before of its use-by, which limits only
    opening a connection: calls on the open one go on with its token, and
    the renewal is tried aside, not again within 5 s of failing."""
    import dataclasses
    import time

    from ktb_client.ccxt_kraken import BrokerKraken
    from net_helpers import MARKETS, ScriptedBroker

    real = Broker(demo.api, account=demo.account, credential=demo.credential).fetch(min_ttl=40)

    async def main() -> None:
        async with ScriptedBroker([(200, {}), (503, {})], token=dict(dataclasses.asdict(real), expires_in=32)) as fake:
            # (ccxt would space its requests 1 s apart.)
            exchange = BrokerKraken(Broker(fake.url, credential="c"), {"enableRateLimit": False}, renew_before=30)
            exchange.set_markets(MARKETS)
            try:
                assert await exchange.watch_balance() is not None
                assert fake.requests == 1
                deadline = time.monotonic() + 15
                while fake.requests == 1:  # until the renewal has been tried (and refused)
                    assert time.monotonic() < deadline, "no renewal tried"
                    order = await exchange.create_order_ws("BTC/USD", "limit", "buy", 0.001, 1000)
                    await exchange.cancel_order_ws(order["id"])
                    await asyncio.sleep(0.2)
                order = await exchange.create_order_ws("BTC/USD", "limit", "buy", 0.001, 1000)
                await exchange.cancel_order_ws(order["id"])
                assert fake.requests == 2, "no renewal again within 5 s of a failed one"
                orders = asyncio.create_task(exchange.watch_orders())  # a new subscription, same token
                for _ in range(2):
                    order = await exchange.create_order_ws("BTC/USD", "limit", "buy", 0.001, 1000)
                    await exchange.cancel_order_ws(order["id"])
                assert await asyncio.wait_for(orders, 10)
                assert all("min_ttl=31" in p for p in fake.paths if p.startswith("/v1/token?"))
            finally:
                await exchange.close()

    asyncio.run(main())


def test_ccxt_asks_nothing_and_opens_nothing_after_close():
    """A fetch waiting out a 503 when the exchange is closed ends: the
    watch fails with ExchangeClosedByUser and no client or session is made."""
    import ccxt

    from ktb_client.ccxt_kraken import BrokerKraken
    from net_helpers import MARKETS, ScriptedBroker, until

    async def main() -> None:
        async with ScriptedBroker([(503, {"Retry-After": "1"}), (200, {})]) as fake:
            exchange = BrokerKraken(Broker(fake.url, credential="c"), patience=30)
            exchange.set_markets(MARKETS)
            watch = asyncio.create_task(exchange.watch_balance())
            await until("the first refusal", 5, lambda: fake.requests == 1)
            await exchange.close()
            done, _ = await asyncio.wait({watch}, timeout=5)
            assert watch in done and isinstance(watch.exception(), ccxt.ExchangeClosedByUser)
            assert not exchange.clients and exchange.session is None
            assert fake.requests == 1

    asyncio.run(main())

"""ccxt.pro's kraken through the broker's relay, against `serve` and the
simulator: balances and orders watched, orders placed and cancelled, with
no key and no token (every frame received is scanned for every token the
simulator minted, and no request carries one); the broker never served a
token to the consumer; a read-only consumer's order and executions
subscription are refused as PermissionDenied; refused identities are
AuthenticationErrors."""

from __future__ import annotations

import asyncio
import time

import pytest

from ktb_client import Broker
from net_helpers import MARKETS
from relay_helpers import tokens_in

pytest.importorskip("ccxt.pro")

SERVED = "kraken_token_broker_tokens_served_total"


def _exchange(relay, consumer: str):
    from ktb_client.ccxt_kraken_relay import RelayKraken

    broker = Broker(relay.api, account=relay.account, credential=relay.credentials[consumer])
    exchange = RelayKraken(broker, {"enableRateLimit": False})
    exchange.set_markets(MARKETS)
    return exchange


def _recording(exchange) -> tuple[list, list]:
    """Every frame the relay's connection receives, and every message sent on it."""
    client = exchange.client(exchange.relay_url)
    received, sent = [], []
    handle, send = client.handle_text_or_binary_message, client.send

    def recording_handle(data):
        received.append(data)
        return handle(data)

    async def recording_send(message):
        sent.append(message)
        return await send(message)

    client.handle_text_or_binary_message, client.send = recording_handle, recording_send
    return received, sent


def test_ccxt_trades_and_watches_through_the_relay_with_no_token(relay):
    async def main() -> tuple[list, list, str]:
        exchange = _exchange(relay, "relay-engine")
        received, sent = _recording(exchange)
        try:
            balance = await exchange.watch_balance()
            assert [k for k in balance if k.isupper()], "a balances snapshot"
            orders = asyncio.ensure_future(exchange.watch_orders())
            order = await exchange.create_order_ws("BTC/USD", "limit", "buy", 0.001, 1000)
            assert order["id"]
            await exchange.cancel_order_ws(order["id"])
            assert await asyncio.wait_for(orders, 10), "an order update"
            assert not exchange.apiKey and not exchange.secret
        finally:
            await exchange.close()
        return received, sent, order["id"]

    received, sent, order_id = asyncio.run(main())
    minted = relay.minted()
    assert minted, "the simulator minted the broker's token"
    assert len(received) >= 4
    assert not [f for f in received if tokens_in(f, minted)], "a frame held a token"
    assert {m["method"] for m in sent} >= {"subscribe", "add_order", "cancel_order"}
    assert all("token" not in m.get("params", {}) for m in sent), "no request carries a token"

    assert relay.metric(SERVED, consumer="relay-engine") == 0
    deadline = time.monotonic() + 10
    while True:
        lines = [e for e in relay.audit_lines() if e.get("event") == "relay.order" and e.get("order_id") == order_id]
        if len(lines) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert {(e["consumer"], e["method"], e["success"]) for e in lines} == {
        ("relay-engine", "add_order", True), ("relay-engine", "cancel_order", True)}, lines


def test_ccxt_read_only_consumer_gets_permission_denied(relay):
    import ccxt

    async def main() -> None:
        exchange = _exchange(relay, "relay-reader")
        try:
            assert await exchange.watch_balance() is not None
            with pytest.raises(ccxt.PermissionDenied):
                await exchange.create_order_ws("BTC/USD", "limit", "buy", 0.001, 1000)
            with pytest.raises(ccxt.PermissionDenied):
                await asyncio.wait_for(exchange.watch_orders(), 10)  # not left waiting forever
        finally:
            await exchange.close()

    asyncio.run(main())


def test_ccxt_raises_refused_identities_as_authentication_errors(relay):
    import ccxt

    from ktb_client.ccxt_kraken_relay import RelayKraken

    async def watch(broker: Broker) -> Exception:
        exchange = RelayKraken(broker)
        exchange.set_markets(MARKETS)
        try:
            await asyncio.wait_for(exchange.watch_balance(), 10)
        except Exception as e:  # noqa: BLE001 (the test inspects what escaped)
            return e
        finally:
            await exchange.close()
        raise AssertionError("the watch succeeded")

    async def main() -> None:
        wrong = await watch(Broker(relay.api, account=relay.account, credential="ktb_wrong-0000000000000000000000"))
        assert isinstance(wrong, ccxt.AuthenticationError) and "401" in str(wrong), repr(wrong)
        other = await watch(Broker(relay.api, account="not-granted", credential=relay.credentials["relay-engine"]))
        assert isinstance(other, ccxt.AuthenticationError) and "403" in str(other), repr(other)

    asyncio.run(main())

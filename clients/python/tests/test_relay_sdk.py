"""python-kraken-sdk through the broker's relay, against `serve` and the
simulator: an engine subscribes to executions and balances and places and
cancels an order with no key and no token in its process (every frame it
received is scanned for every token the simulator minted; its memory for
the token the broker holds); the broker never served it a token; a
read-only consumer's order is refused by the broker; a refused identity is
raised by start(); an engine started before its broker waits for it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest

from engine_harness import Engine
from ktb_client import Broker, BrokerError
from net_helpers import ORDER, Forwarder, free_port, until
from relay_helpers import tokens_in

pytest.importorskip("kraken.spot")

ENGINE = Path(__file__).parent / "engines" / "sdk_relay_engine.py"
SERVED = "kraken_token_broker_tokens_served_total"
REFUSED = "kraken_token_broker_relay_refused_total"


def audit_orders(relay, consumer: str, order_id: str, count: int) -> list[dict]:
    """The relay.order lines of `consumer` naming `order_id`, once there are `count`."""
    deadline = time.monotonic() + 10
    while True:
        lines = [e for e in relay.audit_lines()
                 if e.get("event") == "relay.order" and e.get("consumer") == consumer and e.get("order_id") == order_id]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_an_sdk_engine_trades_through_the_relay_and_never_holds_a_token(relay):
    events: list[dict] = []
    engine = Engine(relay, ENGINE)
    try:
        done = engine.expect(lambda e: events.append(e) or e["kind"] == "done")
        engine.expect(lambda e: events.append(e) or (e["kind"] == "executions" and "canceled" in e["exec_types"]))
        answers = {e["req_id"]: e for e in events if e["kind"] in ("subscribe", "add_order", "cancel_order")}
        assert answers[1]["success"] and answers[2]["success"], "executions and balances subscribed"
        assert answers[3]["success"] and done["order_id"], "the order placed"
        assert answers[4]["success"], "and cancelled"
        assert any(e["kind"] == "balances" and e["type"] == "snapshot" for e in events)
        assert any(e["kind"] == "executions" and "new" in e["exec_types"] for e in events)

        # No token in any frame the engine received, nor in any it sent.
        minted = relay.minted()
        assert minted, "the simulator minted the broker's token"
        frames = [e["data"] for e in events if e["kind"] == "frame"]
        assert len(frames) >= 6
        assert not [f for f in frames if tokens_in(f, minted)], "a frame held a token"
        for sent in (json.loads(e["data"]) for e in events if e["kind"] == "sent"):
            assert "token" not in sent.get("params", {}), f"sent with a token: {sent['method']}"

        # Nor in its memory or environment: the account's token, as the broker holds it now.
        token = Broker(relay.api, account=relay.account, credential=relay.credentials["monitor"]).fetch().token
        assert tokens_in(json.dumps({"params": {"token": token}}), relay.minted()), "the scan finds a token"
        assert token.encode() not in Path(f"/proc/{engine.proc.pid}/environ").read_bytes()
        assert not engine.memory_holds(token.encode()), "the token is nowhere in the engine's memory"
        assert not engine.memory_holds(relay.api_key().encode()), "nor the key"
    finally:
        engine.stop()
    assert not tokens_in("".join(engine.stderr), relay.minted()), "no token in the SDK's DEBUG log"

    # The broker never served this consumer a token, and would not.
    assert relay.metric(SERVED, consumer="relay-engine") == 0
    assert not [e for e in relay.audit_lines() if e.get("event") == "token.served" and e.get("consumer") == "relay-engine"]
    with pytest.raises(BrokerError) as refused:
        Broker(relay.api, account=relay.account, credential=relay.credential).fetch()
    assert refused.value.status == 403, "relay_only: /v1/token refused"
    assert relay.metric("kraken_token_broker_relay_messages_total", direction="to_kraken") >= 4

    # Each trading request is attributed to this engine in the audit trail.
    placed = audit_orders(relay, "relay-engine", done["order_id"], 2)
    assert {(e["method"], e["success"]) for e in placed} == {("add_order", True), ("cancel_order", True)}, placed
    assert all(e["account"] == "main" and e["outcome"] == "answered" for e in placed)


class _Seen:
    def __init__(self) -> None:
        self.messages: list[dict] = []

    async def callback(self, message) -> None:
        if isinstance(message, dict):
            self.messages.append(message)

    def answer(self, req_id: int) -> dict | None:
        return next((m for m in self.messages if m.get("req_id") == req_id and "success" in m), None)


def test_the_broker_refuses_a_read_only_consumers_order(relay):
    from ktb_client.kraken_sdk_relay import RelaySpotWSClient

    seen = _Seen()
    refused_before = relay.metric(REFUSED, consumer="relay-reader", reason="not_allowed")

    async def main() -> None:
        broker = Broker(relay.api, account=relay.account, credential=relay.credentials["relay-reader"])
        client = RelaySpotWSClient(broker, callback=seen.callback)
        await client.start()
        try:
            await client.subscribe(params={"channel": "balances"}, req_id=1)
            await client.send_message({"method": "add_order", "params": dict(ORDER), "req_id": 2})
            await client.subscribe(params={"channel": "executions"}, req_id=3)
            await until("three answers", 10, lambda: all(seen.answer(i) for i in (1, 2, 3)))
        finally:
            await client.close()

    asyncio.run(main())
    assert seen.answer(1)["success"] is True
    for req_id, method in ((2, "add_order"), (3, "subscribe")):
        answer = seen.answer(req_id)
        assert answer["success"] is False and answer["method"] == method
        assert answer["error"].startswith("EGeneral:Permission denied"), answer
    assert relay.metric(REFUSED, consumer="relay-reader", reason="not_allowed") == refused_before + 2


def test_start_raises_a_refused_identity_at_once(relay):
    from ktb_client.kraken_sdk_relay import RelaySpotWSClient

    async def start(broker: Broker) -> BrokerError:
        client = RelaySpotWSClient(broker, patience=30)
        began = time.monotonic()
        with pytest.raises(BrokerError) as refused:
            await asyncio.wait_for(client.start(), 20)
        assert time.monotonic() - began < 10, "not waited out as if transient"
        return refused.value

    async def main() -> None:
        wrong = await start(Broker(relay.api, account=relay.account, credential="ktb_wrong-0000000000000000000000"))
        assert wrong.status == 401 and wrong.permanent
        other = await start(Broker(relay.api, account="not-granted", credential=relay.credential))
        assert other.status == 403

    asyncio.run(main())


def test_an_sdk_engine_started_before_its_broker_waits_for_it(relay):
    from ktb_client.kraken_sdk_relay import RelaySpotWSClient

    seen = _Seen()
    warnings: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    handler = Capture(logging.WARNING)
    logging.getLogger("ktb_client").addHandler(handler)

    async def main() -> None:
        port = free_port()
        broker = Broker(f"http://127.0.0.1:{port}", account=relay.account, credential=relay.credential)
        client = RelaySpotWSClient(broker, callback=seen.callback, patience=30, backoff_max=0.5)
        starting = asyncio.ensure_future(client.start())
        try:
            await until("three refused handshakes", 10, lambda: sum("unreachable" in w for w in warnings) >= 3)
            assert not starting.done()
            host, api_port = relay.api.removeprefix("http://").split(":")
            async with Forwarder(port, (host, int(api_port))):
                await asyncio.wait_for(starting, 10)
                await client.subscribe(params={"channel": "balances"}, req_id=1)
                await until("the subscription", 10, lambda: seen.answer(1))
                assert seen.answer(1)["success"] is True
        finally:
            await client.close()

    try:
        asyncio.run(main())
    finally:
        logging.getLogger("ktb_client").removeHandler(handler)

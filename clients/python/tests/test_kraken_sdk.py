"""python-kraken-sdk through the broker: an engine subscribes to `executions`
with no API key in its process; the simulator revokes the token and drops the
connection; the provider reports the token and resubscribes with the new
one. The engine's environment and memory never held the key, and its DEBUG
logs never a token."""

from __future__ import annotations

import asyncio
import os
import logging
import time
from pathlib import Path

import pytest

from engine_harness import Engine
from ktb_client import Broker

pytest.importorskip("kraken.spot")

ENGINE = Path(__file__).parent / "engines" / "sdk_engine.py"


def subscribed(event: dict) -> bool:
    return event["kind"] == "subscribe" and event["success"] is True


def test_the_sdk_subscribes_and_recovers_a_revoked_token_with_no_key(demo):
    broker = Broker(demo.api, account=demo.account, credential=demo.credential)
    engine = Engine(demo, ENGINE)
    try:
        first = engine.expect(subscribed)
        engine.expect(lambda e: e["kind"] == "executions")
        held = [broker.fetch().token]  # the token the engine holds now
        calls_before = len(demo.sim_get("/_sim/calls")["calls"])

        # Kraken forgets the token, and the connection drops.
        demo.sim_post("/_sim/tokens/revoke")
        demo.sim_post("/_sim/ws/drop")
        again = engine.expect(lambda e: subscribed(e) and e["token"] != first["token"], seconds=60)
        assert again["token"] != first["token"], "resubscribed with a new token"
        calls = demo.sim_get("/_sim/calls")["calls"][calls_before:]
        assert len(calls) == 1, f"one Kraken call for the new token: {calls}"
        held.append(broker.fetch().token)
        assert held[1] != held[0]

        key = demo.api_key()
        environ = Path(f"/proc/{engine.proc.pid}/environ").read_bytes()
        assert key.encode() not in environ, "the key is not in the engine's environment"
        assert not engine.memory_holds(key.encode()), "the key is nowhere in the engine's memory"
    finally:
        engine.stop()
    logs = "".join(engine.stderr)
    assert "Recover authenticated subscriptions" in logs, "the SDK logged its resubscription (DEBUG on)"
    for token in held:
        assert token not in logs, "no token in the SDK's logs, at DEBUG"


class _Seen:
    """Messages the client's callback received, and the provider's warnings."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.warnings: list[str] = []

    async def callback(self, message) -> None:
        if isinstance(message, dict):
            self.messages.append(message)

    def answered(self, method: str, success: bool) -> list[dict]:
        return [m for m in self.messages if m.get("method") == method and m.get("success") is success]


class _Capture(logging.Handler):
    def __init__(self, seen: _Seen) -> None:
        super().__init__(logging.WARNING)
        self.seen = seen

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.warnings.append(record.getMessage())


def _watching(seen: _Seen):
    handler = _Capture(seen)
    logging.getLogger("ktb_client").addHandler(handler)
    return handler


def test_the_sdk_client_starts_before_its_broker_and_waits_for_it(demo):
    from ktb_client.kraken_sdk import BrokerSpotWSClient
    from net_helpers import Forwarder, free_port, until

    seen = _Seen()
    handler = _watching(seen)

    async def main() -> None:
        port = free_port()
        broker = Broker(f"http://127.0.0.1:{port}", account=demo.account, credential=demo.credential)
        client = BrokerSpotWSClient(broker, callback=seen.callback, patience=30, backoff_max=0.5)
        starting = asyncio.create_task(client.start())
        try:
            await until("three refused fetches", 10, lambda: sum("unreachable" in w for w in seen.warnings) >= 3)
            assert not starting.done()
            host, api_port = demo.api.removeprefix("http://").split(":")
            async with Forwarder(port, (host, int(api_port))):
                await asyncio.wait_for(starting, 10)
                await client.subscribe(params={"channel": "executions"})
                await until("the subscription", 10, lambda: seen.answered("subscribe", True))
        finally:
            await client.close()

    try:
        asyncio.run(main())
    finally:
        logging.getLogger("ktb_client").removeHandler(handler)


def test_the_sdk_client_survives_a_kraken_outage_without_a_restart(demo):
    """During the outage the broker has no token and answers 503 with
    Retry-After; the provider waits inside get_ws_token. The SDK gives up
    after MAX_RECONNECT_NUM (7) failed reconnects in a row; a fetch that
    raised cost one each. Here that budget is 3 on this client, and the
    outage lasts until the broker has refused at least 3 fetches of this
    client (about 10 s: the broker's Retry-After grows 1, 2, 5 s with its own
    back-off), then recovery takes the broker's next attempt (up to 15 s in
    the demo). The default patience, 15 min, covers outages of minutes and
    any number of refusals the same way.

    KTB_SDK_OUTAGE_SECS=180 (CI sets it) runs the outage for 3 minutes with
    the SDK's own budget of 7 reconnects, as a production outage would."""
    from ktb_client import AsyncBroker, BrokerError
    from ktb_client.kraken_sdk import BrokerSpotWSClient
    from net_helpers import requests_answered, sim_put, until

    seen = _Seen()
    outage = float(os.environ.get("KTB_SDK_OUTAGE_SECS", "0"))

    async def main() -> None:
        broker = AsyncBroker(demo.api, account=demo.account, credential=demo.credential)
        client = BrokerSpotWSClient(broker, callback=seen.callback, patience=max(120, outage + 120), backoff_max=1)
        if outage:
            budget = client._priv_conn.MAX_RECONNECT_NUM  # the SDK's own (7)
        else:
            budget = 3
            client._priv_conn.MAX_RECONNECT_NUM = budget  # the SDK's 7, made smaller for a shorter test
        await client.start()
        try:
            await client.subscribe(params={"channel": "executions"})
            await until("the subscription", 10, lambda: seen.answered("subscribe", True))
            first = client.token

            # Kraken goes down and forgets its tokens; the broker learns its
            # token is rejected and cannot mint another; the connection drops.
            sim_put(demo, "/_sim/system", {"status": "maintenance"})
            demo.sim_post("/_sim/tokens/revoke")
            # (Earlier tests may have spent this consumer's share of forced
            # refreshes: a 429 with Retry-After, waited out here.)
            deadline = time.monotonic() + 30
            while True:
                with pytest.raises(BrokerError) as refused:
                    await broker.invalidate(first)
                if refused.value.status != 429 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(refused.value.retry_after or 1)
            assert refused.value.status == 503 and refused.value.retry_after
            refused_before = requests_answered(demo, "/v1/token", 503)
            seen.messages.clear()
            demo.sim_post("/_sim/ws/drop")
            began = time.monotonic()
            await until(f"{budget} refused fetches", max(40, outage + 40),
                        lambda: requests_answered(demo, "/v1/token", 503) - refused_before >= budget)
            # The outage is held for its whole length (a duration, not a
            # condition to wait for).
            await asyncio.sleep(max(0.0, outage - (time.monotonic() - began)))
            refused = requests_answered(demo, "/v1/token", 503) - refused_before
            print(f"outage of {time.monotonic() - began:.0f} s: {refused} fetches refused, reconnect budget {budget}")
            sim_put(demo, "/_sim/system", {"status": "online"})

            await until("the subscription again", 40, lambda: seen.answered("subscribe", True))
            assert client.token is not None and client.token.token != first.token
            assert not client.exception_occur
            assert not any("python-kraken-sdk" in m for m in seen.messages), "no MaxReconnectError"
        finally:
            sim_put(demo, "/_sim/system", {"status": "online"})
            await client.close()

    asyncio.run(main())


def test_the_sdk_client_reports_a_token_refused_on_trading_requests_and_sends_them_again(demo):
    from ktb_client.kraken_sdk import BrokerSpotWSClient
    from net_helpers import ORDER, requests_answered, until

    seen = _Seen()

    async def main() -> None:
        client = BrokerSpotWSClient(Broker(demo.api, account=demo.account, credential=demo.credential),
                                    callback=seen.callback)
        await client.start()
        try:
            await client.subscribe(params={"channel": "executions"})
            await until("the subscription", 10, lambda: seen.answered("subscribe", True))
            fetches = requests_answered(demo, "/v1/token", 200)
            reports = requests_answered(demo, "/v1/token/invalidate", 200)
            calls = len(demo.sim_get("/_sim/calls")["calls"])

            demo.sim_post("/_sim/tokens/revoke")
            mine = {"method": "add_order", "params": dict(ORDER)}
            await client.send_message(mine)
            # Two under one req_id: both followed (neither replaces the other).
            await client.send_message({"method": "add_order", "params": dict(ORDER), "req_id": 7})
            await client.send_message({"method": "add_order", "params": dict(ORDER), "req_id": 7})
            await until("all three orders placed", 15, lambda: len(seen.answered("add_order", True)) == 3)
            assert not seen.answered("add_order", False), "the refusals were handled, not handed on"
            assert sorted(m["req_id"] for m in seen.answered("add_order", True))[:2] == [7, 7]
            assert "token" not in mine["params"], "the caller's message is left as it was"
            assert requests_answered(demo, "/v1/token/invalidate", 200) == reports + 1, "one report"
            assert requests_answered(demo, "/v1/token", 200) == fetches
            assert len(demo.sim_get("/_sim/calls")["calls"]) == calls + 1, "one Kraken call"
        finally:
            await client.close()

    asyncio.run(main())


async def _ping(client, seen: _Seen, req_id: int) -> None:
    """A ping on the private connection, answered after every earlier request
    there (one socket, in order)."""
    import json

    from net_helpers import until

    await client._get_socket(private=True).send(json.dumps({"method": "ping", "req_id": req_id}))
    await until("the pong", 10, lambda: any(m.get("method") == "pong" and m.get("req_id") == req_id
                                           for m in seen.messages))


def test_the_sdk_client_sends_a_trading_request_again_once_and_hands_on_the_second_refusal(demo):
    """The broker (a fake) answers a token the simulator never issued, and
    the same one to the report: Kraken refuses each order twice. Two orders
    under the same req_id are both followed, and each refusal reaches the
    callback, with the caller's req_id, after one re-send."""
    from ktb_client.kraken_sdk import BrokerSpotWSClient
    from net_helpers import FAKE_TOKEN, ORDER, ScriptedBroker, until

    seen = _Seen()

    async def main() -> None:
        async with ScriptedBroker([(200, {})], token=dict(FAKE_TOKEN, ws_url=demo.ws_url)) as fake:
            client = BrokerSpotWSClient(Broker(fake.url, credential="c"), callback=seen.callback, backoff_max=0.2)
            await client.start()
            try:
                for _ in range(2):
                    await client.send_message({"method": "add_order", "params": dict(ORDER), "req_id": 7})
                await until("both refusals handed on", 10, lambda: len(seen.answered("add_order", False)) == 2)
                await _ping(client, seen, 99)
                refusals = seen.answered("add_order", False)
                assert len(refusals) == 2, "each order sent twice, no more"
                assert [m["req_id"] for m in refusals] == [7, 7]
                assert all("Invalid session" in m["error"] for m in refusals)
                assert fake.paths[0].startswith("/v1/token") and 2 <= fake.requests <= 3
                assert all(p.startswith("/v1/token/invalidate") for p in fake.paths[1:]), "reports only"
            finally:
                await client.close()

    asyncio.run(main())


def test_the_sdk_client_never_sends_an_order_again_after_resend_within(demo):
    """The report of the refused token waits out two 503s (1 s each); the
    order may be sent again only within 0.5 s: its refusal is handed on
    before the report is answered, and the order is not sent after it."""
    from ktb_client.kraken_sdk import BrokerSpotWSClient
    from net_helpers import FAKE_TOKEN, ORDER, ScriptedBroker, until

    seen = _Seen()
    script = [(200, {}), (503, {"Retry-After": "1"}), (503, {"Retry-After": "1"}), (200, {})]

    async def main() -> None:
        async with ScriptedBroker(script, token=dict(FAKE_TOKEN, ws_url=demo.ws_url)) as fake:
            client = BrokerSpotWSClient(Broker(fake.url, credential="c"), callback=seen.callback,
                                        backoff_max=0.2, resend_within=0.5)
            await client.start()
            fake.token = dict(fake.token, token="fake-token-2")  # what the report will answer
            try:
                await client.send_message({"method": "add_order", "params": dict(ORDER)})
                await until("the refusal handed on", 10, lambda: seen.answered("add_order", False))
                assert fake.requests < 4, "handed on while the report still waited"
                await until("the report answered", 10,
                            lambda: client.token is not None and client.token.token == "fake-token-2")
                await _ping(client, seen, 98)
                assert len(seen.answered("add_order", False)) == 1, "not sent again with the new token"
            finally:
                await client.close()

    asyncio.run(main())


def test_the_sdk_client_closes_at_once_while_it_waits_out_a_broker_outage(demo):
    """The connection drops while the broker answers 503 (patience 15 min):
    the SDK's reconnect waits in get_ws_token, and close() ends that wait
    (the SDK's own stop() would wait for it), removing the log filter."""
    from ktb_client.kraken_sdk import _SDK_LOGGERS, BrokerSpotWSClient
    from net_helpers import FAKE_TOKEN, ScriptedBroker, until

    seen = _Seen()

    async def main() -> None:
        async with ScriptedBroker([(200, {}), (503, {"Retry-After": "1"})],
                                  token=dict(FAKE_TOKEN, ws_url=demo.ws_url)) as fake:
            client = BrokerSpotWSClient(Broker(fake.url, credential="c"), callback=seen.callback)
            await client.start()
            assert all(client._redact in logging.getLogger(n).filters for n in _SDK_LOGGERS)
            demo.sim_post("/_sim/ws/drop")
            await until("two refused fetches", 15, lambda: fake.requests >= 3)
            closing = asyncio.ensure_future(client.close())
            done, _ = await asyncio.wait({closing}, timeout=5)
            assert closing in done, "close() returned within 5 s (the patience is 900 s)"
            closing.result()
            asked = fake.requests
            assert not any(client._redact in logging.getLogger(n).filters for n in _SDK_LOGGERS)
            await asyncio.sleep(1.5)  # a duration: the broker is not asked after close()
            assert fake.requests == asked

    asyncio.run(main())

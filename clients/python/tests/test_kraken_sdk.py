"""python-kraken-sdk through the broker: an engine subscribes to `executions`
with no API key in its process; the simulator revokes the token and drops the
connection; the provider reports the token and resubscribes with the new
one. The engine's environment and memory never held the key, and its DEBUG
logs never a token."""

from __future__ import annotations

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

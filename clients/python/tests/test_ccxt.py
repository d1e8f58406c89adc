"""ccxt.pro's kraken through the broker: an engine watches `balances` with no
API key in its process; the simulator revokes the token and drops the
connection; the provider reports the token and the watch resubscribes with
the new one. The engine's environment and memory never held the key."""

from __future__ import annotations

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

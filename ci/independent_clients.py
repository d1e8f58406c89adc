"""Independent Kraken clients against our simulator.

Proves the simulator speaks Kraken, not our own dialect: krakenex and
python-kraken-sdk sign with their own code, and python-kraken-sdk's
SpotWSClient fetches a token over REST and subscribes to `executions` over
the simulator's WebSocket. Each client gets its own key from the control API,
because their nonce scales differ (milliseconds vs 1e-8 s).

usage: python independent_clients.py http://127.0.0.1:PORT
Exit 0 on success; any failure raises.
"""

import asyncio
import hashlib
import json
import sys
import urllib.request


def new_key(base: str) -> dict:
    req = urllib.request.Request(f"{base}/_sim/keys", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.load(resp)


def sim_get(base: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base}{path}", timeout=5) as resp:
        return json.load(resp)


def token_is_issued(base: str, token: str) -> bool:
    # The control API names tokens by fingerprint (first 8 hex of SHA-256),
    # never by the token itself.
    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:8]
    return any(t["fingerprint"] == fingerprint for t in sim_get(base, "/_sim/tokens")["tokens"])


def check_krakenex(base: str) -> None:
    import krakenex

    key = new_key(base)
    api = krakenex.API(key=key["api_key"], secret=key["api_secret"])
    api.uri = base
    for _ in range(3):  # several calls: nonces must keep increasing
        answer = api.query_private("GetWebSocketsToken")
        assert answer["error"] == [], answer
        token = answer["result"]["token"]
        assert answer["result"]["expires"] > 0, answer
        assert token_is_issued(base, token)
    wrong = krakenex.API(key=key["api_key"], secret=new_key(base)["api_secret"])
    wrong.uri = base
    assert wrong.query_private("GetWebSocketsToken")["error"] == ["EAPI:Invalid signature"]
    print("krakenex: 3 tokens, wrong secret rejected: ok")


def check_pks_rest(base: str) -> None:
    from kraken.spot import SpotClient

    key = new_key(base)
    client = SpotClient(key=key["api_key"], secret=key["api_secret"], url=base)
    answer = client.request("POST", "/0/private/GetWebSocketsToken")
    assert token_is_issued(base, answer["token"]), answer
    print("python-kraken-sdk SpotClient: ok")


async def check_pks_websocket(base: str) -> None:
    from kraken.spot import SpotWSClient

    key = new_key(base)
    ws_base = base.replace("http://", "ws://")
    messages: list[dict] = []

    async def on_message(message: dict) -> None:
        messages.append(message)

    client = SpotWSClient(key=key["api_key"], secret=key["api_secret"], callback=on_message,
                          no_public=True, rest_url=base, ws_url=ws_base, auth_ws_url=ws_base)
    await client.start()
    try:
        await client.subscribe(params={"channel": "executions"})

        def seen(pred) -> bool:
            return any(pred(m) for m in messages)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not (seen(lambda m: m.get("method") == "subscribe" and m.get("success"))
                   and seen(lambda m: m.get("channel") == "heartbeat")):
            if client.exception_occur:
                raise AssertionError(f"client failed: {messages}")
            if loop.time() > deadline:
                raise AssertionError(f"no ack and heartbeat within 20 s: {messages}")
            await asyncio.sleep(0.1)
        ack = next(m for m in messages if m.get("method") == "subscribe")
        assert ack["result"]["channel"] == "executions", ack
        assert not seen(lambda m: m.get("success") is False), messages
    finally:
        await client.close()
    print("python-kraken-sdk SpotWSClient: subscribed to executions, heartbeats: ok")


def main() -> None:
    base = sys.argv[1].rstrip("/")
    check_krakenex(base)
    check_pks_rest(base)
    asyncio.run(check_pks_websocket(base))


if __name__ == "__main__":
    main()

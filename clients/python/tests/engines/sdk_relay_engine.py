"""An engine on python-kraken-sdk trading through the broker's relay (for
test_relay_sdk.py): subscribes to `executions` and `balances`, places an
order and cancels it, and prints one JSON line per event, and every frame
it received or sent. Its environment holds the broker's URL and a consumer
credential: no Kraken key, and it never asks for a token. SDK logging goes
to stderr at DEBUG."""

import asyncio
import json
import logging
import os
import sys

from ktb_client import Broker
from ktb_client.kraken_sdk_relay import RelaySpotWSClient

ORDER = {"order_type": "limit", "side": "buy", "order_qty": 0.001, "limit_price": 1000, "symbol": "BTC/USD"}


def say(**event):
    print(json.dumps(event), flush=True)


async def main() -> None:
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    broker = Broker(os.environ["KTB_URL"], account=os.environ["KTB_ACCOUNT"])
    answers: dict[int, asyncio.Future] = {}

    async def on_message(message):
        if not isinstance(message, dict):
            return
        if message.get("method") in ("subscribe", "add_order", "cancel_order"):
            say(kind=message["method"], success=message.get("success"), error=message.get("error"),
                req_id=message.get("req_id"), result=message.get("result"))
            future = answers.get(message.get("req_id"))
            if future is not None and not future.done():
                future.set_result(message)
        elif message.get("channel") in ("executions", "balances"):
            say(kind=message["channel"], type=message.get("type"),
                exec_types=[d.get("exec_type") for d in message.get("data", []) if isinstance(d, dict)])

    async def request(req_id: int, send) -> dict:
        answers[req_id] = asyncio.get_running_loop().create_future()
        await send()
        return await asyncio.wait_for(answers[req_id], 15)

    client = RelaySpotWSClient(broker, callback=on_message)
    await client.start()
    socket = client._priv_conn.socket
    recv, send = socket.recv, socket.send

    async def recording_recv(*args, **kwargs):
        data = await recv(*args, **kwargs)
        say(kind="frame", data=data if isinstance(data, str) else data.decode("utf-8", "replace"))
        return data

    async def recording_send(data, *args, **kwargs):
        say(kind="sent", data=data if isinstance(data, str) else data.decode("utf-8", "replace"))
        return await send(data, *args, **kwargs)

    socket.recv, socket.send = recording_recv, recording_send
    say(kind="started", pid=os.getpid())
    await request(1, lambda: client.subscribe(params={"channel": "executions", "snap_orders": True}, req_id=1))
    await request(2, lambda: client.subscribe(params={"channel": "balances"}, req_id=2))
    placed = await request(3, lambda: client.send_message({"method": "add_order", "params": dict(ORDER), "req_id": 3}))
    order_id = (placed.get("result") or {}).get("order_id")
    await request(4, lambda: client.send_message(
        {"method": "cancel_order", "params": {"order_id": [order_id]}, "req_id": 4}))
    say(kind="done", order_id=order_id)
    while True:
        await asyncio.sleep(0.2)


asyncio.run(main())

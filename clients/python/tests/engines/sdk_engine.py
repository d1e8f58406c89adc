"""An engine on python-kraken-sdk with its token from the broker: subscribes
to `executions` and prints one JSON line per event it sees (for
test_kraken_sdk.py). Its environment holds the broker's URL and a consumer
credential, never a Kraken key. SDK logging goes to stderr at DEBUG."""

import asyncio
import json
import logging
import os
import sys

from ktb_client import Broker
from ktb_client.kraken_sdk import BrokerSpotWSClient


def say(**event):
    print(json.dumps(event), flush=True)


async def main() -> None:
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    broker = Broker(os.environ["KTB_URL"], account=os.environ["KTB_ACCOUNT"])

    async def on_message(message):
        if isinstance(message, dict) and message.get("method") == "subscribe":
            say(kind="subscribe", success=message.get("success"), error=message.get("error"),
                token=client.token.token[:6])
        elif isinstance(message, dict) and message.get("channel") == "executions":
            say(kind="executions", type=message.get("type"))

    client = BrokerSpotWSClient(broker, callback=on_message)
    await client.start()
    await client.subscribe(params={"channel": "executions", "snap_orders": True})
    say(kind="started", pid=os.getpid())
    while True:
        await asyncio.sleep(0.2)


asyncio.run(main())

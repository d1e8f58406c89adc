"""An engine on ccxt.pro's kraken with its token from the broker: watches
`balances` and prints one JSON line per event (for test_ccxt.py). Its
environment holds the broker's URL and a consumer credential, never a
Kraken key."""

import asyncio
import json
import os

import ccxt

from ktb_client import Broker
from ktb_client.ccxt_kraken import BrokerKraken

# Markets as ccxt would load them from Kraken's public REST API, which this
# offline test does not reach (one pair is enough for balances).
MARKETS = [{
    "id": "XBTUSD", "symbol": "BTC/USD", "base": "BTC", "quote": "USD", "baseId": "XXBT", "quoteId": "ZUSD",
    "active": True, "type": "spot", "spot": True, "precision": {"amount": 1e-8, "price": 0.1}, "limits": {},
}]


def say(**event):
    print(json.dumps(event), flush=True)


async def main() -> None:
    broker = Broker(os.environ["KTB_URL"], account=os.environ["KTB_ACCOUNT"])
    exchange = BrokerKraken(broker)
    exchange.set_markets(MARKETS)
    say(kind="started", pid=os.getpid())
    try:
        while True:
            try:
                balance = await exchange.watch_balance()
                say(kind="balance", assets=sorted(k for k in balance if k.isupper()), token=exchange.token.token[:6])
            except ccxt.NetworkError as e:
                say(kind="network", error=type(e).__name__)
                await asyncio.sleep(0.3)
    finally:
        await exchange.close()


asyncio.run(main())

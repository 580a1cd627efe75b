"""Subscribes with the official Python `realtime` client and prints one JSON line per event.

Usage: python subscribe.py <endpoint> <bindings-json> <expected-changes>
"""
import asyncio
import json
import os
import sys

from realtime import AsyncRealtimeClient


def out(obj):
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


async def main():
    endpoint, bindings_json, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])
    bindings = json.loads(bindings_json)
    client = AsyncRealtimeClient(endpoint, os.environ["WALCAST_TEST_APIKEY"])
    await client.connect()
    channel = client.channel("room")
    done = asyncio.Event()
    received = 0

    def make_callback(i):
        def callback(payload):
            nonlocal received
            out({"kind": "change", "binding": i, "payload": payload})
            received += 1
            if received >= expected:
                done.set()
        return callback

    for i, b in enumerate(bindings):
        channel.on_postgres_changes(
            b.get("event", "*"),
            callback=make_callback(i),
            table=b.get("table", "*"),
            schema=b.get("schema", "public"),
            filter=b.get("filter"),
        )

    def on_status(status, err):
        out({"kind": "status", "status": str(getattr(status, "value", status)), "error": str(err) if err else None})

    await channel.subscribe(on_status)
    try:
        await asyncio.wait_for(done.wait(), 30)
    except asyncio.TimeoutError:
        out({"kind": "timeout"})
        sys.exit(2)
    await client.close()


asyncio.run(main())

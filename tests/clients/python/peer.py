"""One Python `realtime` client on one channel, driven by JSON-line commands on stdin; prints one
JSON line per event on stdout (the same protocol as ../node/peer.mjs).

Usage: python peer.py <endpoint> <topic> <channel-config-json>
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
    endpoint, topic, config_json = sys.argv[1], sys.argv[2], sys.argv[3]
    client = AsyncRealtimeClient(endpoint, os.environ["WALCAST_TEST_APIKEY"])
    await client.connect()
    if os.environ.get("WALCAST_TEST_ACCESS_TOKEN"):
        await client.set_auth(os.environ["WALCAST_TEST_ACCESS_TOKEN"])
    config = json.loads(config_json)
    # Bindings listed under "postgres_changes" are registered with on_postgres_changes.
    bindings = config.pop("postgres_changes", [])
    channel = client.channel(topic, {"config": config})
    channel.on_broadcast(
        "*",
        lambda m: out({"kind": "broadcast", "event": m.get("event"), "payload": m.get("payload"), "meta": m.get("meta")}),
    )
    channel.on_presence_sync(lambda: out({"kind": "presence", "event": "sync", "state": channel.presence_state()}))
    channel.on_presence_join(
        lambda key, current, new: out({"kind": "presence", "event": "join", "key": key, "presences": new})
    )
    channel.on_presence_leave(
        lambda key, current, left: out({"kind": "presence", "event": "leave", "key": key, "presences": left})
    )

    for i, b in enumerate(bindings):
        channel.on_postgres_changes(
            b.get("event", "*"),
            callback=lambda payload, i=i: out({"kind": "change", "binding": i, "payload": payload}),
            table=b.get("table", "*"),
            schema=b.get("schema", "public"),
            filter=b.get("filter"),
        )

    def on_status(status, err):
        out({"kind": "status", "status": str(getattr(status, "value", status)), "error": str(err) if err else None})

    await channel.subscribe(on_status)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await asyncio.wait_for(reader.readline(), 60)
        if not line:
            break
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "send":
                await channel.send_broadcast(cmd["event"], cmd.get("payload"))
                out({"kind": "sent", "result": "ok"})
            elif op == "httpSend":
                await channel.http_send(cmd["event"], cmd.get("payload"))
                out({"kind": "sent", "result": "ok"})
            elif op == "track":
                await channel.track(cmd["payload"])
                out({"kind": "sent", "result": "ok"})
            elif op == "untrack":
                await channel.untrack()
                out({"kind": "sent", "result": "ok"})
            elif op == "state":
                out({"kind": "state", "state": channel.presence_state()})
            elif op == "exit":
                break
        except Exception as e:  # reported to the test, which decides
            out({"kind": "sent", "error": repr(e)})
    await client.close()


asyncio.run(main())

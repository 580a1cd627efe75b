"""A generic WebSocket client (the `websockets` package) bridged to JSON lines: each line on stdin
is sent as one text frame; each frame received is printed as one line. Ends when stdin closes or
the server closes the socket (printing {"kind": "closed", "code": …, "reason": …}).

Usage: python plain.py <ws-url>
"""
import asyncio
import json
import sys

import websockets


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main():
    async with websockets.connect(sys.argv[1], max_size=None) as ws:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def forward():
            while True:
                line = await reader.readline()
                if not line:
                    await ws.close()
                    return
                await ws.send(line.decode().strip())

        sender = asyncio.create_task(forward())
        try:
            async for message in ws:
                out(json.loads(message))
        except websockets.ConnectionClosed:
            pass
        out({"kind": "closed", "code": ws.close_code, "reason": ws.close_reason})
        sender.cancel()


asyncio.run(main())

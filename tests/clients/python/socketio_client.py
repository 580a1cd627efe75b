"""The `python-socketio` client driven by JSON-line commands on stdin; prints one JSON line per
event on stdout. Usage: python socketio_client.py <url> <options-json>
Options: {"auth": {...}, "transports": [...]}.
Commands: emit {id, event, data, binary?} (binary: base64, sent as `data.payload`; the
acknowledgement comes as `ack {id, response}`), exit.
Events: connect {transport}, connect_error {message}, disconnect, message {name, args} (a binary
argument as {binary: base64}), ack {id, response}.
"""

import base64
import json
import sys
import threading

import socketio

url, options = sys.argv[1], json.loads(sys.argv[2])
lock = threading.Lock()


def out(obj):
    with lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def plain(v):
    if isinstance(v, (bytes, bytearray)):
        return {"binary": base64.b64encode(v).decode()}
    return v


sio = socketio.Client(reconnection=False)


@sio.event
def connect():
    out({"event": "connect", "transport": sio.transport()})


@sio.event
def connect_error(data):
    message = data.get("message") if isinstance(data, dict) else str(data)
    out({"event": "connect_error", "message": message})


@sio.event
def disconnect(*_):
    out({"event": "disconnect"})


@sio.on("*")
def any_event(name, *args):
    out({"event": "message", "name": name, "args": [plain(a) for a in args]})


def main():
    try:
        sio.connect(url, auth=options.get("auth"), transports=options.get("transports"))
    except socketio.exceptions.ConnectionError:
        pass  # reported by connect_error
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "emit":
            data = cmd.get("data") or {}
            if "binary" in cmd:
                data["payload"] = base64.b64decode(cmd["binary"])
            ident = cmd["id"]
            sio.emit(
                cmd["event"],
                data,
                callback=lambda *resp, ident=ident: out(
                    {"event": "ack", "id": ident, "response": resp[0] if resp else None}
                ),
            )
        elif cmd["op"] == "exit":
            sio.disconnect()
            return


main()

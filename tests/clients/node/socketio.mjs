// The `socket.io-client` package driven by JSON-line commands on stdin; prints one JSON line per
// event on stdout. Usage: node socketio.mjs <url> <options-json> (the options of `io()`; the
// client does not reconnect by itself unless they say so).
// Commands: emit {id, event, data, binary?} (binary: base64, sent as `data.payload`; the
// acknowledgement comes as `ack {id, response}`), drop (the connection fails as a network would),
// connect, auth {auth}, exit.
// Events: open {transport} (the Engine.IO connection), connect {transport}, upgrade {transport}, connect_error {message}, disconnect {reason},
// message {name, args} (a binary argument as {binary: base64}), ack {id, response | error}.
import { io } from 'socket.io-client'
import readline from 'node:readline'

const [url, optionsJson] = process.argv.slice(2)
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n')
const plain = (v) =>
  v instanceof ArrayBuffer || Buffer.isBuffer(v) ? { binary: Buffer.from(v).toString('base64') } : v

const socket = io(url, { reconnection: false, ...JSON.parse(optionsJson) })
socket.io.on('open', () => {
  out({ event: 'open', transport: socket.io.engine.transport.name })
  socket.io.engine.on('upgrade', (t) => out({ event: 'upgrade', transport: t.name }))
})
socket.on('connect', () => out({ event: 'connect', transport: socket.io.engine.transport.name }))
socket.on('connect_error', (e) => out({ event: 'connect_error', message: e.message }))
socket.on('disconnect', (reason) => out({ event: 'disconnect', reason }))
socket.onAny((name, ...args) => out({ event: 'message', name, args: args.map(plain) }))

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const cmd = JSON.parse(line)
  if (cmd.op === 'emit') {
    const data = cmd.data ?? {}
    if (cmd.binary !== undefined) data.payload = Buffer.from(cmd.binary, 'base64')
    socket.timeout(20000).emit(cmd.event, data, (err, response) =>
      out(err ? { event: 'ack', id: cmd.id, error: err.message } : { event: 'ack', id: cmd.id, response }),
    )
  } else if (cmd.op === 'drop') {
    socket.io.engine.close()
  } else if (cmd.op === 'connect') {
    socket.connect()
  } else if (cmd.op === 'auth') {
    socket.auth = cmd.auth
  } else if (cmd.op === 'exit') {
    socket.disconnect()
    process.exit(0)
  }
})

// The `graphql-ws` client driven by JSON-line commands on stdin; prints one JSON line per event
// on stdout. Usage: node graphql.mjs <url> <connection-init-payload-json>
// Commands: subscribe {id, query, variables?}, dispose {id}, exit.
// Events: connected, closed {code, reason}, next {id, payload}, error {id, errors}, complete {id}.
import { createClient } from 'graphql-ws'
import WebSocket from 'ws'
import readline from 'node:readline'

const [url, initJson] = process.argv.slice(2)
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n')
const client = createClient({
  url,
  webSocketImpl: WebSocket,
  connectionParams: JSON.parse(initJson),
  lazy: false,
  retryAttempts: 0,
  on: {
    connected: () => out({ event: 'connected' }),
    closed: (e) => out({ event: 'closed', code: e.code, reason: e.reason }),
  },
  onNonLazyError: () => {},
})

const running = new Map()
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const cmd = JSON.parse(line)
  if (cmd.op === 'subscribe') {
    const dispose = client.subscribe(
      { query: cmd.query, variables: cmd.variables ?? {} },
      {
        next: (payload) => out({ event: 'next', id: cmd.id, payload }),
        error: (e) => out({ event: 'error', id: cmd.id, errors: Array.isArray(e) ? e : [{ message: String(e?.reason ?? e?.message ?? e) , code: e?.code }] }),
        complete: () => out({ event: 'complete', id: cmd.id }),
      },
    )
    running.set(cmd.id, dispose)
  } else if (cmd.op === 'dispose') {
    running.get(cmd.id)?.()
    running.delete(cmd.id)
    out({ event: 'disposed', id: cmd.id })
  } else if (cmd.op === 'exit') {
    client.dispose()
    process.exit(0)
  }
})

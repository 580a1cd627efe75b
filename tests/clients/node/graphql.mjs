// The `graphql-ws` client driven by JSON-line commands on stdin; prints one JSON line per event
// on stdout. Usage: node graphql.mjs <url> <connection-init-payload-json> [urql]
// With `urql`, subscriptions go through urql's client (its subscription exchange over the same
// `graphql-ws` connection), as an app using urql has them.
// Commands: subscribe {id, query, variables?}, dispose {id}, exit.
// Events: connected, closed {code, reason}, next {id, payload}, error {id, errors}, complete {id}.
import { createClient } from 'graphql-ws'
import { Client, cacheExchange, subscriptionExchange } from '@urql/core'
import WebSocket from 'ws'
import readline from 'node:readline'

const [url, initJson, via] = process.argv.slice(2)
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

// urql: every operation is a subscription forwarded to the `graphql-ws` client.
const urql = via === 'urql'
  ? new Client({
      url: url.replace(/^ws/, 'http'),
      exchanges: [
        cacheExchange,
        subscriptionExchange({
          forwardSubscription: (request) => ({
            subscribe: (sink) => ({ unsubscribe: client.subscribe({ ...request, query: request.query || '' }, sink) }),
          }),
        }),
      ],
    })
  : null

function subscribeUrql(cmd) {
  const { unsubscribe } = urql.subscription(cmd.query, cmd.variables ?? {}).subscribe((result) => {
    if (result.error) {
      const errors = result.error.graphQLErrors?.length
        ? result.error.graphQLErrors.map((e) => ({ message: e.message }))
        : [{ message: result.error.message }]
      out({ event: 'error', id: cmd.id, errors })
    } else {
      out({ event: 'next', id: cmd.id, payload: { data: result.data } })
    }
  })
  return unsubscribe
}

const running = new Map()
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const cmd = JSON.parse(line)
  if (cmd.op === 'subscribe' && urql) {
    running.set(cmd.id, subscribeUrql(cmd))
  } else if (cmd.op === 'subscribe') {
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

// One realtime-js client on one channel, driven by JSON-line commands on stdin; prints one JSON
// line per event on stdout. Usage: node peer.mjs <endpoint> <vsn> <topic> <channel-config-json>
// Commands: send {event, payload | bytes}, httpSend {event, payload | bytes}, restBatch {event,
// payload} (send() from a client that never connected: the REST batch endpoint), track {payload},
// untrack, setAuth {token}, state, exit. Events: status, broadcast, presence (sync/join/leave + state), sent,
// change (postgres_changes, for the bindings listed under "postgres_changes" in the config).
import { RealtimeClient } from '@supabase/realtime-js'
import WebSocket from 'ws'
import readline from 'node:readline'

const [endpoint, vsn, topic, configJson] = process.argv.slice(2)
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n')
const plain = (v) => (v instanceof ArrayBuffer ? { bytes: Array.from(new Uint8Array(v)) } : v)

// WALCAST_TEST_ACCESS_TOKEN: a user token, through the accessToken option (setAuth replaces it).
let userToken = process.env.WALCAST_TEST_ACCESS_TOKEN || null
const options = { params: { apikey: process.env.WALCAST_TEST_APIKEY }, transport: WebSocket, vsn }
if (userToken) options.accessToken = async () => userToken
const client = new RealtimeClient(endpoint, options)
// As supabase-js does: fetch the token before the first join, so the join carries it.
if (userToken) await client.setAuth()
const { postgres_changes: bindings = [], ...config } = JSON.parse(configJson)
const channel = client.channel(topic, { config })
channel.on('broadcast', { event: '*' }, (msg) => out({ kind: 'broadcast', event: msg.event, payload: plain(msg.payload), meta: msg.meta ?? null }))
channel.on('presence', { event: 'sync' }, () => out({ kind: 'presence', event: 'sync', state: channel.presenceState() }))
channel.on('presence', { event: 'join' }, ({ key, newPresences }) => out({ kind: 'presence', event: 'join', key, presences: newPresences }))
channel.on('presence', { event: 'leave' }, ({ key, leftPresences }) => out({ kind: 'presence', event: 'leave', key, presences: leftPresences }))
bindings.forEach((b, i) => {
  channel.on('postgres_changes', b, (payload) => out({ kind: 'change', binding: i, payload }))
})
channel.subscribe((status, err) => out({ kind: 'status', status, error: err ? String(err.message || err) : null }))

const payloadOf = (cmd) => (cmd.bytes ? new Uint8Array(cmd.bytes).buffer : cmd.payload)
readline.createInterface({ input: process.stdin }).on('line', async (line) => {
  const cmd = JSON.parse(line)
  try {
    if (cmd.op === 'send') {
      out({ kind: 'sent', result: await channel.send({ type: 'broadcast', event: cmd.event, payload: payloadOf(cmd) }) })
    } else if (cmd.op === 'restBatch') {
      // A client that never connected: send() falls back to the REST batch endpoint.
      const idle = new RealtimeClient(endpoint, { params: { apikey: process.env.WALCAST_TEST_APIKEY }, transport: WebSocket, vsn })
      const quiet = console.warn
      console.warn = () => {}
      out({ kind: 'sent', result: await idle.channel(topic).send({ type: 'broadcast', event: cmd.event, payload: cmd.payload }) })
      console.warn = quiet
    } else if (cmd.op === 'httpSend') {
      out({ kind: 'sent', result: await channel.httpSend(cmd.event, payloadOf(cmd)) })
    } else if (cmd.op === 'track') {
      out({ kind: 'sent', result: await channel.track(cmd.payload) })
    } else if (cmd.op === 'untrack') {
      out({ kind: 'sent', result: await channel.untrack() })
    } else if (cmd.op === 'setAuth') {
      userToken = cmd.token
      await client.setAuth(cmd.token)
      out({ kind: 'sent', result: 'ok' })
    } else if (cmd.op === 'state') {
      out({ kind: 'state', state: channel.presenceState() })
    } else if (cmd.op === 'exit') {
      process.exit(0)
    }
  } catch (e) {
    out({ kind: 'sent', error: String(e.message || e) })
  }
})
setTimeout(() => { out({ kind: 'timeout' }); process.exit(2) }, 60000)

// Subscribes with the official @supabase/realtime-js client and prints one JSON line per event:
//   {"kind":"status","status":"SUBSCRIBED"} / {"kind":"system",...} / {"kind":"change","binding":i,"payload":{...}}
// Usage: node subscribe.mjs <endpoint> <vsn> <bindings-json> <expected-changes>
// (it gives up after WALCAST_TEST_CLIENT_SECS seconds, 30 by default)
import { RealtimeClient } from '@supabase/realtime-js'
import WebSocket from 'ws'

const [endpoint, vsn, bindingsJson, expected] = process.argv.slice(2)
const bindings = JSON.parse(bindingsJson)
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n')

const client = new RealtimeClient(endpoint, { params: { apikey: process.env.WALCAST_TEST_APIKEY }, transport: WebSocket, vsn })
const channel = client.channel('room')
let received = 0
bindings.forEach((b, i) => {
  channel.on('postgres_changes', b, (payload) => {
    out({ kind: 'change', binding: i, payload })
    received += 1
    if (received >= Number(expected)) {
      client.disconnect()
      process.exit(0)
    }
  })
})
channel.on('system', {}, (payload) => out({ kind: 'system', payload }))
channel.subscribe((status, err) => out({ kind: 'status', status, error: err ? String(err.message || err) : null }))
setTimeout(() => { out({ kind: 'timeout' }); process.exit(2) }, Number(process.env.WALCAST_TEST_CLIENT_SECS || 30) * 1000)

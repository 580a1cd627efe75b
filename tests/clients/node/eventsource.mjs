// A WHATWG EventSource (the `eventsource` package) following one URL, reconnecting by itself with
// Last-Event-ID; prints one JSON line per event: {"kind":"open"} / {"kind":"error"} /
// {"kind":"event","event":…,"id":…,"data":{…}}. Ends when stdin closes.
// Usage: node eventsource.mjs <url>
import { EventSource } from 'eventsource'

const out = (o) => process.stdout.write(JSON.stringify(o) + '\n')
const es = new EventSource(process.argv[2])
for (const name of ['insert', 'update', 'delete', 'truncate', 'gap', 'snapshot', 'snapshot-end']) {
  es.addEventListener(name, (e) => out({ kind: 'event', event: name, id: e.lastEventId, data: JSON.parse(e.data) }))
}
es.onopen = () => out({ kind: 'open' })
es.onerror = () => out({ kind: 'error', readyState: es.readyState })
process.stdin.on('end', () => { es.close(); process.exit(0) })
process.stdin.resume()

// The walcast inspector. It speaks only walcast's public protocols: the plain JSON WebSocket
// (`/v1/ws`: subscribe, live queries, publish, track) and `GET /v1/tables`, so it doubles as an
// example of them. Query parameters: `key` (a token), `table` (`schema.table` to subscribe to
// once connected), `filter`, `live`.
'use strict'

const $ = (id) => document.getElementById(id)
const params = new URLSearchParams(location.search)
const offered = window.WALCAST_KEYS || null
const MAX_ROWS = 200
const WINDOW_MS = 5 * 60 * 1000

const state = {
  ws: null,
  wanted: false,
  attempt: 0,
  key: '',
  tables: [],
  subs: new Map(), // channel → subscription
  room: null, // {name, me}
  presence: {},
  samples: [], // {t, ms}: receipt time and commit → receipt latency
}

function note(text) {
  $('log').textContent = text
}

function setStatus(kind, text) {
  const s = $('status')
  s.className = `status ${kind}`
  s.textContent = text
}

// ---- connection: one WebSocket, reconnected with backoff, subscriptions resumed by cursor ----

function wsURL() {
  const base = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/ws`
  return state.key ? `${base}?access_token=${encodeURIComponent(state.key)}` : base
}

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg))
}

function connect() {
  state.key = $('key').value.trim()
  state.wanted = true
  if (state.ws) state.ws.close()
  else open()
}

function open() {
  setStatus('wait', state.attempt ? `reconnecting (attempt ${state.attempt})` : 'connecting')
  const ws = new WebSocket(wsURL())
  state.ws = ws
  ws.onopen = () => {
    state.attempt = 0
    setStatus('on', 'connected')
    loadTables()
    for (const sub of state.subs.values()) subscribe(sub)
    if (state.room) joinRoom()
  }
  ws.onmessage = (e) => receive(JSON.parse(e.data))
  ws.onclose = (e) => {
    if (state.ws !== ws) return
    state.ws = null
    if (!state.wanted) return setStatus('off', 'disconnected')
    state.attempt += 1
    const wait = Math.min(10000, 250 * 2 ** state.attempt)
    setStatus('wait', `closed (${e.code || 'network'}); reconnecting in ${(wait / 1000).toFixed(1)} s`)
    setTimeout(() => { if (!state.ws) open() }, wait)
  }
}

// ---- published tables ----

async function loadTables() {
  const headers = state.key ? { Authorization: `Bearer ${state.key}` } : {}
  const r = await fetch('/v1/tables', { headers })
  const body = await r.json()
  if (!r.ok) return note(`tables: ${body.error || r.status}`)
  state.tables = body.tables
  const list = $('tables')
  const select = $('sub-table')
  list.replaceChildren()
  select.replaceChildren()
  for (const t of body.tables) {
    const name = `${t.schema}.${t.table}`
    const li = document.createElement('li')
    li.dataset.table = name
    li.append(name)
    const cols = document.createElement('small')
    cols.textContent = t.columns.map((c) => `${c.name}${c.primary_key ? ' (key)' : ''} ${c.type}`).join(', ')
    li.append(cols)
    li.onclick = () => { select.value = name; $('sub-filter').focus() }
    list.append(li)
    select.append(new Option(name, name))
  }
  const wanted = params.get('table')
  if (wanted && !state.subs.has(`table:${wanted}`) && body.tables.some((t) => `${t.schema}.${t.table}` === wanted)) {
    select.value = wanted
    $('sub-filter').value = params.get('filter') || ''
    $('sub-live').checked = params.get('live') === 'true'
    addSubscription()
  }
}

function tableOf(name) {
  return state.tables.find((t) => `${t.schema}.${t.table}` === name)
}

// ---- subscriptions: a change feed with old → new diffs, or a live query's result ----

function addSubscription() {
  const table = $('sub-table').value
  if (!table) return note('connect first: no table to subscribe to')
  const channel = `table:${table}`
  const old = state.subs.get(channel)
  if (old) {
    send({ type: 'unsubscribe', channel })
    old.el.remove()
    state.subs.delete(channel)
  }
  const live = $('sub-live').checked
  const sub = {
    channel,
    table,
    live,
    events: live ? '*' : $('sub-events').value,
    filter: $('sub-filter').value.trim(),
    select: $('sub-select').value.trim(),
    cursor: null,
    rows: new Map(), // key → the row as last seen
  }
  sub.el = card(sub)
  $('subscriptions').prepend(sub.el)
  state.subs.set(channel, sub)
  subscribe(sub)
}

function subscribe(sub) {
  const msg = { type: 'subscribe', id: sub.channel, channel: sub.channel, events: sub.events }
  if (sub.filter) msg.filter = sub.filter
  if (sub.select) msg.select = sub.select
  if (sub.live) {
    msg.live = true
    sub.rows.clear()
    renderLive(sub)
  } else if (sub.cursor) {
    msg.since = sub.cursor
  }
  send(msg)
}

function columnsOf(sub) {
  const t = tableOf(sub.table)
  const all = t ? t.columns.map((c) => c.name) : []
  return sub.select ? sub.select.split(',').map((c) => c.trim()) : all
}

function keyOf(sub, record) {
  const t = tableOf(sub.table)
  const keys = t ? t.columns.filter((c) => c.primary_key).map((c) => c.name) : ['id']
  return JSON.stringify(keys.map((k) => (record || {})[k]))
}

function card(sub) {
  const el = document.createElement('article')
  el.className = 'sub'
  el.dataset.channel = sub.channel
  const head = document.createElement('header')
  const what = `${sub.table}${sub.filter ? ` where ${sub.filter}` : ''}${sub.live ? ' (live query)' : ` · ${sub.events}`}`
  head.append(what, ' ')
  const status = document.createElement('span')
  status.className = 'sub-status'
  head.append(status, ' ')
  const close = document.createElement('button')
  close.className = 'quiet'
  close.textContent = 'unsubscribe'
  close.onclick = () => { send({ type: 'unsubscribe', channel: sub.channel }); el.remove(); state.subs.delete(sub.channel) }
  head.append(close)
  const scroll = document.createElement('div')
  scroll.className = 'scroll'
  const table = document.createElement('table')
  const thead = table.createTHead().insertRow()
  for (const c of [...(sub.live ? ['last change'] : ['at', 'type']), ...columnsOf(sub)]) {
    const th = document.createElement('th')
    th.textContent = c
    thead.append(th)
  }
  table.createTBody()
  scroll.append(table)
  el.append(head, scroll)
  return el
}

function text(v) {
  return v === undefined ? '' : v === null ? 'null' : typeof v === 'object' ? JSON.stringify(v) : String(v)
}

function cell(row, value, before) {
  const td = row.insertCell()
  if (before !== undefined && text(before) !== text(value)) {
    td.className = 'changed'
    const del = document.createElement('del')
    del.textContent = text(before)
    td.append(del, text(value))
  } else {
    td.textContent = text(value)
  }
  return td
}

function renderChange(sub, data) {
  const body = sub.el.querySelector('tbody')
  const key = keyOf(sub, data.record || data.old_record)
  const before = data.type === 'UPDATE' ? { ...(sub.rows.get(key) || {}), ...(data.old_record || {}) } : null
  const row = body.insertRow(0)
  row.className = data.type
  row.insertCell().textContent = new Date().toLocaleTimeString()
  const kind = row.insertCell()
  kind.className = 'kind'
  kind.textContent = data.type
  const shown = data.type === 'DELETE' ? data.old_record || {} : data.record || {}
  for (const c of columnsOf(sub)) {
    const had = before && Object.keys(before).length > 1 && c in before ? before[c] : undefined
    cell(row, shown[c], had)
  }
  if (data.type === 'DELETE') sub.rows.delete(key)
  else if (data.record) sub.rows.set(key, data.record)
  while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1)
}

function applyLive(sub, data) {
  const key = JSON.stringify(data.key)
  if (data.kind === 'leave') sub.rows.delete(key)
  else sub.rows.set(key, { kind: data.kind, record: data.record, before: data.kind === 'update' ? sub.rows.get(key) : null })
  renderLive(sub)
}

function renderLive(sub) {
  const body = sub.el.querySelector('tbody')
  body.replaceChildren()
  for (const { kind, record, before } of sub.rows.values()) {
    const row = body.insertRow()
    row.className = kind
    const k = row.insertCell()
    k.className = 'kind'
    k.textContent = kind === 'snapshot' ? 'row' : kind
    for (const c of columnsOf(sub)) cell(row, record[c], before ? before.record[c] : undefined)
  }
}

function subStatus(channel, textValue) {
  const sub = state.subs.get(channel)
  if (sub) sub.el.querySelector('.sub-status').textContent = textValue
}

// ---- broadcast and presence ----

function joinRoom() {
  if (state.room && state.ws && state.room.joined) {
    send({ type: 'unsubscribe', channel: state.room.name })
  }
  const name = $('room').value.trim()
  const me = $('me').value.trim() || `inspector-${Math.random().toString(36).slice(2, 7)}`
  $('me').value = me
  state.room = { name, me, joined: false }
  state.presence = {}
  renderPresence()
  send({ type: 'subscribe', id: `room:${name}`, channel: name, self: true, presence: true, presence_key: me })
}

function publish() {
  if (!state.room) joinRoom()
  let data
  try {
    data = JSON.parse($('bc-payload').value || 'null')
  } catch (e) {
    return note(`payload: ${e.message}`)
  }
  send({ type: 'publish', channel: state.room.name, event: $('bc-event').value.trim(), data })
}

function renderPresence() {
  const list = $('presence')
  list.replaceChildren()
  for (const [key, entry] of Object.entries(state.presence)) {
    const li = document.createElement('li')
    li.textContent = `${key} (${(entry.metas || []).length})`
    list.append(li)
  }
}

function presenceDiff({ joins = {}, leaves = {} }) {
  for (const [key, entry] of Object.entries(leaves)) {
    const gone = new Set((entry.metas || []).map((m) => m.phx_ref))
    const left = ((state.presence[key] || {}).metas || []).filter((m) => !gone.has(m.phx_ref))
    if (left.length) state.presence[key].metas = left
    else delete state.presence[key]
  }
  for (const [key, entry] of Object.entries(joins)) {
    const had = (state.presence[key] || {}).metas || []
    state.presence[key] = { metas: [...had, ...(entry.metas || [])] }
  }
  renderPresence()
}

// ---- what the server sends ----

function receive(msg) {
  const sub = state.subs.get(msg.channel)
  switch (msg.type) {
    case 'subscribed':
      if (sub) {
        sub.cursor = sub.cursor || msg.cursor
        subStatus(msg.channel, 'subscribed')
      } else if (state.room && msg.channel === state.room.name) {
        state.room.joined = true
        send({ type: 'track', channel: state.room.name, data: { name: state.room.me, online_at: new Date().toISOString() } })
      }
      break
    case 'change':
      if (!sub) break
      if (msg.cursor) sub.cursor = msg.cursor
      sample(msg.data.commit_timestamp)
      if (msg.data.snapshot) break
      renderChange(sub, msg.data)
      break
    case 'live':
      if (!sub) break
      if (msg.cursor) sub.cursor = msg.cursor
      if (msg.data.kind !== 'snapshot') sample(msg.data.commit_timestamp)
      applyLive(sub, msg.data)
      break
    case 'snapshot-end':
      subStatus(msg.channel, `${msg.rows} rows, then changes`)
      break
    case 'gap':
      subStatus(msg.channel, `gap (${msg.code}): ${msg.message}; starting over`)
      if (sub) { sub.cursor = null; send({ type: 'unsubscribe', channel: sub.channel }); subscribe(sub) }
      break
    case 'message': {
      const li = document.createElement('li')
      li.textContent = `${msg.event}: ${msg.binary ? `(binary) ${msg.binary}` : JSON.stringify(msg.data)}`
      $('messages').prepend(li)
      break
    }
    case 'presence_state':
      state.presence = msg.data || {}
      renderPresence()
      break
    case 'presence_diff':
      presenceDiff(msg.data || {})
      break
    case 'error':
      if (msg.channel) subStatus(msg.channel, `error: ${msg.message}`)
      note(`${msg.channel ? `${msg.channel}: ` : ''}${msg.message}`)
      break
  }
}

// ---- throughput and latency ----

function sample(commitTimestamp) {
  const now = Date.now()
  const at = Date.parse(commitTimestamp)
  state.samples.push({ t: now, ms: Number.isFinite(at) ? Math.max(0, now - at) : null })
}

function percentile(sorted, p) {
  if (!sorted.length) return null
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]
}

function drawChart() {
  const now = Date.now()
  while (state.samples.length && state.samples[0].t < now - WINDOW_MS) state.samples.shift()
  const lastSecond = state.samples.filter((s) => s.t >= now - 1000).length
  const recent = state.samples.filter((s) => s.t >= now - 60000 && s.ms !== null).map((s) => s.ms).sort((a, b) => a - b)
  $('rate').textContent = lastSecond
  $('p50').textContent = recent.length ? percentile(recent, 50) : '–'
  $('p99').textContent = recent.length ? percentile(recent, 99) : '–'
  const canvas = $('chart')
  const g = canvas.getContext('2d')
  const { width, height } = canvas
  g.clearRect(0, 0, width, height)
  const seconds = WINDOW_MS / 1000
  const counts = new Array(seconds).fill(0)
  const p99s = new Array(seconds / 10).fill(null)
  const buckets = p99s.map(() => [])
  for (const s of state.samples) {
    const age = Math.floor((now - s.t) / 1000)
    if (age < seconds) {
      counts[seconds - 1 - age] += 1
      if (s.ms !== null) buckets[Math.floor((seconds - 1 - age) / 10)].push(s.ms)
    }
  }
  buckets.forEach((b, i) => { p99s[i] = percentile(b.sort((x, y) => x - y), 99) })
  const maxCount = Math.max(1, ...counts)
  const maxMs = Math.max(1, ...p99s.filter((v) => v !== null))
  g.fillStyle = '#b8cdf8'
  counts.forEach((c, i) => {
    const h = (c / maxCount) * (height - 20)
    g.fillRect((i / seconds) * width, height - h, Math.max(1, width / seconds), h)
  })
  g.strokeStyle = '#d9480f'
  g.beginPath()
  let started = false
  p99s.forEach((v, i) => {
    if (v === null) return
    const x = ((i + 0.5) / p99s.length) * width
    const y = height - (v / maxMs) * (height - 20)
    if (started) g.lineTo(x, y)
    else g.moveTo(x, y)
    started = true
  })
  g.stroke()
  g.fillStyle = '#6b7385'
  g.font = '11px system-ui'
  g.fillText(`bars: changes/s (max ${maxCount}) · line: p99 ms per 10 s (max ${Math.round(maxMs)})`, 4, 12)
}

// ---- start ----

function start() {
  if (offered) {
    for (const [role, key] of Object.entries(offered)) {
      const b = document.createElement('button')
      b.type = 'button'
      b.className = 'quiet'
      b.textContent = `${role} key`
      b.onclick = () => { $('key').value = key; connect() }
      $('offered').append(b)
    }
  }
  $('key').value = params.get('key') || (offered ? offered.anon : '')
  $('connect-form').onsubmit = (e) => { e.preventDefault(); connect() }
  $('subscribe-form').onsubmit = (e) => { e.preventDefault(); addSubscription() }
  $('room-form').onsubmit = (e) => { e.preventDefault(); joinRoom() }
  $('send-form').onsubmit = (e) => { e.preventDefault(); publish() }
  setInterval(drawChart, 1000)
  drawChart()
  if ($('key').value || params.get('table')) connect()
}

start()

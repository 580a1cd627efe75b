// Headless Chromium (Debian's, driven by playwright-core) for browser tests. Commands on stdin,
// one JSON per line: {"op":"goto","url":…}, {"op":"eval","id":…,"js":…} (an expression, awaited
// in the page), {"op":"wait","id","js"} (until it is truthy), {"op":"click"|"fill"|"check"|
// "select","id","selector","value"?}, {"op":"screenshot","id","selector"?,"path"}, {"op":"exit"}. Prints one JSON line per event: what the page logs as JSON with a
// "kind" ({"kind":"row",…}), other console messages {"kind":"console","type","text"}, page errors
// {"kind":"pageerror"}, {"kind":"loaded"} and {"kind":"result","id","value"|"error"}.
// Usage: node browser.mjs   (CHROMIUM: the browser binary, default /usr/bin/chromium)
import readline from 'node:readline'
import { chromium } from 'playwright-core'

const out = (o) => process.stdout.write(JSON.stringify(o) + '\n')
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
  ],
})
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } })
page.on('console', (m) => {
  let v = null
  try { v = JSON.parse(m.text()) } catch {}
  out(v && typeof v === 'object' && v.kind ? v : { kind: 'console', type: m.type(), text: m.text() })
})
page.on('pageerror', (e) => out({ kind: 'pageerror', text: String(e) }))
for await (const line of readline.createInterface({ input: process.stdin })) {
  const c = JSON.parse(line)
  if (c.op === 'exit') break
  try {
    if (c.op === 'goto') {
      await page.goto(c.url)
      out({ kind: 'loaded', url: c.url })
    } else if (c.op === 'eval') {
      out({ kind: 'result', id: c.id, value: await page.evaluate(c.js) })
    } else if (c.op === 'wait') {
      // Until the expression is truthy in the page (30 s at most).
      const handle = await page.waitForFunction(c.js, null, { timeout: 30000 })
      out({ kind: 'result', id: c.id, value: await handle.jsonValue() })
    } else if (c.op === 'click') {
      await page.click(c.selector)
      out({ kind: 'result', id: c.id, value: true })
    } else if (c.op === 'fill') {
      await page.fill(c.selector, c.value)
      out({ kind: 'result', id: c.id, value: true })
    } else if (c.op === 'check') {
      await page.setChecked(c.selector, c.value)
      out({ kind: 'result', id: c.id, value: true })
    } else if (c.op === 'select') {
      await page.selectOption(c.selector, c.value)
      out({ kind: 'result', id: c.id, value: true })
    } else if (c.op === 'screenshot') {
      const target = c.selector ? page.locator(c.selector) : page
      await target.screenshot({ path: c.path })
      out({ kind: 'result', id: c.id, value: c.path })
    }
  } catch (e) {
    out({ kind: 'result', id: c.id, error: String(e) })
  }
}
// Open streams can hold the browser's close up: it is given a few seconds, then the process ends.
await Promise.race([browser.close(), new Promise((resolve) => setTimeout(resolve, 5000))])
process.exit(0)

// End-to-end: the live admin dashboard (/dashboard) in headless chromium against the real weir
// binary: a waiting room with visitors, a realtime app with a subscribed WebSocket and events
// published over the signed HTTP API, all of which the page must show from GET /api/v1/stats.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { withWeirAndBrowser, eventually, ADMIN_KEY, SCREENSHOTS, DESKTOP, PHONE } from './support.mjs';

let weir, browser;
withWeirAndBrowser((s) => ({ weir, browser } = s));

const ROOM = 'dash';
const CHANNEL = 'news';
const CHARTS = ['queue_length', 'admitted_per_minute', 'origin_latency_ms', 'connections', 'messages_per_second'];
let app, holder, publisher, published = 0, arrivals;

/** Publishes one event over the Pusher HTTP API, signed by hand (auth_version 1.0). */
async function trigger(channel, data) {
  const body = JSON.stringify({ name: 'tick', channels: [channel], data: JSON.stringify(data) });
  const p = `/apps/${app.id}/events`;
  const params = {
    auth_key: app.key,
    auth_timestamp: String(Math.floor(Date.now() / 1000)),
    auth_version: '1.0',
    body_md5: crypto.createHash('md5').update(body).digest('hex'),
  };
  const query = Object.keys(params).sort().map((k) => `${k}=${params[k]}`).join('&');
  const signature = crypto.createHmac('sha256', app.secret).update(`POST\n${p}\n${query}`).digest('hex');
  const r = await fetch(`${weir.base}${p}?${query}&auth_signature=${signature}`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body,
  });
  assert.equal(r.status, 200, `trigger: ${r.status} ${await r.text()}`);
  published++;
}

/** A new visitor in the room (no cookies: a new ticket each time). */
async function arrive() {
  const r = await fetch(`${weir.base}/r/${ROOM}`, { headers: { accept: 'application/json' }, redirect: 'manual' });
  assert.ok(r.status < 400, `entry: ${r.status}`);
  await r.arrayBuffer();
}

async function roomNow() {
  const r = await weir.admin('GET', `/rooms/${ROOM}`);
  assert.equal(r.status, 200, r.text);
  return r.json.stats;
}

/** The room, the app, its socket, the publisher and the arrivals: set up once, by the first test. */
let ready;
const setup = () => (ready ??= start());
async function start() {
  await weir.createRoom({ id: ROOM, name: 'Summer sale', origin: 'http://127.0.0.1:9', rate_per_minute: 6 });
  const created = await weir.admin('POST', '/apps', {});
  assert.equal(created.status, 201, created.text);
  app = created.json;
  // A browser page holds a WebSocket to the app, subscribed to the channel we publish on.
  holder = await browser.newContext();
  const page = await holder.newPage();
  const url = `${weir.base.replace(/^http/, 'ws')}/app/${app.key}?protocol=7&client=dashboard-test&version=1`;
  await page.evaluate((u) => new Promise((resolve, reject) => {
    const ws = new WebSocket(u);
    window.socket = ws;
    ws.onmessage = (m) => {
      const f = JSON.parse(m.data);
      if (f.event === 'pusher:connection_established') ws.send(JSON.stringify({ event: 'pusher:subscribe', data: { channel: 'news' } }));
      if (f.event === 'pusher_internal:subscription_succeeded') resolve();
    };
    ws.onerror = () => reject(new Error('socket error'));
    setTimeout(() => reject(new Error('not subscribed within 10 s')), 10000);
  }), url);
  // Events keep flowing and visitors keep arriving for a while, so the charts have a shape.
  await trigger(CHANNEL, { n: 0 });
  publisher = setInterval(() => trigger(CHANNEL, { n: published }).catch(() => {}), 400);
  await arrive();
  arrivals = (async () => {
    for (let i = 0; i < 13; i++) {
      await new Promise((r) => setTimeout(r, 600));
      await arrive();
    }
  })();
}

after(async () => {
  clearInterval(publisher);
  await arrivals?.catch(() => {});
  await holder?.close().catch(() => {});
});

/** Any stats request, with or without `?since=` (a glob would match only the bare path). */
const isStats = (url) => url.pathname === '/api/v1/stats';

/** A history answer joined to the one held: the totals and every room's series appended when
 * it follows on (`full: false`), the newest `keep` samples kept. */
function joinHistory(held, h, keep) {
  if (!held || h.full) return h;
  const n = held.t.length, m = h.t.length;
  const join = (a = [], b = []) => [...a, ...Array(n - a.length).fill(null), ...b, ...Array(m - b.length).fill(null)].slice(-keep);
  const out = { full: true, rooms: {} };
  for (const k of Object.keys(h)) if (!['rooms', 'full'].includes(k)) out[k] = join(held[k], h[k]);
  for (const id of new Set([...Object.keys(held.rooms), ...Object.keys(h.rooms)])) {
    const a = held.rooms[id] ?? {}, b = h.rooms[id] ?? {};
    out.rooms[id] = Object.fromEntries([...new Set([...Object.keys(a), ...Object.keys(b)])].map((k) => [k, join(a[k], b[k])]));
  }
  return out;
}

/** The dashboard in a fresh context, with a log of its stats requests and of any CSP report. */
async function openDashboard(opts = DESKTOP, hash = '') {
  await setup();
  const context = await browser.newContext(opts);
  const page = await context.newPage();
  // `last`: the page's last answer with its history joined to the ones before, as the page
  // must hold it (a whole history, then only the samples after the newest held).
  const log = { stats: [], problems: [], last: null, answers: [] };
  page.on('request', (r) => {
    const url = new URL(r.url());
    if (url.pathname === '/api/v1/stats') log.stats.push({ at: Date.now(), auth: r.headers().authorization, since: url.searchParams.get('since') });
  });
  page.on('response', async (r) => {
    if (new URL(r.url()).pathname !== '/api/v1/stats' || r.status() !== 200) return;
    const answer = await r.json().catch(() => null);
    if (!answer) return;
    log.answers.push({ url: r.url(), full: answer.history.full, points: answer.history.t.length });
    answer.history = joinHistory(log.last?.history, answer.history, answer.history_len);
    log.last = answer;
  });
  page.on('console', (m) => { if (/Content Security Policy|Refused to/i.test(m.text())) log.problems.push(m.text()); });
  page.on('pageerror', (e) => log.problems.push(`page error: ${e.message}`));
  await page.goto(`${weir.base}/dashboard${hash}`);
  return { context, page, log };
}

const state = (page) => page.getAttribute('html', 'data-state');
const chart = (page, id, attr) => page.getAttribute(`[data-chart="${id}"]`, attr);
const column = (page, table, n) => page.$$eval(`#${table} tbody tr:not(.empty)`,
  (rows, i) => rows.map((r) => r.cells[i]?.textContent.trim()), n);
const storedKey = (page) => page.evaluate(() => sessionStorage.getItem('weir-admin-key'));

test('the dashboard signs in with the admin key and shows the rooms, apps and top talkers live', async () => {
  const { context, page, log } = await openDashboard();
  assert.equal(await page.title(), 'weir dashboard');
  assert.equal((await page.textContent('h1')).trim(), 'weir dashboard');
  assert.equal(await state(page), 'signed-out');
  assert.ok(await page.isVisible('#signin'), 'the key form is shown');
  assert.equal(await page.getAttribute('#key', 'type'), 'password');
  assert.equal((await page.textContent('label[for="key"]')).trim(), 'Admin key');
  assert.ok(await page.isHidden('#dashboard'), 'no dashboard before signing in');
  assert.equal(log.stats.length, 0, 'no stats request without a key');

  // A wrong key is refused and the form stays.
  await page.fill('#key', 'not-the-admin-key');
  await page.click('button:has-text("Show dashboard")');
  await page.waitForSelector('#signin-error:not([hidden])');
  assert.equal((await page.textContent('#signin-error')).trim(), 'That key was refused');
  assert.equal(await state(page), 'signed-out');
  assert.equal(await storedKey(page), null, 'a refused key is not kept');

  // The admin key: live, polled with a bearer header, never in the URL.
  await page.fill('#key', ADMIN_KEY);
  await page.press('#key', 'Enter');
  await page.waitForSelector('html[data-state="live"]', { timeout: 10000 });
  assert.ok(await page.isHidden('#signin'));
  assert.equal(await storedKey(page), ADMIN_KEY);
  assert.equal(log.stats.at(-1).auth, `Bearer ${ADMIN_KEY}`);
  assert.ok(!page.url().includes(ADMIN_KEY), `key in the URL: ${page.url()}`);

  // Every chart is an image with its latest value, plotted from the history.
  await arrivals;
  for (const id of CHARTS) {
    const box = `[data-chart="${id}"]`;
    assert.equal(await page.getAttribute(box, 'role'), 'img');
    assert.ok(await page.$(`${box} svg polyline, ${box} svg path, ${box} svg circle, ${box} svg text`), `${id} drawn`);
  }
  let expected;
  await eventually(async () => {
    expected = (await roomNow()).queue_length;
    return expected >= 1 && (await chart(page, 'queue_length', 'data-latest')) === String(expected);
  }, 15000, 'queue length chart shows the room\'s queue length');
  assert.match(await chart(page, 'queue_length', 'aria-label'), new RegExp(`latest ${expected}\\b`));
  assert.ok(Number(await chart(page, 'queue_length', 'data-points')) >= 1);
  await eventually(async () => Number(await chart(page, 'connections', 'data-latest')) >= 1, 15000, 'connections chart ≥ 1');
  await eventually(async () => Number(await chart(page, 'messages_per_second', 'data-latest')) > 0, 15000, 'messages per second > 0');
  // No probe configured: the latency chart has no points and says so.
  assert.equal(await chart(page, 'origin_latency_ms', 'data-points'), '0');
  assert.equal(await chart(page, 'origin_latency_ms', 'data-latest'), null);
  assert.match(await page.textContent('[data-chart="origin_latency_ms"] svg'), /no data/);

  // The tables.
  await eventually(async () => (await column(page, 'rooms', 0)).includes(ROOM), 10000, 'rooms table lists the room');
  const roomRow = await page.$$eval('#rooms tbody tr', (rows, id) => rows.find((r) => r.cells[0].textContent === id)?.textContent, ROOM);
  assert.match(roomRow, /Summer sale/);
  assert.match(roomRow, /open/);
  await eventually(async () => (await column(page, 'apps', 0)).some((t) => t.startsWith(app.id)), 10000, 'apps table lists the app');
  await eventually(async () => {
    const rows = await page.$$eval('#top-channels tbody tr:not(.empty)', (rs) => rs.map((r) => [...r.cells].map((c) => c.textContent.trim())));
    return rows.some(([a, ch, n]) => a === app.id && ch === CHANNEL && Number(n) >= 1);
  }, 15000, 'top channels lists the channel published on');
  await eventually(async () => (await column(page, 'top-apps', 0)).includes(app.id), 10000, 'top apps lists the app');
  await eventually(async () => (await column(page, 'top-ips', 0)).includes('127.0.0.1'), 10000, 'top IPs lists 127.0.0.1');

  // Polling: one request at a time, about 2 s apart (a timeout after each answer).
  const polls = log.stats.filter((s) => s.auth === `Bearer ${ADMIN_KEY}`);
  assert.ok(polls.length >= 2, `polls: ${polls.length}`);
  for (let i = 1; i < polls.length; i++) assert.ok(polls[i].at - polls[i - 1].at >= 1800, `poll gap ${polls[i].at - polls[i - 1].at} ms`);
  // The first poll takes the whole history; the next ones only the samples after the newest held.
  assert.equal(polls[0].since, null);
  assert.ok(polls.slice(1).every((p) => /^\d+$/.test(p.since)), `since: ${JSON.stringify(polls.map((p) => p.since))}`);
  assert.equal(log.answers[0].full, true);
  assert.ok(log.answers.slice(1).every((a) => a.full === false && a.points <= 4), `answers: ${JSON.stringify(log.answers)}`);

  // The screenshot of the live dashboard (with a few seconds of history on the charts).
  await eventually(async () => Number(await chart(page, 'queue_length', 'data-points')) >= 12, 20000, 'some history');
  await page.waitForTimeout(2200); // one more poll, so the screenshot shows the newest sample
  mkdirSync(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SCREENSHOTS, 'dashboard.png') });

  // A reload keeps the key (sessionStorage) and goes straight back to live.
  await page.reload();
  await page.waitForSelector('html[data-state="live"]', { timeout: 10000 });
  assert.ok(await page.isHidden('#signin'), 'no key form after a reload');

  // One room's series.
  const options = await page.$$eval('#room option', (os) => os.map((o) => [o.value, o.textContent]));
  assert.deepEqual(options[0], ['', 'All rooms']);
  assert.ok(options.some(([v]) => v === ROOM), `room options: ${JSON.stringify(options)}`);
  // What a chart must show for a series of the page's last answer: its non-null points.
  const plotted = (series) => {
    const values = series.filter((v) => v !== null);
    return { points: String(values.length), latest: values.length ? String(values.at(-1)) : null };
  };
  const shows = async (id, series) => {
    const want = plotted(series);
    return (await chart(page, id, 'data-points')) === want.points && (await chart(page, id, 'data-latest')) === want.latest;
  };
  await eventually(async () => log.last && await shows('queue_length', log.last.history.queue_length), 10000, 'all rooms\' series');
  await page.selectOption('#room', ROOM);
  assert.match(await page.textContent('[data-chart="queue_length"]'), new RegExp(`room ${ROOM}`));
  await eventually(async () => {
    const h = log.last.history, mine = h.rooms[ROOM];
    return await shows('queue_length', mine.queue_length) && await shows('admitted_per_minute', mine.admitted_per_minute) &&
      await shows('origin_latency_ms', mine.origin_latency_ms) &&
      // The realtime charts stay on the totals.
      await shows('connections', h.connections) && await shows('messages_per_second', h.messages_per_second);
  }, 10000, 'the room\'s own series');
  await eventually(async () => (await chart(page, 'queue_length', 'data-latest')) === String((await roomNow()).queue_length),
    15000, 'the room\'s queue length');
  assert.equal(await page.inputValue('#room'), ROOM, 'the choice stays across polls');

  // Sign out: back to the form, the key forgotten, polling stopped.
  await page.click('button:has-text("Sign out")');
  assert.equal(await state(page), 'signed-out');
  assert.ok(await page.isVisible('#key'));
  assert.equal(await storedKey(page), null);
  assert.equal(await page.$$eval('#rooms tbody tr:not(.empty)', (r) => r.length), 0, 'no data left on the page');
  const before = log.stats.length;
  await page.waitForTimeout(2500);
  assert.equal(log.stats.length, before, 'no stats requests after signing out');
  await page.reload();
  assert.equal(await state(page), 'signed-out', 'still signed out after a reload');

  assert.deepEqual(log.problems, [], 'no CSP violations or script errors');
  await context.close();
});

test('a lost connection shows a retrying notice and backs off, then the dashboard recovers', async () => {
  const { context, page, log } = await openDashboard();
  await page.fill('#key', ADMIN_KEY);
  await page.press('#key', 'Enter');
  await page.waitForSelector('html[data-state="live"]', { timeout: 10000 });
  await eventually(async () => (await column(page, 'rooms', 0)).includes(ROOM), 10000, 'rooms shown');

  await page.route(isStats, (route) => route.abort('connectionrefused'));
  await page.waitForSelector('html[data-state="retrying"]', { timeout: 5000 });
  const failedAt = log.stats.at(-1).at;
  assert.match(await page.textContent('#notice'), /connection lost, retrying/i);
  assert.ok(await page.isVisible('#notice'));
  assert.ok((await column(page, 'rooms', 0)).includes(ROOM), 'the last data stays on screen');

  // A server error backs off the same way.
  await page.unroute(isStats);
  await page.route(isStats, (route) => route.fulfill({
    status: 503, contentType: 'application/json', body: '{"error":{"code":"unavailable","message":"try later"}}',
  }));
  await eventually(() => log.stats.length >= 2 && log.stats.at(-1).at > failedAt, 15000, 'a retry');
  const retryGap = log.stats.at(-1).at - failedAt;
  assert.ok(retryGap >= 9000, `retried after ${retryGap} ms, not 10 s`);
  await page.waitForTimeout(200);
  assert.equal(await state(page), 'retrying');
  assert.match(await page.textContent('#notice'), /connection lost, retrying/i);

  await page.unroute(isStats);
  await page.waitForSelector('html[data-state="live"]', { timeout: 15000 });
  assert.ok(await page.isHidden('#notice'), 'the notice goes away');

  // A key that stops working (a 401 while live) returns to the form.
  await page.route(isStats, (route) => route.fulfill({
    status: 401, contentType: 'application/json', body: '{"error":{"code":"unauthorized","message":"bad key"}}',
  }));
  await page.waitForSelector('html[data-state="signed-out"]', { timeout: 5000 });
  assert.equal((await page.textContent('#signin-error')).trim(), 'That key was refused');
  assert.equal(await storedKey(page), null);
  assert.deepEqual(log.problems, []);
  await context.close();
});

test('on a phone the charts stack and nothing is wider than the screen; a #key= fragment signs in and is removed', async () => {
  const { context, page, log } = await openDashboard(PHONE, `#key=${encodeURIComponent(ADMIN_KEY)}`);
  await page.waitForSelector('html[data-state="live"]', { timeout: 10000 });
  assert.equal(new URL(page.url()).hash, '', 'the fragment is removed');
  assert.equal(await storedKey(page), ADMIN_KEY);
  await eventually(async () => (await column(page, 'rooms', 0)).includes(ROOM), 10000, 'rooms shown');
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth), 'no horizontal scroll');
  const boxes = [];
  for (const id of CHARTS) boxes.push(await page.locator(`[data-chart="${id}"]`).boundingBox());
  for (let i = 1; i < boxes.length; i++) {
    assert.equal(Math.round(boxes[i].x), Math.round(boxes[0].x), 'one column');
    assert.ok(boxes[i].y >= boxes[i - 1].y + boxes[i - 1].height, 'stacked');
  }
  assert.ok(boxes[0].width <= 390);
  assert.deepEqual(log.problems, []);
  await context.close();
});

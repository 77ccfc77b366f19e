// End-to-end: the waiting page in a real browser (Debian chromium via playwright-core) against
// the real weir binary, with an origin that verifies every admission token with weir's JWKS.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { withWeirAndBrowser, startVerifyingOrigin, visitor, eventually } from './support.mjs';

let weir, browser;
withWeirAndBrowser((s) => ({ weir, browser } = s));

async function roomWithOrigin(id, spec = {}) {
  const origin = await startVerifyingOrigin(weir.base, id);
  await weir.createRoom({ id, name: `Room ${id}`, origin: origin.base, rate_per_minute: 0, ...spec });
  return origin;
}

test('the script writes its live phrases in the page\'s language, which it carries for every language', async () => {
  const origin = await roomWithOrigin('sprache', { branding: { language: 'de' } });
  const visitors = [];
  for (let i = 0; i < 3; i++) visitors.push(await visitor(browser, `${weir.base}/r/sprache`));
  const last = visitors[2];
  const config = await last.page.evaluate(() => JSON.parse(document.getElementById('weir-config').textContent));
  assert.equal(config.lang, 'de');
  assert.equal(config.t, undefined, 'the phrases come with the cached script, not with every page');
  await eventually(() => last.log.sockets.some((s) => s.subscribed), 10000, 'socket subscribed');
  // One admission a minute: the third in line (two ahead) is told "about 2 minutes", in German,
  // by the script, live, when the new rate is broadcast.
  await weir.patchRoom('sprache', { rate_per_minute: 1 });
  await eventually(async () => (await last.page.textContent('#eta')).trim() === 'etwa 2 Minuten', 15000, 'the German ETA');
  assert.equal(last.log.navigations.filter((u) => u.includes('/r/sprache')).length, 1, 'written by the script, not by a reload');
  for (const v of visitors) await v.context.close();
  await origin.close();
});

test('visitors see their positions move live over the WebSocket and reach the origin with a verified token', async () => {
  const origin = await roomWithOrigin('live');
  const visitors = [];
  for (let i = 0; i < 4; i++) visitors.push(await visitor(browser, `${weir.base}/r/live`));
  // Each page shows its own position (tickets 1..4, nobody admitted yet).
  for (const [i, v] of visitors.entries()) {
    assert.equal((await v.page.textContent('#position')).trim(), String(i));
    v.rank = await v.page.evaluate(() => JSON.parse(document.getElementById('weir-config').textContent).rank);
    assert.equal(v.rank, i + 1);
  }
  // Every page holds one subscribed socket to weir's internal app before the queue moves.
  for (const v of visitors) {
    await eventually(() => v.log.sockets.some((s) => s.subscribed && s.frames.some((f) => f.payload.includes('subscription_succeeded'))),
      10000, 'socket subscribed');
    assert.match(v.log.sockets[0].url, /\/app\/weir-internal\?protocol=7/);
    // The page told weir which socket is its own (presence for abandonment detection).
    await eventually(() => v.log.socketRegistrations.includes(204), 10000, 'socket registered');
  }
  // Admit one visitor every 2 s: the last page must see its position count down without reloads.
  await weir.patchRoom('live', { rate_per_minute: 30 });
  for (const v of visitors) {
    await eventually(() => v.page.url().startsWith(origin.base), 30000, 'redirected to the origin');
    await v.page.waitForSelector('#verified');
  }
  assert.equal(origin.visits.length, 4, 'each visitor verified once by the origin');
  assert.deepEqual(origin.visits.map((v) => v.ticket).sort(), [1, 2, 3, 4]);
  // Each page started at its position and counted down live, never up (the admission pace
  // decides which values show; on a loaded machine one step may cover two places).
  let movedLive = 0;
  for (const [i, v] of visitors.entries()) {
    const seen = [...new Set(v.log.positions.map((p) => p.trim()))].map(Number);
    assert.equal(seen[0], i, `first position on page ${i}: ${seen}`);
    for (let k = 1; k < seen.length; k++) assert.ok(seen[k] < seen[k - 1], `positions only go down: ${seen}`);
    if (seen.length >= 2) movedLive++;
  }
  assert.equal(movedLive, 3, 'positions moved live on every page behind the first');
  for (const v of visitors) {
    // One page load in the room, then the origin: positions changed without a reload.
    assert.equal(v.log.navigations.filter((u) => u.includes('/r/live')).length, 1, `navigations: ${v.log.navigations}`);
    // While the socket was up the page never polled: the only status request is the one
    // made when the counter passed its ticket (a retry at most).
    const whileUp = v.log.statusRequests.filter((r) => r.socketUp);
    assert.ok(whileUp.length <= 2, `status requests while the socket was up: ${JSON.stringify(v.log.statusRequests)}`);
    for (const r of whileUp) {
      assert.ok(r.serving !== null && r.serving >= v.rank, `status fetched only once the broadcast counter passed the page's place: ${JSON.stringify(r)} rank ${v.rank}`);
    }
    await v.context.close();
  }
  await origin.close();
});

test('with WebSockets blocked the page falls back to polling and still gets the visitor through', async () => {
  const origin = await roomWithOrigin('fallback');
  const v = await visitor(browser, `${weir.base}/r/fallback`, { block_websockets: true });
  const other = await visitor(browser, `${weir.base}/r/fallback`, { block_websockets: true });
  await eventually(() => other.log.statusRequests.length >= 1, 10000, 'polling started');
  await weir.patchRoom('fallback', { rate_per_minute: 60 });
  for (const x of [v, other]) {
    await eventually(() => x.page.url().startsWith(origin.base), 40000, 'redirected to the origin by polling');
    await x.page.waitForSelector('#verified');
    assert.ok(x.log.statusRequests.length >= 1);
    assert.ok(!x.log.sockets.some((s) => s.frames.some((f) => f.payload.includes('subscription_succeeded'))), 'no socket got through');
    await x.context.close();
  }
  assert.equal(origin.visits.length, 2);
  await origin.close();
});

test('a paused room shows the paused page live, and the waiting page again when it resumes', async () => {
  const origin = await roomWithOrigin('pausing');
  const v = await visitor(browser, `${weir.base}/r/pausing`);
  await v.page.waitForSelector('#position');
  await eventually(() => v.log.sockets.some((s) => s.subscribed), 10000, 'socket subscribed');
  await weir.patchRoom('pausing', { state: 'paused' });
  await v.page.waitForSelector('#paused', { timeout: 10000 });
  assert.match(await v.page.textContent('#paused'), /paused/);
  await weir.patchRoom('pausing', { state: 'open', rate_per_minute: 600 });
  await eventually(() => v.page.url().startsWith(origin.base), 15000, 'admitted after resuming');
  await v.page.waitForSelector('#verified');
  await v.context.close();
  await origin.close();
});

test('a scheduled room counts down, then admits', async () => {
  const startsAt = new Date(Date.now() + 6000).toISOString();
  const origin = await roomWithOrigin('countdown', { starts_at: startsAt, rate_per_minute: 600 });
  const v = await visitor(browser, `${weir.base}/r/countdown`);
  const first = (await v.page.textContent('#countdown')).trim();
  assert.match(first, /^0:00:0[0-6]$/);
  await eventually(async () => {
    const now = (await v.page.textContent('#countdown').catch(() => first)).trim();
    return now !== first;
  }, 5000, 'countdown ticking');
  await eventually(() => v.page.url().startsWith(origin.base), 20000, 'admitted after the start');
  await v.page.waitForSelector('#verified');
  assert.equal(origin.visits.length, 1);
  await v.context.close();
  await origin.close();
});

test('without JavaScript the page refreshes itself and still admits', async () => {
  const origin = await roomWithOrigin('nojs', { rate_per_minute: 0 });
  const v = await visitor(browser, `${weir.base}/r/nojs`, { javaScriptEnabled: false });
  assert.equal(v.log.sockets.length, 0);
  const refresh = await v.page.$('noscript');
  assert.ok(refresh, 'noscript meta refresh present');
  await weir.patchRoom('nojs', { rate_per_minute: 600 });
  // The meta refresh (5-30 s) reloads the page, which then redirects to the origin.
  await eventually(() => v.page.url().startsWith(origin.base), 40000, 'admitted by meta refresh');
  await v.context.close();
  await origin.close();
});

test('when the page script fails to load, the page reloads itself at its refresh pace and still admits', async () => {
  const origin = await roomWithOrigin('noscriptfile', { rate_per_minute: 0 });
  const v = await visitor(browser, `${weir.base}/r/noscriptfile`, { block_script: true });
  const refreshMs = await v.page.evaluate(() => JSON.parse(document.getElementById('weir-config').textContent).refresh_ms);
  assert.equal(refreshMs, 15000, 'no estimate yet: the 15-second pace');
  assert.equal(v.log.sockets.length, 0, 'no script, no socket');
  await weir.patchRoom('noscriptfile', { rate_per_minute: 600 });
  // Nothing else can navigate this page (scripting is on, so the <noscript> refresh is inert):
  // the script's error handler reloads it after refresh_ms, and the reload redirects.
  await eventually(() => v.page.url().startsWith(origin.base), 40000, 'admitted after the reload');
  await v.context.close();
  await origin.close();
});

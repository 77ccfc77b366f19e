// Screenshots of every page state, desktop and phone, into docs/screenshots/ (looked at by a
// person; the README shows the waiting page). Each also asserts what the page must contain.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { withWeirAndBrowser, screenshots, DESKTOP, PHONE } from './support.mjs';

let weir, browser;
withWeirAndBrowser((s) => ({ weir, browser } = s));

const branding = {
  title: 'Summer sale',
  text: 'Our biggest sale of the year. Thanks for waiting: we let people in at a pace the shop can serve.',
  primary_color: '#c2410c',
  background_color: '#fff7ed',
};

/** A room with `n` visitors already queued, so the screenshot visitor has people ahead. */
async function queued(id, spec, n) {
  await weir.createRoom({ id, name: `Room ${id}`, origin: 'http://127.0.0.1:9', rate_per_minute: 0, ...spec });
  for (let i = 0; i < n; i++) await fetch(`${weir.base}/r/${id}`, { headers: { accept: 'application/json' } });
}

async function cookiesFor(id) {
  const r = await fetch(`${weir.base}/r/${id}`, { headers: { accept: 'application/json' }, redirect: 'manual' });
  const set = r.headers.getSetCookie();
  const { hostname } = new URL(weir.base);
  return set.map((c) => { const [name, value] = c.split(';')[0].split('='); return { name, value, domain: hostname, path: '/' }; });
}

test('waiting page (branded; and in German)', async () => {
  await queued('shots-waiting', { branding }, 150);
  const cookies = await cookiesFor('shots-waiting');
  await weir.patchRoom('shots-waiting', { rate_per_minute: 40 });
  await screenshots(browser, 'waiting', { url: `${weir.base}/r/shots-waiting`, cookies });
  await screenshots(browser, 'waiting-de', { url: `${weir.base}/r/shots-waiting`, cookies, language: 'de-DE' });
  const ctx = await browser.newContext({ ...PHONE, locale: 'fr-FR' });
  await ctx.addCookies(cookies);
  const page = await ctx.newPage();
  await page.goto(`${weir.base}/r/shots-waiting`);
  assert.equal(await page.getAttribute('html', 'lang'), 'fr');
  assert.match(await page.textContent('main'), /Personnes devant vous/);
  assert.ok(await page.$('[aria-live="polite"]'), 'live region');
  // Phone width: nothing wider than the screen.
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth));
  await ctx.close();
});

test('scheduled, paused, closed and error pages', async () => {
  await queued('shots-scheduled', { starts_at: new Date(Date.now() + 2 * 3600e3 + 14 * 60e3).toISOString() }, 0);
  await screenshots(browser, 'scheduled', { url: `${weir.base}/r/shots-scheduled` });

  await queued('shots-paused', {}, 57);
  const cookies = await cookiesFor('shots-paused');
  await weir.patchRoom('shots-paused', { state: 'paused' });
  await screenshots(browser, 'paused', { url: `${weir.base}/r/shots-paused`, cookies });

  await queued('shots-closed', { state: 'closed' }, 0);
  await screenshots(browser, 'closed', { url: `${weir.base}/r/shots-closed` });

  await screenshots(browser, 'error-not-found', { url: `${weir.base}/r/no-such-room` });
  const r = await fetch(`${weir.base}/r/no-such-room`);
  assert.equal(r.status, 404);
});

test('passthrough redirect page', async () => {
  await queued('shots-pass', { state: 'passthrough', branding: { title: 'Summer sale', primary_color: '#c2410c' } }, 0);
  const r = await fetch(`${weir.base}/r/shots-pass`, { redirect: 'manual' });
  assert.equal(r.status, 302);
  // The 302 body is the redirect page; shown without its meta refresh so it can be captured.
  const html = (await r.text()).replace(/<meta http-equiv="refresh"[^>]*>/, '');
  assert.match(html, /id="continue"/);
  await screenshots(browser, 'passthrough', { html });
});

test('desktop and phone sizes are what the README says', () => {
  assert.equal(DESKTOP.viewport.width, 1280);
  assert.equal(PHONE.viewport.width, 390);
});

// pusher-js's browser build in a real headless Chromium (driven by playwright-core)
// against weir. Channel auth is computed in Node with the npm `pusher` SDK and
// exposed to the page, as an app's auth endpoint would.
//
// Needs a Chromium binary: $CHROMIUM_PATH, else /usr/bin/chromium (Debian's
// `chromium` package, which scripts/test-clients installs when it can). Without
// one (or with WEIR_BROWSER_TESTS=0), every case here is reported as skipped,
// never as passed.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { startWeir, uniq } from './support/weir.mjs';

const require = createRequire(import.meta.url);
const chromiumPath = [process.env.CHROMIUM_PATH, '/usr/bin/chromium', '/usr/bin/chromium-browser']
  .find((p) => p && existsSync(p));
const skip = process.env.WEIR_BROWSER_TESTS === '0'
  ? 'browser tests turned off (WEIR_BROWSER_TESTS=0)'
  : chromiumPath ? false : 'no Chromium binary (set CHROMIUM_PATH or apt-get install chromium)';
const pusherWeb = path.join(path.dirname(require.resolve('pusher-js/package.json')), 'dist', 'web', 'pusher.min.js');

describe('pusher-js in headless Chromium', () => {
  let weir, app, sdk, browser, page;

  before(async () => {
    if (skip) return;
    const { chromium } = await import('playwright-core');
    browser = await chromium.launch({ executablePath: chromiumPath, args: ['--no-sandbox'] });
    page = await browser.newPage();
    weir = await startWeir();
    app = await weir.createApp({ client_events: true });
    sdk = weir.server(app);
    await page.exposeFunction('weirAuthorize', (socketId, channelName) => (
      channelName.startsWith('presence-')
        ? sdk.authorizeChannel(socketId, channelName, { user_id: 'browser-user', user_info: { ua: 'chromium' } })
        : sdk.authorizeChannel(socketId, channelName)
    ));
    await page.setContent('<!doctype html><title>weir browser test</title>');
    await page.addScriptTag({ path: pusherWeb });
    await page.evaluate(({ key, port }) => {
      window.events = [];
      window.client = new window.Pusher(key, {
        wsHost: '127.0.0.1', wsPort: port, forceTLS: false, enabledTransports: ['ws'], cluster: 'mt1',
        disableStats: true,
        channelAuthorization: {
          customHandler: ({ socketId, channelName }, cb) => {
            window.weirAuthorize(socketId, channelName).then((a) => cb(null, a), (e) => cb(e, null));
          },
        },
      });
    }, { key: app.key, port: weir.port });
  });
  after(async () => {
    await browser?.close();
    await weir?.stop();
  });

  const pageWait = (fn, arg) => page.waitForFunction(fn, arg, { timeout: 10_000, polling: 25 });

  it('connects from the browser', { skip }, async () => {
    await pageWait(() => window.client.connection.state === 'connected');
    const id = await page.evaluate(() => window.client.connection.socket_id);
    assert.match(id, /^\d+\.\d+$/);
  });

  for (const prefix of ['public-', 'private-', 'presence-']) {
    it(`subscribes to a ${prefix.replace(/-$/, '')} channel and receives an SDK trigger`, { skip }, async () => {
      const name = uniq(prefix === 'public-' ? 'browser-' : `${prefix}browser-`);
      await page.evaluate((n) => {
        const ch = window.client.subscribe(n);
        ch.bind('pusher:subscription_succeeded', () => { ch.ok = true; });
        ch.bind('hello', (d) => window.events.push({ channel: n, data: d }));
      }, name);
      await pageWait((n) => window.client.channel(n).ok === true, name);
      await sdk.trigger(name, 'hello', { from: 'sdk', to: name });
      const got = await pageWait((n) => window.events.find((e) => e.channel === n), name);
      assert.deepEqual((await got.jsonValue()).data, { from: 'sdk', to: name });
    });
  }
});

// Shared helpers for the browser and proxy-integration tests: run the real weir binary on an
// ephemeral port, drive its admin API, run a small origin that verifies admission tokens
// against weir's JWKS (jose), launch Debian chromium, and poll with deadlines.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import http from 'node:http';
import { fileURLToPath } from 'node:url';
import { createRemoteJWKSet, jwtVerify } from 'jose';
import { before, after } from 'node:test';

export const ADMIN_KEY = 'browser-test-admin-key-0123456789';
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const SCREENSHOTS = path.join(ROOT, 'docs/screenshots');

export function weirBin() {
  if (process.env.WEIR_BIN) return process.env.WEIR_BIN;
  const target = process.env.CARGO_TARGET_DIR || path.join(ROOT, 'target');
  return path.join(target, 'debug/weir');
}

/** Starts `weir serve` on 127.0.0.1:0 in a temp data dir; resolves once it listens. */
export async function startWeir(extraEnv = {}) {
  const dataDir = mkdtempSync(path.join(tmpdir(), 'weir-browser-'));
  const child = spawn(weirBin(), ['serve', '--listen', '127.0.0.1:0', '--data-dir', dataDir], {
    env: { ...process.env, WEIR_ADMIN_KEY: ADMIN_KEY, WEIR_LOG: process.env.WEIR_LOG || 'warn', ...extraEnv },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const base = await new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error('weir did not start within 20 s')), 20000);
    child.on('exit', (code) => reject(new Error(`weir exited early with ${code}`)));
    child.stdout.on('data', (d) => {
      buf += d;
      const m = buf.match(/weir: listening on (http:\/\/[0-9.:]+)/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
  });
  child.stdout.resume();
  const weir = {
    base,
    child,
    async admin(method, p, body, { raw = false } = {}) {
      const headers = { authorization: `Bearer ${ADMIN_KEY}` };
      let payload;
      if (body !== undefined) {
        payload = raw ? body : JSON.stringify(body);
        headers['content-type'] = raw ? 'text/plain' : 'application/json';
      }
      const r = await fetch(`${base}/api/v1${p}`, { method, headers, body: payload });
      const text = await r.text();
      let json = null;
      try { json = text ? JSON.parse(text) : null; } catch { /* not json */ }
      return { status: r.status, json, text };
    },
    async createRoom(spec) {
      const r = await weir.admin('POST', '/rooms', spec);
      if (r.status !== 201) throw new Error(`create room: ${r.status} ${r.text}`);
      return r.json;
    },
    async patchRoom(id, patch) {
      const r = await weir.admin('PATCH', `/rooms/${id}`, patch);
      if (r.status !== 200) throw new Error(`patch room: ${r.status} ${r.text}`);
      return r.json;
    },
    async stop() {
      if (child.exitCode === null) {
        child.kill('SIGTERM');
        await new Promise((r) => { child.once('exit', r); setTimeout(r, 5000); });
        if (child.exitCode === null) child.kill('SIGKILL');
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
  return weir;
}

/**
 * An origin that accepts only admission tokens (query `weir_token` or cookie) that verify
 * against weir's JWKS: ES256, issuer = weir's URL, audience = this origin, room claim.
 * Records each verified visit.
 */
export async function startVerifyingOrigin(weirBase, room) {
  const jwks = createRemoteJWKSet(new URL(`${weirBase}/.well-known/jwks.json`));
  const visits = [];
  let base;
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, 'http://x');
    const cookie = (req.headers.cookie || '').split(';').map((s) => s.trim().split('='))
      .find(([k]) => k === 'weir_token');
    const token = url.searchParams.get('weir_token') || (cookie && cookie[1]);
    if (url.pathname === '/favicon.ico') { res.writeHead(404); return res.end(); }
    try {
      if (!token) throw new Error('no token');
      const { payload, protectedHeader } = await jwtVerify(token, jwks, {
        algorithms: ['ES256'], issuer: weirBase, audience: base,
      });
      if (payload.room !== room) throw new Error(`token for room ${payload.room}`);
      visits.push({ sub: payload.sub, ticket: payload.ticket, kid: protectedHeader.kid, path: url.pathname });
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      res.end(`<!doctype html><title>Origin</title><h1 id="origin">Welcome to the shop</h1>` +
        `<p id="verified" data-ticket="${payload.ticket}">token verified with the JWKS, ticket ${payload.ticket}</p>`);
    } catch (e) {
      res.writeHead(401, { 'content-type': 'text/plain' });
      res.end(`refused: ${e.message}`);
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${server.address().port}`;
  return { base, visits, close: () => new Promise((r) => { server.closeAllConnections?.(); server.close(r); }) };
}

/**
 * Suite hooks: start weir and a browser before the tests, close both after them. `assign`
 * receives `{weir, browser}` once they exist.
 */
export function withWeirAndBrowser(assign) {
  let ctx;
  before(async () => {
    ctx = { weir: await startWeir(), browser: await launchBrowser() };
    assign(ctx);
  });
  after(async () => {
    await ctx?.browser?.close();
    await ctx?.weir?.stop();
  });
}

export async function launchBrowser() {
  const { chromium } = await import('playwright-core');
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
}

export const DESKTOP = { viewport: { width: 1280, height: 800 } };
export const PHONE = { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2 };

/** Saves `docs/screenshots/{name}-desktop.png` and `-phone.png` of `url` (or of `html`). */
export async function screenshots(browser, name, { url, html, cookies = [], language } = {}) {
  mkdirSync(SCREENSHOTS, { recursive: true });
  for (const [kind, opts] of [['desktop', DESKTOP], ['phone', PHONE]]) {
    const ctx = await browser.newContext({ ...opts, locale: language });
    if (cookies.length) await ctx.addCookies(cookies);
    const page = await ctx.newPage();
    if (html) await page.setContent(html, { waitUntil: 'load' });
    else await page.goto(url, { waitUntil: 'load' });
    await page.waitForTimeout(300); // let the script paint its first update; not an assertion
    await page.screenshot({ path: path.join(SCREENSHOTS, `${name}-${kind}.png`), fullPage: false });
    await ctx.close();
  }
}

/** Polls `f` until it returns a truthy value or `ms` passes. */
export async function eventually(f, ms = 15000, what = 'condition') {
  const until = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await f();
      if (last) return last;
    } catch (e) { last = e; }
    if (Date.now() > until) throw new Error(`${what} not met within ${ms} ms (last: ${last})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Opens `url` in a fresh context and records what the test asserts on. */
export async function visitor(browser, url, { block_websockets = false, block_script = false, ...ctxOpts } = {}) {
  const context = await browser.newContext({ ...DESKTOP, ...ctxOpts });
  if (block_websockets) await context.routeWebSocket(/\/app\//, (ws) => ws.close());
  if (block_script) await context.route(/\/_weir\/static\/room\.js/, (route) => route.abort());
  const page = await context.newPage();
  const log = { sockets: [], statusRequests: [], navigations: [], positions: [], socketRegistrations: [] };
  page.on('response', (r) => { if (new URL(r.url()).pathname.endsWith('/socket')) log.socketRegistrations.push(r.status()); });
  page.on('websocket', (ws) => {
    const s = { url: ws.url(), subscribed: false, closed: false, frames: [] };
    ws.on('framesent', (f) => { if (String(f.payload).includes('pusher:subscribe')) s.subscribed = true; });
    ws.on('framereceived', (f) => { s.frames.push({ at: Date.now(), payload: String(f.payload) }); });
    ws.on('close', () => { s.closed = true; s.closedAt = Date.now(); });
    log.sockets.push(s);
  });
  page.on('request', (r) => {
    if (new URL(r.url()).pathname.endsWith('/status')) {
      const socketUp = log.sockets.some((s) => s.frames.some((f) => f.payload.includes('subscription_succeeded')) && !s.closed);
      // The serving counter last broadcast to this page when it asked for its status.
      let serving = null;
      for (const s of log.sockets) for (const f of s.frames) {
        const m = f.payload.match(/"event":"weir:counter".*?\\"serving\\":(\d+)/) || f.payload.match(/\\"serving\\":(\d+).*"event":"weir:counter"/);
        if (m) serving = Number(m[1]);
      }
      log.statusRequests.push({ at: Date.now(), socketUp, serving, position: log.positions.at(-1) });
    }
  });
  page.on('framenavigated', (f) => { if (f === page.mainFrame()) log.navigations.push(f.url()); });
  await page.exposeFunction('__weirPosition', (v) => log.positions.push(v));
  await page.addInitScript(() => {
    document.addEventListener('DOMContentLoaded', () => {
      const el = document.getElementById('position');
      if (!el) return;
      window.__weirPosition(el.textContent);
      new MutationObserver(() => window.__weirPosition(el.textContent))
        .observe(el, { childList: true, characterData: true, subtree: true });
    });
  });
  await page.goto(url);
  return { context, page, log };
}

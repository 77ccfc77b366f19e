// nginx `auth_request` and Caddy `forward_auth` (Debian packages) in front of a small origin,
// asking the real weir binary: no token → sent to the room; a token → passes (and is kept as a
// cookie); a token for another room or an expired one → sent back to the room.
// The configs are tests/integrations/nginx.conf and Caddyfile, the README's verbatim.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import http from 'node:http';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { startWeir, eventually } from '../browser/support.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
// Tokens live 5 s here so the "expired" case is reached by waiting, not by forging.
const TTL_SECONDS = 5;

let weir, origin, originHits = [];
const children = [];
const dirs = [];

before(async () => {
  weir = await startWeir({ WEIR_TOKEN_TTL_SECONDS: String(TTL_SECONDS) });
  origin = http.createServer((req, res) => {
    originHits.push({ url: req.url, headers: req.headers });
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end(`origin says hello at ${req.url}`);
  });
  await new Promise((r) => origin.listen(0, '127.0.0.1', r));
  await weir.createRoom({ id: 'shop', origin: 'http://shop.example', rate_per_minute: 6000 });
  await weir.createRoom({ id: 'other', origin: 'http://shop.example', rate_per_minute: 6000 });
});

after(async () => {
  for (const c of children) if (c.exitCode === null) c.kill('SIGTERM');
  await new Promise((r) => setTimeout(r, 200));
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
  origin?.closeAllConnections?.();
  origin?.close();
  await weir?.stop();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

function fill(file, vars) {
  let text = readFileSync(path.join(HERE, file), 'utf8');
  for (const [k, v] of Object.entries(vars)) text = text.replaceAll(`{{${k}}}`, v);
  return text;
}

/** A fresh admission token for `room` (a JSON visitor enters and is admitted at once). */
async function tokenFor(room) {
  const r = await fetch(`${weir.base}/r/${room}`, { headers: { accept: 'application/json' } });
  const cookie = r.headers.getSetCookie().map((c) => c.split(';')[0]).join('; ');
  const s = await eventually(async () => {
    const st = await (await fetch(`${weir.base}/r/${room}/status`, { headers: { cookie, accept: 'application/json' } })).json();
    return st.admitted && st;
  }, 10000, `admitted to ${room}`);
  return new URL(s.redirect_url).searchParams.get('weir_token');
}

async function get(base, p, cookie) {
  return fetch(`${base}${p}`, { redirect: 'manual', headers: cookie ? { cookie } : {} });
}

async function waitUp(base) {
  await eventually(async () => { await fetch(base, { redirect: 'manual' }); return true; }, 10000, `${base} listening`);
}

async function exercise(base, name) {
  const weirHost = new URL(weir.base).host;
  // No token: sent to the room.
  let r = await get(base, '/products/42');
  assert.equal(r.status, 302, `${name}: no token`);
  assert.equal(r.headers.get('location'), `http://${weirHost}/r/shop`);

  // The admission redirect (?weir_token=): passes, and the token is kept as a cookie.
  const token = await tokenFor('shop');
  const before = originHits.length;
  r = await get(base, `/products/42?weir_token=${encodeURIComponent(token)}`);
  assert.equal(r.status, 200, `${name}: with a token: ${await r.clone().text()}`);
  assert.match(await r.text(), /origin says hello at \/products\/42/);
  assert.equal(originHits.length, before + 1);
  const setCookie = r.headers.getSetCookie().find((c) => c.startsWith('weir_token='));
  assert.ok(setCookie, `${name}: weir_token cookie set for the site`);
  assert.equal(setCookie.split(';')[0], `weir_token=${token}`);

  // Later requests carry only the cookie: still pass.
  r = await get(base, '/cart', `weir_token=${token}`);
  assert.equal(r.status, 200, `${name}: with the cookie`);

  // A token for another room: sent back to this room.
  const otherToken = await tokenFor('other');
  r = await get(base, '/cart', `weir_token=${otherToken}`);
  assert.equal(r.status, 302, `${name}: token for another room`);
  assert.equal(r.headers.get('location'), `http://${weirHost}/r/shop`);
  r = await get(base, `/cart?weir_token=${encodeURIComponent(otherToken)}`);
  assert.equal(r.status, 302, `${name}: token for another room in the URL`);

  // Garbage: sent back.
  r = await get(base, '/cart', 'weir_token=not.a.token');
  assert.equal(r.status, 302);

  // The same token once expired: sent back.
  await eventually(async () => (await get(base, '/cart', `weir_token=${token}`)).status === 302,
    (TTL_SECONDS + 10) * 1000, `${name}: expired token refused`);
  const hitsWithToken = originHits.filter((h) => h.url.startsWith('/cart'));
  assert.ok(hitsWithToken.length >= 1);
}

test('nginx auth_request in front of the origin', async (t) => {
  if (spawnSync('nginx', ['-v']).error) return t.skip('nginx not installed');
  const dir = mkdtempSync(path.join(tmpdir(), 'weir-nginx-'));
  dirs.push(dir);
  for (const d of ['body', 'proxy', 'fastcgi', 'uwsgi', 'scgi']) mkdirSync(path.join(dir, d));
  const port = await freePort();
  const conf = fill('nginx.conf', {
    DIR: dir, LISTEN: `127.0.0.1:${port}`, ORIGIN: `127.0.0.1:${origin.address().port}`,
    WEIR: new URL(weir.base).host, ROOM: 'shop',
  });
  writeFileSync(path.join(dir, 'nginx.conf'), conf);
  const check = spawnSync('nginx', ['-t', '-p', dir, '-c', path.join(dir, 'nginx.conf')], { encoding: 'utf8' });
  assert.equal(check.status, 0, check.stderr);
  const child = spawn('nginx', ['-p', dir, '-c', path.join(dir, 'nginx.conf')], { stdio: 'inherit' });
  children.push(child);
  const base = `http://127.0.0.1:${port}`;
  await waitUp(base);
  await exercise(base, 'nginx');
});

test('Caddy forward_auth in front of the origin', async (t) => {
  if (spawnSync('caddy', ['version']).error) return t.skip('caddy not installed');
  const dir = mkdtempSync(path.join(tmpdir(), 'weir-caddy-'));
  dirs.push(dir);
  const port = await freePort();
  const conf = fill('Caddyfile', {
    LISTEN: `127.0.0.1:${port}`, ORIGIN: `127.0.0.1:${origin.address().port}`,
    WEIR: new URL(weir.base).host, ROOM: 'shop',
  });
  writeFileSync(path.join(dir, 'Caddyfile'), conf);
  const env = { ...process.env, HOME: dir, XDG_DATA_HOME: dir, XDG_CONFIG_HOME: dir };
  const child = spawn('caddy', ['run', '--adapter', 'caddyfile', '--config', path.join(dir, 'Caddyfile')],
    { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  child.stderr.on('data', (d) => { log = (log + d).slice(-4000); });
  children.push(child);
  const base = `http://127.0.0.1:${port}`;
  await waitUp(base).catch((e) => { throw new Error(`${e.message}\n${log}`); });
  await exercise(base, 'caddy');
});

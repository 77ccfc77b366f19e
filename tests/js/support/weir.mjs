// Test harness for the real-client suites: starts the real `weir` binary on an
// ephemeral port with a fresh data directory, talks to its admin API, and builds
// pusher-js / npm `pusher` clients pointed at it.
//
// Every wait here is a deadline around a condition (an event arriving, a state
// change), never a fixed sleep: tests assert behaviour, not timing.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import http from 'node:http';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import { before, after } from 'node:test';

const require = createRequire(import.meta.url);
// pusher-js's Node build bundles tweetnacl, so private-encrypted channels work.
export const PusherClient = require('pusher-js');
export const PusherServer = require('pusher');

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, '..', '..', '..');
export const WEIR_BIN = process.env.WEIR_BIN || path.join(REPO, 'target', 'debug', 'weir');

/** Default deadline for anything that should happen "soon" (ms). Generous:
 * debug builds on a 2-core CI machine. Tests never wait this long on success. */
export const DEADLINE_MS = 10_000;

const READY_RE = /weir: listening on (http:\/\/127\.0\.0\.1:(\d+))/;

/**
 * Starts `weir serve` and resolves once it prints its listening line.
 * @param {object} [opts]
 * @param {object} [opts.env] extra environment variables
 * @param {string} [opts.config] TOML configuration text, written into the data directory and
 *   passed with `--config`
 * @param {string[]} [opts.args] extra `weir serve` arguments
 * @returns {Promise<Weir>}
 */
export async function startWeir({ env = {}, config, args = [], readyTimeoutMs = 30_000 } = {}) {
  if (!existsSync(WEIR_BIN)) {
    throw new Error(`weir binary not found at ${WEIR_BIN} (build it or set WEIR_BIN)`);
  }
  const dataDir = mkdtempSync(path.join(tmpdir(), 'weir-js-'));
  const adminKey = 'test-admin-key-' + 'x'.repeat(24) + Math.random().toString(36).slice(2, 10);
  const configArgs = [];
  if (config !== undefined) {
    const file = path.join(dataDir, 'weir.toml');
    writeFileSync(file, config);
    configArgs.push('--config', file);
  }
  const child = spawn(
    WEIR_BIN,
    ['serve', '--listen', '127.0.0.1:0', '--data-dir', dataDir, ...configArgs, ...args],
    {
      env: { ...process.env, WEIR_ADMIN_KEY: adminKey, WEIR_LOG: 'warn', ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  let stdout = '';
  let stderr = '';
  child.stderr.on('data', (d) => {
    stderr += d;
    if (stderr.length > 200_000) stderr = stderr.slice(-100_000);
  });
  const onExitKill = () => { try { child.kill('SIGKILL'); } catch { /* already gone */ } };
  process.on('exit', onExitKill);

  const baseUrl = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      reject(new Error(`weir did not print its listening line within ${readyTimeoutMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, readyTimeoutMs);
    child.stdout.on('data', (d) => {
      stdout += d;
      const m = READY_RE.exec(stdout);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`weir exited before ready (code ${code}, signal ${signal})\nstdout: ${stdout}\nstderr: ${stderr}`));
    });
  });
  const port = Number(new URL(baseUrl).port);
  return new Weir({ child, baseUrl, port, adminKey, dataDir, onExitKill, stderr: () => stderr });
}

export class Weir {
  constructor({ child, baseUrl, port, adminKey, dataDir, onExitKill, stderr }) {
    Object.assign(this, { child, baseUrl, port, adminKey, dataDir, onExitKill, stderr });
  }

  /** SIGTERM, then SIGKILL after 5 s; removes the data directory. */
  async stop() {
    const child = this.child;
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
      await exited;
      clearTimeout(timer);
    }
    process.off('exit', this.onExitKill);
    rmSync(this.dataDir, { recursive: true, force: true });
  }

  /** Admin API call; returns {status, body, headers}. Body parsed as JSON when possible. */
  async admin(method, p, body) {
    const res = await fetch(this.baseUrl + p, {
      method,
      headers: {
        authorization: `Bearer ${this.adminKey}`,
        ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
      },
      body: body !== undefined ? JSON.stringify(body) : undefined,
    });
    const text = await res.text();
    let parsed = text;
    try { parsed = text ? JSON.parse(text) : null; } catch { /* keep text */ }
    return { status: res.status, body: parsed, headers: res.headers };
  }

  /** Creates a Pusher app through the admin API; asserts 201 and the documented shape. */
  async createApp(settings = {}) {
    const res = await this.admin('POST', '/api/v1/apps', { client_events: true, ...settings });
    if (res.status !== 201) {
      throw new Error(`POST /api/v1/apps ${JSON.stringify(settings)}: expected 201, got ${res.status}: ${JSON.stringify(res.body)}`);
    }
    const app = res.body;
    for (const f of ['id', 'key', 'secret']) {
      if (typeof app[f] !== 'string' || !app[f]) {
        throw new Error(`POST /api/v1/apps: response lacks string field ${f}: ${JSON.stringify(app)}`);
      }
    }
    if (!/^\d+$/.test(app.id)) throw new Error(`app id must be digits, got ${JSON.stringify(app.id)}`);
    return app;
  }

  /** The npm `pusher` server SDK pointed at this weir. */
  server(app, extra = {}) {
    return new PusherServer({
      appId: app.id,
      key: app.key,
      secret: app.secret,
      host: '127.0.0.1',
      port: String(this.port),
      useTLS: false,
      ...extra,
    });
  }

  /**
   * pusher-js (Node build) pointed at this weir. Channel auth and user auth are
   * computed with the npm `pusher` SDK (`authorizeChannel` / `authenticateUser`),
   * which proves weir accepts the SDK's signatures.
   * @param {object} opts
   * @param {object} [opts.presence] presence data `{user_id, user_info}` (or a function of channel name)
   * @param {object} [opts.user] user data for `signin()` `{id, ...}`
   * @param {object} [opts.sdk] SDK instance to sign with (default: one built from `app`)
   */
  client(app, { presence, user, sdk, options = {} } = {}) {
    const signer = sdk || this.server(app);
    const client = new PusherClient(app.key, {
      wsHost: '127.0.0.1',
      wsPort: this.port,
      forceTLS: false,
      enabledTransports: ['ws'],
      cluster: 'mt1',
      disableStats: true,
      channelAuthorization: {
        customHandler: ({ socketId, channelName }, callback) => {
          try {
            const data = typeof presence === 'function' ? presence(channelName) : presence;
            const auth = channelName.startsWith('presence-')
              ? signer.authorizeChannel(socketId, channelName, data)
              : signer.authorizeChannel(socketId, channelName);
            callback(null, auth);
          } catch (e) {
            callback(e, null);
          }
        },
      },
      userAuthentication: {
        customHandler: ({ socketId }, callback) => {
          try {
            callback(null, signer.authenticateUser(socketId, user));
          } catch (e) {
            callback(e, null);
          }
        },
      },
      ...options,
    });
    return client;
  }
}

// ---------------------------------------------------------------- waiting

/** Polls `cond` (sync or async) until truthy; returns its value or throws `what` after the deadline. */
export async function waitFor(cond, what, timeoutMs = DEADLINE_MS) {
  const end = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await cond();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}` + (last instanceof Error ? ` (last error: ${last.message})` : ''));
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Resolves with the first argument of the first call of `subscribe(handler)`'s handler, or rejects after the deadline. */
export function once(subscribe, what, timeoutMs = DEADLINE_MS) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
    let done = false;
    subscribe((value) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      resolve(value);
    });
  });
}

/** Resolves when the pusher-js client is connected; returns its socket id. */
export async function connected(client, timeoutMs = DEADLINE_MS) {
  if (client.connection.state === 'connected') return client.connection.socket_id;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`pusher-js did not connect within ${timeoutMs} ms (state ${client.connection.state})`)),
      timeoutMs,
    );
    const onChange = ({ current }) => {
      if (current === 'connected') {
        clearTimeout(timer);
        client.connection.unbind('state_change', onChange);
        resolve(client.connection.socket_id);
      }
    };
    client.connection.bind('state_change', onChange);
    client.connection.bind('error', (err) => {
      // Keep waiting: pusher-js retries; the timeout reports the final state.
      client.__lastError = err;
    });
  });
}

/** Subscribes and resolves once `pusher:subscription_succeeded` arrives; rejects on `pusher:subscription_error`. */
export function subscribed(client, name, timeoutMs = DEADLINE_MS) {
  const channel = client.subscribe(name);
  return new Promise((resolve, reject) => {
    if (channel.subscribed) return resolve(channel);
    const timer = setTimeout(
      () => reject(new Error(`subscription to ${name} not confirmed within ${timeoutMs} ms`)),
      timeoutMs,
    );
    channel.bind('pusher:subscription_succeeded', () => { clearTimeout(timer); resolve(channel); });
    channel.bind('pusher:subscription_error', (err) => {
      clearTimeout(timer);
      reject(new Error(`subscription to ${name} failed: ${JSON.stringify(err)}`));
    });
  });
}

/** Collects every `event` on `channel` into an array (for "not received" checks and ordering). */
export function collect(channel, event) {
  const got = [];
  channel.bind(event, (data, meta) => got.push({ data, meta }));
  return got;
}

/** Resolves when the client reaches one of the given connection states. */
export function reachesState(client, states, timeoutMs = DEADLINE_MS) {
  return waitFor(() => states.includes(client.connection.state), `connection state in ${states}`, timeoutMs);
}

/** Disconnects every given pusher-js client (ignores errors). */
/**
 * Registers the usual suite hooks: start weir and create an app before the tests, disconnect
 * every client made through the returned factory and stop weir after them. `assign` receives
 * `{weir, app, sdk}` once they exist.
 */
export function withWeirAndApp(assign, appSettings = {}) {
  const clients = [];
  let ctx;
  before(async () => {
    const weir = await startWeir();
    const app = await weir.createApp(appSettings);
    ctx = { weir, app, sdk: weir.server(app) };
    assign(ctx);
  });
  after(async () => {
    disconnectAll(...clients);
    await ctx?.weir?.stop();
  });
  return (opts) => {
    const c = ctx.weir.client(ctx.app, opts);
    clients.push(c);
    return c;
  };
}

export function disconnectAll(...clients) {
  for (const c of clients) {
    try { c.disconnect(); } catch { /* ignore */ }
  }
}

/** A unique channel-name suffix for one test. */
let seq = 0;
export function uniq(prefix) {
  seq += 1;
  return `${prefix}${process.pid}-${seq}-${Math.random().toString(36).slice(2, 8)}`;
}

/**
 * After publishing "A" then a marker "B" on the same channel, B's arrival proves
 * A would have arrived already if it were going to (events on one channel are
 * delivered in order). This is how "not received" is asserted without sleeping.
 */
export async function barrier(sdk, client, channelName, timeoutMs = DEADLINE_MS) {
  const ch = client.channel(channelName);
  const marker = 'barrier-' + Math.random().toString(36).slice(2);
  const p = once((h) => ch.bind('weir-test-barrier', (d) => { if (d && d.marker === marker) h(d); }), `barrier on ${channelName}`, timeoutMs);
  await sdk.trigger(channelName, 'weir-test-barrier', { marker });
  await p;
}

// ---------------------------------------------------------------- webhooks

/**
 * A small HTTP server that records webhook deliveries `{headers, rawBody, body}`.
 * `respond` decides the status (default 200).
 */
export async function webhookReceiver({ respond = () => 200 } = {}) {
  const deliveries = [];
  const srv = http.createServer((req, res) => {
    let raw = '';
    req.setEncoding('utf8');
    req.on('data', (c) => { raw += c; });
    req.on('end', () => {
      let body = null;
      try { body = JSON.parse(raw); } catch { /* keep null */ }
      const d = { method: req.method, url: req.url, headers: req.headers, rawBody: raw, body };
      deliveries.push(d);
      res.statusCode = respond(d);
      res.end();
    });
  });
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = srv.address();
  return {
    url: `http://127.0.0.1:${port}/hook`,
    deliveries,
    /** All events across deliveries, each with its delivery. */
    events() {
      return deliveries.flatMap((d) => ((d.body && d.body.events) || []).map((e) => ({ ...e, delivery: d })));
    },
    close: () => new Promise((r) => { srv.closeAllConnections?.(); srv.close(() => r()); }),
  };
}

/** The webhook configuration shape used by `POST /api/v1/apps` (see src/realtime/app.rs on `rt`). */
export function webhookSettings(url, eventTypes) {
  return { webhooks: [{ url, event_types: eventTypes }] };
}

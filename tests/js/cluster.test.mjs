// Cluster mode: two weir nodes sharing one real `redis-server` (WEIR_CLUSTER_REDIS_URL), the same
// Pusher app defined on both through a config file. pusher-js clients on each node, the npm
// `pusher` SDK pointed at one node or the other: events, socket_id exclusion, client events,
// channel queries, terminations, subscription counts and watchlist events cross nodes (presence
// across nodes: tests/cluster.rs).

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import {
  startWeir, connected, subscribed, once, collect, barrier, disconnectAll, uniq, waitFor, DEADLINE_MS,
} from './support/weir.mjs';

/** The one app both nodes serve, defined in their config files (same id, key and secret). */
const APP = { id: '4242', key: 'cluster-js-key', secret: 'cluster-js-secret', client_events: true, subscription_count: true };

function appConfig(app) {
  return [
    '[[apps]]',
    `id = ${JSON.stringify(app.id)}`,
    `key = ${JSON.stringify(app.key)}`,
    `secret = ${JSON.stringify(app.secret)}`,
    `client_events = ${app.client_events}`,
    `subscription_count = ${app.subscription_count}`,
    '',
  ].join('\n');
}

/** `redis-server` from $REDIS_SERVER or the PATH; a clear failure (never a skip) without it. */
function redisServerBinary() {
  const candidates = process.env.REDIS_SERVER
    ? [process.env.REDIS_SERVER]
    : [...(process.env.PATH || '').split(path.delimiter).filter(Boolean).map((d) => path.join(d, 'redis-server')), '/usr/bin/redis-server'];
  const found = candidates.find((p) => existsSync(p));
  if (!found) {
    throw new Error(
      'cluster tests need a real redis-server, found none (looked at ' + candidates.join(', ') + '): '
      + 'install it (apt-get install redis-server) or set REDIS_SERVER=/path/to/redis-server',
    );
  }
  return found;
}

/** A free loopback port (bound then released, as tests/cluster.rs does). */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Resolves true once the Redis at `port` answers PING with +PONG. */
function redisPings(port) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    let buf = '';
    const done = (ok) => { sock.destroy(); resolve(ok); };
    sock.setTimeout(1_000, () => done(false));
    sock.on('error', () => done(false));
    sock.on('connect', () => sock.write('PING\r\n'));
    sock.on('data', (d) => {
      buf += d;
      if (buf.includes('\r\n')) done(buf.startsWith('+PONG'));
    });
  });
}

/** Starts a throwaway `redis-server` on an ephemeral loopback port; resolves once it answers PING. */
async function startRedis() {
  const bin = redisServerBinary();
  const port = await freePort();
  const child = spawn(bin, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout.on('data', (d) => { output = (output + d).slice(-20_000); });
  child.stderr.on('data', (d) => { output = (output + d).slice(-20_000); });
  let exited = null;
  child.on('exit', (code, signal) => { exited = { code, signal }; });
  const spawnError = new Promise((resolve) => child.once('error', resolve));
  const onExitKill = () => { try { child.kill('SIGKILL'); } catch { /* already gone */ } };
  process.on('exit', onExitKill);
  const redis = {
    port,
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      if (child.exitCode === null && child.signalCode === null && !exited) {
        const gone = new Promise((r) => child.once('exit', r));
        child.kill('SIGKILL');
        await gone;
      }
      process.off('exit', onExitKill);
    },
  };
  try {
    await Promise.race([
      waitFor(async () => {
        if (exited) throw new Error(`redis-server exited (${JSON.stringify(exited)}): ${output}`);
        return redisPings(port);
      }, `redis-server (${bin}) to answer PING on 127.0.0.1:${port}`),
      spawnError.then((e) => { throw new Error(`cannot run ${bin}: ${e.message}`); }),
    ]);
  } catch (e) {
    await redis.stop();
    throw e;
  }
  return redis;
}

/** Waits until the node's /readyz is 200 with `"cluster": true` (it receives the bus). */
async function clusterReady(node) {
  let last;
  await waitFor(async () => {
    const r = await fetch(node.baseUrl + '/readyz');
    last = `${r.status} ${await r.text()}`;
    if (r.status !== 200) return false;
    return JSON.parse(last.slice(4)).cluster === true;
  }, `${node.baseUrl}/readyz to be 200 with "cluster": true`, 30_000).catch((e) => {
    throw new Error(`${e.message}; last answer: ${last}\nweir stderr: ${node.stderr()}`);
  });
}

describe('cluster mode: two weir nodes sharing one Redis', () => {
  let redis, nodeA, nodeB, sdkA, sdkB;
  const clients = [];
  /** A pusher-js client connected to `node`. */
  const client = (node, opts) => { const c = node.client(APP, opts); clients.push(c); return c; };

  before(async () => {
    redis = await startRedis();
    const env = { WEIR_CLUSTER_REDIS_URL: redis.url, WEIR_CLUSTER_PREFIX: `weir-js-${process.pid}` };
    const config = appConfig(APP);
    [nodeA, nodeB] = await Promise.all([startWeir({ env, config }), startWeir({ env, config })]);
    await Promise.all([clusterReady(nodeA), clusterReady(nodeB)]);
    sdkA = nodeA.server(APP);
    sdkB = nodeB.server(APP);
  });
  after(async () => {
    disconnectAll(...clients);
    await Promise.all([nodeA?.stop(), nodeB?.stop()]);
    await redis?.stop();
  });

  /** The SDK's GET on `sdk`'s node, parsed; asserts 200. */
  async function query(sdk, p, params = {}) {
    const res = await sdk.get({ path: p, params });
    assert.equal(res.status, 200);
    return res.json();
  }

  it('delivers SDK triggers on node B to subscribers on both nodes, in the order sent', async () => {
    const a = client(nodeA);
    const b = client(nodeB);
    const name = uniq('orders-');
    const [cha, chb] = await Promise.all([subscribed(a, name), subscribed(b, name)]);
    const gotA = collect(cha, 'placed');
    const gotB = collect(chb, 'placed');
    const sent = Array.from({ length: 10 }, (_, i) => ({ i, note: `order ${i} ✓` }));
    for (const data of sent) {
      const res = await sdkB.trigger(name, 'placed', data);
      assert.equal(res.status, 200);
    }
    await waitFor(() => gotA.length >= sent.length && gotB.length >= sent.length, `${sent.length} events on both nodes' clients`)
      .catch((e) => { throw new Error(`${e.message}; node A client got ${gotA.length}, node B client got ${gotB.length}`); });
    // A straggler or duplicate would show up before a barrier published after them.
    await Promise.all([barrier(sdkB, a, name), barrier(sdkB, b, name)]);
    assert.deepEqual(gotA.map((g) => g.data), sent, 'node A client: every event once, in order');
    assert.deepEqual(gotB.map((g) => g.data), sent, 'node B client: every event once, in order');
  });

  it('excludes the socket_id of a connection on the other node', async () => {
    const a = client(nodeA);
    const b = client(nodeB);
    const name = uniq('exclude-');
    const [cha, chb] = await Promise.all([subscribed(a, name), subscribed(b, name)]);
    const gotA = collect(cha, 'excluded-ev');
    const gotB = once((h) => chb.bind('excluded-ev', h), 'excluded-ev at the node B client');
    const res = await sdkB.trigger(name, 'excluded-ev', { x: 1 }, { socket_id: a.connection.socket_id });
    assert.equal(res.status, 200);
    assert.deepEqual(await gotB, { x: 1 });
    await barrier(sdkB, a, name);
    assert.equal(gotA.length, 0, 'the excluded socket (on node A) must not receive the event');
  });

  it('relays a client event from a node A client to a node B client, not back to the sender', async () => {
    const name = uniq('private-chat-');
    const a = client(nodeA);
    const b = client(nodeB);
    const [cha, chb] = await Promise.all([subscribed(a, name), subscribed(b, name)]);
    const echoed = collect(cha, 'client-typing');
    const got = once((h) => chb.bind('client-typing', h), 'client-typing at the node B client');
    assert.equal(cha.trigger('client-typing', { who: 'a' }), true);
    assert.deepEqual(await got, { who: 'a' });
    await barrier(sdkB, a, name);
    assert.equal(echoed.length, 0, 'client events are not echoed to the sender');
  });

  it('answers channel queries on node A counting subscribers connected to node B', async () => {
    const onlyB = uniq('only-b-');
    const both = uniq('both-');
    const a = client(nodeA);
    const b = client(nodeB);
    await Promise.all([subscribed(b, onlyB), subscribed(b, both), subscribed(a, both)]);

    // Node A learns of node B through its heartbeat (about a second after B starts).
    let info;
    await waitFor(async () => {
      info = await query(sdkA, `/channels/${onlyB}`, { info: 'subscription_count' });
      return info.occupied === true;
    }, `node A to report ${onlyB} (subscribed on node B only) as occupied`).catch((e) => {
      throw new Error(`${e.message}; last answer ${JSON.stringify(info)}`);
    });
    assert.deepEqual(info, { occupied: true, subscription_count: 1 }, 'occupied by node B\'s client alone');
    assert.deepEqual(
      await query(sdkA, `/channels/${both}`, { info: 'subscription_count' }),
      { occupied: true, subscription_count: 2 },
      'one subscriber on each node',
    );

    const listed = await query(sdkA, '/channels', { info: 'subscription_count' });
    assert.deepEqual(listed.channels[onlyB], { subscription_count: 1 }, `GET /channels on A: ${JSON.stringify(listed)}`);
    assert.deepEqual(listed.channels[both], { subscription_count: 2 }, `GET /channels on A: ${JSON.stringify(listed)}`);
    const filtered = await query(sdkA, '/channels', { filter_by_prefix: onlyB });
    assert.deepEqual(filtered, { channels: { [onlyB]: {} } });

    // B's client leaves: node A sees the channel vacated.
    b.unsubscribe(onlyB);
    await waitFor(async () => {
      info = await query(sdkA, `/channels/${onlyB}`, { info: 'subscription_count' });
      return info.occupied === false;
    }, `node A to report ${onlyB} unoccupied after the node B client unsubscribed`).catch((e) => {
      throw new Error(`${e.message}; last answer ${JSON.stringify(info)}`);
    });
  });

  it('terminateUserConnections on node A closes the user\'s connection on node B', async () => {
    const userId = uniq('victim-');
    const victim = client(nodeB, { user: { id: userId } });
    const bystander = client(nodeB, { user: { id: uniq('bystander-') } });
    for (const c of [victim, bystander]) {
      await connected(c);
      const success = once((h) => c.connection.bind('message', (m) => { if (m.event === 'pusher:signin_success') h(m); }), 'pusher:signin_success');
      c.signin();
      await success;
    }
    const original = victim.connection.socket_id;
    const bystanderSocket = bystander.connection.socket_id;
    let lost = false;
    victim.connection.bind('state_change', ({ previous }) => { if (previous === 'connected') lost = true; });
    const name = uniq('bystander-ch-');
    await subscribed(bystander, name);

    const res = await sdkA.terminateUserConnections(userId);
    assert.equal(res.status, 200);
    await waitFor(() => lost || victim.connection.socket_id !== original, 'the node B victim connection to be closed', DEADLINE_MS);
    await barrier(sdkA, bystander, name);
    assert.equal(bystander.connection.state, 'connected');
    assert.equal(bystander.connection.socket_id, bystanderSocket);
  });

  it('counts the subscribers of both nodes in pusher:subscription_count', async () => {
    const name = uniq('counted-');
    const a = client(nodeA);
    const b = client(nodeB);
    const heard = (c) => c.channel(name)?.subscriptionCount;
    a.subscribe(name);
    await subscribed(a, name);
    await waitFor(() => heard(a) === 1, 'the node A subscriber to hear 1');
    b.subscribe(name);
    await subscribed(b, name);
    await waitFor(() => heard(a) === 2 && heard(b) === 2, `both to hear 2 (a: ${heard(a)}, b: ${heard(b)})`);
    b.unsubscribe(name);
    await waitFor(() => heard(a) === 1, `the node A subscriber to hear 1 again (a: ${heard(a)})`);
  });

  it('tells a watcher on node A when a watched user signs in and out on node B', async () => {
    const signIn = async (c) => {
      await connected(c);
      const success = once((h) => c.connection.bind('message', (m) => { if (m.event === 'pusher:signin_success') h(m); }), 'pusher:signin_success');
      c.signin();
      await success;
    };
    const watched = uniq('watched-');
    const watcher = client(nodeA, { user: { id: uniq('watcher-'), watchlist: [watched] } });
    const seen = [];
    for (const event of ['online', 'offline']) watcher.user.watchlist.bind(event, (e) => seen.push(`${e.name}:${e.user_ids}`));
    await signIn(watcher);
    const onB = client(nodeB, { user: { id: watched } });
    await signIn(onB);
    await waitFor(() => seen.length >= 1, 'the watcher to hear the user come online on node B');
    onB.disconnect();
    await waitFor(() => seen.length >= 2, `the watcher to hear the user go offline (seen ${seen})`);
    assert.deepEqual(seen, [`online:${watched}`, `offline:${watched}`]);
  });
});

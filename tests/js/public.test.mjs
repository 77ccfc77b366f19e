// pusher-js (Node build) + npm `pusher` SDK against weir: connecting, public
// channels, triggers from the server SDK, batch triggers, socket_id exclusion.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import {
  startWeir, connected, subscribed, once, collect, barrier, disconnectAll, uniq, waitFor, withWeirAndApp } from './support/weir.mjs';

/** A raw `ws` socket whose 'error' events are recorded instead of crashing the test process. */
function rawSocket(url) {
  const ws = new WebSocket(url);
  ws.errors = [];
  ws.on('error', (e) => ws.errors.push(e));
  return ws;
}

describe('public channels with pusher-js and the npm pusher SDK', () => {
  let weir, app, sdk;
  const client = withWeirAndApp((s) => ({ weir, app, sdk } = s));

  it('connects and gets a socket_id of the form digits.digits, unique per connection', async () => {
    const a = client();
    const b = client();
    const [ida, idb] = await Promise.all([connected(a), connected(b)]);
    assert.match(ida, /^\d+\.\d+$/);
    assert.match(idb, /^\d+\.\d+$/);
    assert.notEqual(ida, idb);
  });

  it('sends pusher:connection_established with socket_id and activity_timeout (raw frame)', async () => {
    const ws = rawSocket(`ws://127.0.0.1:${weir.port}/app/${app.key}?protocol=7&client=js&version=8.6.0`);
    try {
      const frame = await once((h) => ws.on('message', (m) => h(m.toString())), 'connection_established frame');
      const msg = JSON.parse(frame);
      assert.equal(msg.event, 'pusher:connection_established');
      assert.equal(typeof msg.data, 'string', 'data is a JSON-encoded string as in the protocol');
      const data = JSON.parse(msg.data);
      assert.match(data.socket_id, /^\d+\.\d+$/);
      assert.equal(typeof data.activity_timeout, 'number');
      assert.ok(data.activity_timeout > 0);
    } finally {
      ws.close();
    }
  });

  it('answers pusher:ping with pusher:pong (raw frame)', async () => {
    const ws = rawSocket(`ws://127.0.0.1:${weir.port}/app/${app.key}?protocol=7`);
    try {
      const frames = [];
      const pong = once((h) => ws.on('message', (m) => {
        const msg = JSON.parse(m.toString());
        frames.push(msg.event);
        if (msg.event === 'pusher:connection_established') ws.send(JSON.stringify({ event: 'pusher:ping', data: {} }));
        if (msg.event === 'pusher:pong') h(msg);
      }), 'pusher:pong');
      await pong;
      assert.deepEqual(frames, ['pusher:connection_established', 'pusher:pong']);
    } finally {
      ws.close();
    }
  });

  it('refuses an unknown app key with close code 4001', async () => {
    const ws = rawSocket(`ws://127.0.0.1:${weir.port}/app/no-such-key-${Date.now()}?protocol=7`);
    const events = [];
    ws.on('message', (m) => events.push(JSON.parse(m.toString())));
    const code = await once((h) => {
      ws.on('close', (c) => h(c));
      // Pusher upgrades the connection and then refuses; an HTTP error instead is a failure.
      ws.on('unexpected-response', (_req, res) => h(`HTTP ${res.statusCode} instead of a WebSocket upgrade`));
    }, 'close of unknown-key connection');
    // Pusher either sends pusher:error {code:4001} then closes with 4001, or closes with 4001 directly.
    assert.equal(code, 4001, `close code ${code}, frames ${JSON.stringify(events)}`);
    for (const e of events) {
      if (e.event === 'pusher:error') assert.equal(e.data.code, 4001);
    }
  });

  it('delivers an event triggered by the SDK to a public channel subscriber', async () => {
    const c = client();
    const name = uniq('orders-');
    const ch = await subscribed(c, name);
    const got = once((h) => ch.bind('order-placed', h), 'order-placed');
    const res = await sdk.trigger(name, 'order-placed', { id: 42, items: ['a', 'b'], note: 'héllo ✓' });
    assert.equal(res.status, 200);
    assert.deepEqual(await got, { id: 42, items: ['a', 'b'], note: 'héllo ✓' });
  });

  it('delivers a string payload unchanged', async () => {
    const c = client();
    const name = uniq('strings-');
    const ch = await subscribed(c, name);
    const got = once((h) => ch.bind('text', h), 'text event');
    await sdk.trigger(name, 'text', 'plain string, not JSON');
    assert.equal(await got, 'plain string, not JSON');
  });

  it('triggers one event to several channels at once', async () => {
    const c = client();
    const names = [uniq('multi-a-'), uniq('multi-b-'), uniq('multi-c-')];
    const chans = await Promise.all(names.map((n) => subscribed(c, n)));
    const gots = chans.map((ch, i) => once((h) => ch.bind('fanout', h), `fanout on ${names[i]}`));
    const res = await sdk.trigger(names, 'fanout', { n: 1 });
    assert.equal(res.status, 200);
    for (const g of gots) assert.deepEqual(await g, { n: 1 });
  });

  it('returns channel info from a trigger with info=subscription_count', async () => {
    const a = client();
    const b = client();
    const name = uniq('info-');
    await Promise.all([subscribed(a, name), subscribed(b, name)]);
    const res = await sdk.trigger(name, 'ev', {}, { info: 'subscription_count' });
    assert.equal(res.status, 200);
    const body = await res.json();
    assert.deepEqual(body, { channels: { [name]: { subscription_count: 2 } } });
  });

  it('delivers a triggerBatch to each named channel', async () => {
    const c = client();
    const n1 = uniq('batch-1-');
    const n2 = uniq('batch-2-');
    const [c1, c2] = await Promise.all([subscribed(c, n1), subscribed(c, n2)]);
    const g1 = once((h) => c1.bind('b-one', h), 'b-one');
    const g2 = once((h) => c2.bind('b-two', h), 'b-two');
    const res = await sdk.triggerBatch([
      { channel: n1, name: 'b-one', data: { i: 1 } },
      { channel: n2, name: 'b-two', data: { i: 2 } },
    ]);
    assert.equal(res.status, 200);
    assert.deepEqual(await g1, { i: 1 });
    assert.deepEqual(await g2, { i: 2 });
  });

  it('excludes the connection named in socket_id from a trigger', async () => {
    const a = client();
    const b = client();
    const name = uniq('exclude-');
    const [cha, chb] = await Promise.all([subscribed(a, name), subscribed(b, name)]);
    const gotA = collect(cha, 'excluded-ev');
    const gotB = once((h) => chb.bind('excluded-ev', h), 'excluded-ev at B');
    await sdk.trigger(name, 'excluded-ev', { x: 1 }, { socket_id: a.connection.socket_id });
    assert.deepEqual(await gotB, { x: 1 });
    await barrier(sdk, a, name);
    assert.equal(gotA.length, 0, 'the excluded socket must not receive the event');
  });

  it('excludes socket_id in a triggerBatch entry', async () => {
    const a = client();
    const b = client();
    const name = uniq('batch-exclude-');
    const [cha, chb] = await Promise.all([subscribed(a, name), subscribed(b, name)]);
    const gotA = collect(cha, 'bx');
    const gotB = once((h) => chb.bind('bx', h), 'bx at B');
    await sdk.triggerBatch([{ channel: name, name: 'bx', data: { y: 2 }, socket_id: a.connection.socket_id }]);
    assert.deepEqual(await gotB, { y: 2 });
    await barrier(sdk, a, name);
    assert.equal(gotA.length, 0);
  });

  it('stops delivering after unsubscribe', async () => {
    const c = client();
    const name = uniq('unsub-');
    const other = uniq('unsub-other-');
    const ch = await subscribed(c, name);
    await subscribed(c, other);
    const got = collect(ch, 'after-unsub');
    c.unsubscribe(name);
    // Once the server reports the channel unoccupied, the unsubscribe was processed.
    await waitFor(async () => {
      const r = await sdk.get({ path: `/channels/${name}`, params: { info: 'subscription_count' } });
      const b = await r.json();
      return b.occupied === false;
    }, `${name} to become unoccupied after unsubscribe`);
    await sdk.trigger(name, 'after-unsub', {});
    await barrier(sdk, c, other);
    assert.equal(got.length, 0);
  });

  it('rejects an HTTP API call signed with the wrong secret (401)', async () => {
    const bad = weir.server({ ...app, secret: app.secret + 'x' });
    await assert.rejects(bad.trigger(uniq('bad-'), 'ev', {}), (err) => {
      assert.equal(err.status, 401, `expected 401, got ${err.status}: ${err.body}`);
      return true;
    });
  });

  it('rejects an HTTP API call with an unknown key (401)', async () => {
    const bad = weir.server({ ...app, key: 'not-the-key' });
    await assert.rejects(bad.trigger(uniq('bad-'), 'ev', {}), (err) => {
      assert.equal(err.status, 401, `expected 401, got ${err.status}: ${err.body}`);
      return true;
    });
  });
});

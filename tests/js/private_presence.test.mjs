// Private, presence and private-encrypted channels and client events, with
// channel auth computed by the npm `pusher` SDK's authorizeChannel.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import {
  startWeir, connected, subscribed, once, collect, barrier, disconnectAll, uniq, waitFor,
} from './support/weir.mjs';

const member = (id, name) => ({ user_id: id, user_info: { name } });

describe('private, presence and encrypted channels; client events', () => {
  let weir, app, sdk, noClientEventsApp;
  let clients = [];
  const client = (opts, a = app) => { const c = weir.client(a, opts); clients.push(c); return c; };

  before(async () => {
    weir = await startWeir();
    app = await weir.createApp({ client_events: true });
    noClientEventsApp = await weir.createApp({ client_events: false });
    sdk = weir.server(app);
  });
  after(async () => {
    disconnectAll(...clients);
    await weir?.stop();
  });

  /** Connection-level errors (pusher:error frames surface here in pusher-js). */
  const connectionErrors = (c) => {
    const errs = [];
    c.connection.bind('error', (e) => errs.push(e));
    return errs;
  };

  it('subscribes to a private channel with an SDK-signed auth and receives triggers', async () => {
    const c = client();
    const name = uniq('private-orders-');
    const ch = await subscribed(c, name);
    const got = once((h) => ch.bind('shipped', h), 'shipped');
    await sdk.trigger(name, 'shipped', { ok: true });
    assert.deepEqual(await got, { ok: true });
  });

  it('refuses a private subscription signed with the wrong secret', async () => {
    const wrong = weir.server({ ...app, secret: app.secret + 'wrong' });
    const c = client({ sdk: wrong });
    await connected(c);
    const errs = connectionErrors(c);
    const name = uniq('private-denied-');
    const ch = c.subscribe(name);
    const subErrs = collect(ch, 'pusher:subscription_error');
    let succeeded = false;
    ch.bind('pusher:subscription_succeeded', () => { succeeded = true; });
    // Pusher reports a bad signature as pusher:subscription_error on the channel or as
    // pusher:error on the connection; pusher-js surfaces either.
    await waitFor(() => subErrs.length > 0 || errs.length > 0, 'an error for a badly signed subscription');
    assert.equal(succeeded, false);
    assert.equal(ch.subscribed, false);
  });

  it('refuses a private subscription whose auth was signed for another socket', async () => {
    const c = client({ sdk: { authorizeChannel: (_sid, chan) => sdk.authorizeChannel('1234.5678', chan) } });
    await connected(c);
    const errs = connectionErrors(c);
    const ch = c.subscribe(uniq('private-other-socket-'));
    const subErrs = collect(ch, 'pusher:subscription_error');
    await waitFor(() => subErrs.length > 0 || errs.length > 0, 'an error for auth signed for another socket');
    assert.equal(ch.subscribed, false);
  });

  it('tracks presence members: list on join, member_added, member_removed', async () => {
    const name = uniq('presence-room-');
    const a = client({ presence: member('u1', 'Ann') });
    const cha = await subscribed(a, name);
    assert.equal(cha.members.count, 1);
    assert.equal(cha.members.me.id, 'u1');
    assert.deepEqual(cha.members.me.info, { name: 'Ann' });

    const added = once((h) => cha.bind('pusher:member_added', h), 'member_added for u2');
    const b = client({ presence: member('u2', 'Bob') });
    const chb = await subscribed(b, name);
    const m = await added;
    assert.equal(m.id, 'u2');
    assert.deepEqual(m.info, { name: 'Bob' });
    assert.equal(cha.members.count, 2);
    assert.equal(chb.members.count, 2);
    const seen = {};
    chb.members.each((mm) => { seen[mm.id] = mm.info; });
    assert.deepEqual(seen, { u1: { name: 'Ann' }, u2: { name: 'Bob' } });

    const removed = once((h) => cha.bind('pusher:member_removed', h), 'member_removed for u2');
    b.disconnect();
    const r = await removed;
    assert.equal(r.id, 'u2');
    assert.equal(cha.members.count, 1);
  });

  it('counts one member per user id across two connections', async () => {
    const name = uniq('presence-multi-');
    const a = client({ presence: member('u1', 'Ann') });
    const cha = await subscribed(a, name);
    const addedEvents = collect(cha, 'pusher:member_added');
    const removedEvents = collect(cha, 'pusher:member_removed');

    const b1 = client({ presence: member('u2', 'Bob') });
    await subscribed(b1, name);
    await waitFor(() => addedEvents.length === 1, 'member_added for the first u2 connection');

    const b2 = client({ presence: member('u2', 'Bob') });
    const chb2 = await subscribed(b2, name);
    assert.equal(chb2.members.count, 2, 'the second u2 connection sees 2 members, not 3');

    // The HTTP API agrees: two users, three subscriptions.
    const users = await (await sdk.get({ path: `/channels/${name}/users` })).json();
    assert.deepEqual(users.users.map((u) => u.id).sort(), ['u1', 'u2']);

    await barrier(sdk, a, name);
    assert.equal(addedEvents.length, 1, 'no second member_added for the same user id');
    assert.equal(cha.members.count, 2);

    // One of u2's two connections leaves: u2 is still present.
    b2.disconnect();
    await waitFor(async () => {
      const info = await (await sdk.get({ path: `/channels/${name}`, params: { info: 'subscription_count,user_count' } })).json();
      return info.subscription_count === 2 && info;
    }, 'subscription_count to drop to 2 after one u2 connection left');
    await barrier(sdk, a, name);
    assert.equal(removedEvents.length, 0, 'no member_removed while u2 still has a connection');

    // The last u2 connection leaves: now member_removed.
    b1.disconnect();
    await waitFor(() => removedEvents.length === 1, 'member_removed after the last u2 connection left');
    assert.equal(removedEvents[0].data.id, 'u2');
    assert.equal(cha.members.count, 1);
  });

  it('relays client events to other subscribers of a private channel, not back to the sender', async () => {
    const name = uniq('private-chat-');
    const a = client();
    const b = client();
    const [cha, chb] = await Promise.all([subscribed(a, name), subscribed(b, name)]);
    const echoed = collect(cha, 'client-typing');
    const got = once((h) => chb.bind('client-typing', h), 'client-typing at B');
    assert.equal(cha.trigger('client-typing', { who: 'a' }), true);
    assert.deepEqual(await got, { who: 'a' });
    await barrier(sdk, a, name);
    assert.equal(echoed.length, 0, 'client events are not echoed to the sender');
  });

  it('adds user_id to client events on presence channels', async () => {
    const name = uniq('presence-chat-');
    const a = client({ presence: member('alice', 'Alice') });
    const b = client({ presence: member('bob', 'Bob') });
    const [cha, chb] = await Promise.all([subscribed(a, name), subscribed(b, name)]);
    await waitFor(() => cha.members.count === 2 && chb.members.count === 2, 'both members present');
    const got = once((h) => chb.bind('client-wave', (data, meta) => h({ data, meta })), 'client-wave at B');
    cha.trigger('client-wave', { hi: 1 });
    const { data, meta } = await got;
    assert.deepEqual(data, { hi: 1 });
    assert.equal(meta.user_id, 'alice');
  });

  it('refuses client events on a public channel', async () => {
    const name = uniq('public-noclient-');
    const a = client();
    const b = client();
    const [cha, chb] = await Promise.all([subscribed(a, name), subscribed(b, name)]);
    const errs = connectionErrors(a);
    const got = collect(chb, 'client-nope');
    cha.trigger('client-nope', {});
    await waitFor(() => errs.length > 0, 'pusher:error for a client event on a public channel');
    await barrier(sdk, b, name);
    assert.equal(got.length, 0);
  });

  it('refuses client events when the app does not allow them', async () => {
    const sdk2 = weir.server(noClientEventsApp);
    const name = uniq('private-disabled-');
    const a = client({}, noClientEventsApp);
    const b = client({}, noClientEventsApp);
    const [cha, chb] = await Promise.all([subscribed(a, name), subscribed(b, name)]);
    const errs = connectionErrors(a);
    const got = collect(chb, 'client-blocked');
    cha.trigger('client-blocked', { x: 1 });
    await waitFor(() => errs.length > 0, 'pusher:error for a client event on an app without client events');
    await barrier(sdk2, b, name);
    assert.equal(got.length, 0);
  });

  it('relays private-encrypted events end to end (SDK encrypts, pusher-js decrypts)', async () => {
    const masterKey = randomBytes(32).toString('base64');
    const encSdk = weir.server(app, { encryptionMasterKeyBase64: masterKey });
    const name = uniq('private-encrypted-vault-');
    const c = client({ sdk: encSdk });
    const ch = await subscribed(c, name);
    const got = once((h) => ch.bind('secret', h), 'decrypted secret event');
    await encSdk.trigger(name, 'secret', { pin: '1234' });
    assert.deepEqual(await got, { pin: '1234' });
  });

  it('relays private-encrypted payloads as is (the server never sees plaintext)', async () => {
    const masterKey = randomBytes(32).toString('base64');
    const encSdk = weir.server(app, { encryptionMasterKeyBase64: masterKey });
    const name = uniq('private-encrypted-raw-');
    // A subscriber with the wrong key sees ciphertext it cannot open; a raw look via
    // the plain-secret SDK-signed auth (no shared_secret) proves what is on the wire.
    const { default: WebSocket } = await import('ws');
    const ws = new WebSocket(`ws://127.0.0.1:${weir.port}/app/${app.key}?protocol=7`);
    ws.on('error', () => { /* reported by the waits below */ });
    try {
      const frames = [];
      ws.on('message', (m) => frames.push(JSON.parse(m.toString())));
      await waitFor(() => frames.find((f) => f.event === 'pusher:connection_established'), 'connection_established');
      const socketId = JSON.parse(frames[0].data).socket_id;
      const auth = encSdk.authorizeChannel(socketId, name);
      ws.send(JSON.stringify({ event: 'pusher:subscribe', data: { channel: name, auth: auth.auth } }));
      await waitFor(() => frames.find((f) => f.event === 'pusher_internal:subscription_succeeded'), 'subscription_succeeded');
      await encSdk.trigger(name, 'secret', { pin: '9999' });
      const ev = await waitFor(() => frames.find((f) => f.event === 'secret'), 'encrypted event frame');
      const payload = typeof ev.data === 'string' ? JSON.parse(ev.data) : ev.data;
      assert.equal(typeof payload.ciphertext, 'string');
      assert.equal(typeof payload.nonce, 'string');
      assert.ok(!JSON.stringify(ev).includes('9999'), 'plaintext must not appear on the wire');
    } finally {
      ws.close();
    }
  });
});

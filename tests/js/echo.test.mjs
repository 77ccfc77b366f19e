// Laravel Echo (broadcaster 'pusher') over pusher-js against weir: public,
// private and presence channels, whispers, with events triggered as a Laravel
// backend would (the npm `pusher` SDK with Laravel's event names).

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import Echo from 'laravel-echo';
import {
  startWeir, PusherClient, connected, once, disconnectAll, uniq, waitFor,
} from './support/weir.mjs';

describe('Laravel Echo over pusher-js', () => {
  let weir, app, sdk;
  const echos = [];

  before(async () => {
    weir = await startWeir();
    app = await weir.createApp({ client_events: true });
    sdk = weir.server(app);
  });
  after(async () => {
    for (const e of echos) { try { e.disconnect(); } catch { /* ignore */ } }
    await weir?.stop();
  });

  /** Echo built the way a Laravel app does it: `Pusher` class + options. */
  function echoWithOptions(user) {
    const e = new Echo({
      broadcaster: 'pusher',
      Pusher: PusherClient,
      key: app.key,
      cluster: 'mt1',
      wsHost: '127.0.0.1',
      wsPort: weir.port,
      forceTLS: false,
      enabledTransports: ['ws'],
      disableStats: true,
      withoutInterceptors: true,
      channelAuthorization: {
        customHandler: ({ socketId, channelName }, cb) => {
          try {
            cb(null, channelName.startsWith('presence-')
              ? sdk.authorizeChannel(socketId, channelName, { user_id: user.id, user_info: user })
              : sdk.authorizeChannel(socketId, channelName));
          } catch (err) { cb(err, null); }
        },
      },
    });
    echos.push(e);
    return e;
  }

  /** Echo given a ready pusher-js instance (`client` option). */
  function echoWithClient(user) {
    const client = weir.client(app, { presence: { user_id: user.id, user_info: user } });
    const e = new Echo({ broadcaster: 'pusher', client, withoutInterceptors: true });
    echos.push(e);
    return e;
  }

  const subscribedVia = (chan) => new Promise((resolve, reject) => {
    chan.subscribed(resolve);
    chan.error((err) => reject(new Error(`Echo subscription error: ${JSON.stringify(err)}`)));
  });

  it('listens on a public channel (namespaced and dot-prefixed event names)', async () => {
    const echo = echoWithOptions({ id: 'p1', name: 'Pat' });
    await connected(echo.connector.pusher);
    assert.match(echo.socketId(), /^\d+\.\d+$/);
    const name = uniq('orders.');
    const chan = echo.channel(name);
    const namespaced = once((h) => chan.listen('OrderShipped', h), 'App\\Events\\OrderShipped');
    const dotted = once((h) => chan.listen('.order.custom', h), '.order.custom');
    await subscribedVia(chan);
    await sdk.trigger(name, 'App\\Events\\OrderShipped', { order: { id: 7 } });
    await sdk.trigger(name, 'order.custom', { raw: true });
    assert.deepEqual(await namespaced, { order: { id: 7 } });
    assert.deepEqual(await dotted, { raw: true });
  });

  it('listens on a private channel', async () => {
    const echo = echoWithClient({ id: 'p2', name: 'Pia' });
    const name = uniq('App.Models.User.');
    const chan = echo.private(name);
    const got = once((h) => chan.listen('.notification', h), 'private notification');
    await subscribedVia(chan);
    await sdk.trigger(`private-${name}`, 'notification', { text: 'hi' });
    assert.deepEqual(await got, { text: 'hi' });
  });

  it('listens on an encrypted private channel (SDK encrypts, Echo + pusher-js decrypt)', async () => {
    const { randomBytes } = await import('node:crypto');
    const encSdk = weir.server(app, { encryptionMasterKeyBase64: randomBytes(32).toString('base64') });
    const client = weir.client(app, { sdk: encSdk });
    const echo = new Echo({ broadcaster: 'pusher', client, withoutInterceptors: true });
    echos.push(echo);
    const name = uniq('vault.');
    const chan = echo.encryptedPrivate(name);
    const got = once((h) => chan.listen('.sealed', h), 'decrypted sealed event');
    await subscribedVia(chan);
    await encSdk.trigger(`private-encrypted-${name}`, 'sealed', { code: 'x1' });
    assert.deepEqual(await got, { code: 'x1' });
  });

  it('reports here / joining / leaving on a presence channel and relays whispers', async () => {
    const room = uniq('chat.');
    const alice = echoWithOptions({ id: 'alice', name: 'Alice' });
    const here = once((h) => alice.join(room).here(h), 'here for alice');
    const hereMembers = await here;
    assert.deepEqual(hereMembers, [{ id: 'alice', name: 'Alice' }]);

    const joining = once((h) => alice.join(room).joining(h), 'joining bob');
    const bob = echoWithClient({ id: 'bob', name: 'Bob' });
    const bobHere = once((h) => bob.join(room).here(h), 'here for bob');
    assert.deepEqual(await joining, { id: 'bob', name: 'Bob' });
    const seenByBob = await bobHere;
    assert.deepEqual(seenByBob.map((m) => m.id).sort(), ['alice', 'bob']);

    const whisper = once((h) => bob.join(room).listenForWhisper('typing', h), 'whisper at bob');
    alice.join(room).whisper('typing', { name: 'Alice' });
    assert.deepEqual(await whisper, { name: 'Alice' });

    const leaving = once((h) => alice.join(room).leaving(h), 'leaving bob');
    bob.leave(room);
    assert.deepEqual(await leaving, { id: 'bob', name: 'Bob' });
    await waitFor(() => alice.connector.pusher.channel(`presence-${room}`).members.count === 1, 'alice alone again');
  });
});

// User sign-in (pusher.signin() with the SDK's authenticateUser), sending to a
// user, and terminateUserConnections.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startWeir, connected, subscribed, once, barrier, disconnectAll, uniq, waitFor, withWeirAndApp } from './support/weir.mjs';

describe('user sign-in and user connections', () => {
  let weir, app, sdk;
  const client = withWeirAndApp((s) => ({ weir, app, sdk } = s));

  /** Signs in and resolves with the pusher:signin_success data seen by pusher-js. */
  async function signIn(c) {
    await connected(c);
    const success = once((h) => c.connection.bind('message', (m) => { if (m.event === 'pusher:signin_success') h(m); }), 'pusher:signin_success');
    c.signin();
    await success;
    await c.user.signinDonePromise;
  }

  it('signs in with an SDK authenticateUser signature (pusher:signin_success)', async () => {
    const c = client({ user: { id: 'user-1', name: 'Ann', watchlist: ['x'] } });
    await signIn(c);
    assert.equal(c.user.user_data.id, 'user-1');
    assert.equal(c.user.user_data.name, 'Ann');
  });

  it('refuses a sign-in signed with the wrong secret', async () => {
    const wrong = weir.server({ ...app, secret: app.secret + 'nope' });
    const c = client({ user: { id: 'user-bad' }, sdk: wrong });
    await connected(c);
    const errs = [];
    c.connection.bind('error', (e) => errs.push(e));
    const msgs = [];
    c.connection.bind('message', (m) => msgs.push(m.event));
    c.signin();
    await waitFor(() => errs.length > 0 || c.connection.state !== 'connected', 'an error or a close for a bad sign-in');
    assert.ok(!msgs.includes('pusher:signin_success'), `no signin_success expected, got ${msgs}`);
  });

  it('delivers sendToUser events to the signed-in user', async () => {
    const c = client({ user: { id: 'user-send' } });
    await signIn(c);
    // pusher-js subscribes to #server-to-user-<id> after sign-in; wait for the server to confirm.
    const ch = await waitFor(() => {
      const x = c.user.serverToUserChannel;
      return x && x.subscribed && x;
    }, 'the #server-to-user-user-send subscription to succeed');
    assert.equal(ch.name, '#server-to-user-user-send');
    const got = once((h) => c.user.bind('notice', h), 'notice for user-send');
    await sdk.sendToUser('user-send', 'notice', { hello: 'you' });
    assert.deepEqual(await got, { hello: 'you' });
  });

  it('terminateUserConnections closes every connection of that user and no other', async () => {
    const u1a = client({ user: { id: 'victim' } });
    const u1b = client({ user: { id: 'victim' } });
    const other = client({ user: { id: 'bystander' } });
    await Promise.all([signIn(u1a), signIn(u1b), signIn(other)]);
    const original = new Map([[u1a, u1a.connection.socket_id], [u1b, u1b.connection.socket_id]]);
    const lostConnection = new Map();
    for (const c of [u1a, u1b]) {
      lostConnection.set(c, false);
      c.connection.bind('state_change', ({ previous }) => { if (previous === 'connected') lostConnection.set(c, true); });
    }
    const otherSocket = other.connection.socket_id;
    const name = uniq('bystander-');
    await subscribed(other, name);

    const res = await sdk.terminateUserConnections('victim');
    assert.equal(res.status, 200);
    await waitFor(
      () => [u1a, u1b].every((c) => lostConnection.get(c) || c.connection.socket_id !== original.get(c)),
      'both victim connections to be closed',
    );
    // The bystander keeps its connection and its subscriptions.
    await barrier(sdk, other, name);
    assert.equal(other.connection.state, 'connected');
    assert.equal(other.connection.socket_id, otherSocket);
  });
});

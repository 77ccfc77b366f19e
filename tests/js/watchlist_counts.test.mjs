// Subscription counts (`pusher:subscription_count`, apps with `subscription_count` on) and
// watchlist events (`pusher.user.watchlist`), seen through pusher-js with signatures from the
// npm `pusher` SDK. Across two nodes: tests/js/cluster.test.mjs.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import {
  connected, subscribed, once, barrier, uniq, waitFor, withWeirAndApp, webhookReceiver, webhookSettings,
} from './support/weir.mjs';

/** Records every `pusher:subscription_count` a channel hears, in order. */
function counts(channel) {
  const seen = [];
  channel.bind('pusher:subscription_count', (d) => seen.push(d.subscription_count));
  return seen;
}

/** Signs `c` in and resolves once pusher-js has seen `pusher:signin_success`. */
async function signIn(c) {
  await connected(c);
  const success = once((h) => c.connection.bind('message', (m) => { if (m.event === 'pusher:signin_success') h(m); }), 'pusher:signin_success');
  c.signin();
  await success;
}

/** Records every watchlist event a client hears, as `online:id,id` / `offline:id`. */
function watchlistEvents(c) {
  const seen = [];
  for (const name of ['online', 'offline']) {
    c.user.watchlist.bind(name, (e) => seen.push(`${e.name}:${[...e.user_ids].sort().join(',')}`));
  }
  return seen;
}

describe('subscription counts', () => {
  let weir, app, sdk, hooks;
  const client = withWeirAndApp((s) => ({ weir, app, sdk } = s), { subscription_count: true });

  it('tells each subscriber how many connections are subscribed, as that changes', async () => {
    const name = uniq('counted-');
    const a = client();
    const aCounts = counts(a.subscribe(name));
    await subscribed(a, name);
    await waitFor(() => aCounts.at(-1) === 1, 'the first subscriber to hear 1');
    const b = client();
    const bCounts = counts(b.subscribe(name));
    await subscribed(b, name);
    await waitFor(() => aCounts.at(-1) === 2 && bCounts.at(-1) === 2, `both to hear 2 (a: ${aCounts}, b: ${bCounts})`);
    assert.equal(a.channel(name).subscriptionCount, 2, "pusher-js keeps the count on the channel");
    b.unsubscribe(name);
    await waitFor(() => aCounts.at(-1) === 1, `a to hear 1 again (a: ${aCounts})`);
  });

  it('tells a burst of subscriptions in a few events, not one per subscriber', async () => {
    const name = uniq('burst-');
    const first = client();
    const seen = counts(first.subscribe(name));
    await subscribed(first, name);
    const others = Array.from({ length: 30 }, () => client());
    await Promise.all(others.map((c) => { c.subscribe(name); return subscribed(c, name); }));
    await waitFor(() => seen.at(-1) === 31, `the first subscriber to hear 31 (heard ${seen})`);
    assert.ok(seen.length <= 8, `at most one count a second: heard ${seen.length} counts (${seen})`);
    // Every subscriber ends with the same count, the late ones included.
    await waitFor(() => others.every((c) => c.channel(name).subscriptionCount === 31), 'every subscriber to hold 31');
  });

  it('tells nothing on presence channels', async () => {
    const name = uniq('presence-counted-');
    const c = client({ presence: { user_id: 'p1', user_info: {} } });
    const seen = counts(c.subscribe(name));
    await subscribed(c, name);
    await barrier(sdk, c, name);
    assert.deepEqual(seen, []);
  });

  it('sends the subscription_count webhook with the total', async () => {
    hooks = await webhookReceiver();
    const hooked = await weir.createApp({ subscription_count: true, ...webhookSettings(hooks.url, ['subscription_count']) });
    const name = uniq('hooked-');
    const c = weir.client(hooked);
    try {
      c.subscribe(name);
      await subscribed(c, name);
      const event = await waitFor(
        () => hooks.events().find((e) => e.channel === name),
        'a subscription_count webhook',
      );
      const { delivery, ...fields } = event;
      assert.deepEqual(fields, { name: "subscription_count", channel: name, subscription_count: 1 });
    } finally {
      c.disconnect();
      await hooks.close();
    }
  });
});

describe('subscription counts are off unless the app turns them on', () => {
  let sdk;
  const client = withWeirAndApp((s) => ({ sdk } = s));

  it('tells nothing by default', async () => {
    const name = uniq('uncounted-');
    const c = client();
    const seen = counts(c.subscribe(name));
    await subscribed(c, name);
    await barrier(sdk, c, name);
    assert.deepEqual(seen, []);
  });
});

describe('watchlist events', () => {
  let weir;
  const client = withWeirAndApp((s) => ({ weir } = s));

  it('tells a user who of their watchlist is online, then who comes and goes', async () => {
    const [bob, cid, dan] = [uniq('bob-'), uniq('cid-'), uniq('dan-')];
    const bobClient = client({ user: { id: bob } });
    await signIn(bobClient);
    const ann = client({ user: { id: uniq('ann-'), watchlist: [bob, cid, dan] } });
    const seen = watchlistEvents(ann);
    await signIn(ann);
    await waitFor(() => seen.length >= 1, 'the watched users online at sign-in');
    assert.deepEqual(seen, [`online:${bob}`]);

    const cid1 = client({ user: { id: cid } });
    await signIn(cid1);
    await waitFor(() => seen.length >= 2, `cid coming online (seen ${seen})`);
    // A second connection of an online user, then the first one leaving: no event.
    const cid2 = client({ user: { id: cid } });
    await signIn(cid2);
    cid1.disconnect();
    bobClient.disconnect();
    await waitFor(() => seen.length >= 3, `bob going offline (seen ${seen})`);
    cid2.disconnect();
    await waitFor(() => seen.length >= 4, `cid going offline with its last connection (seen ${seen})`);
    assert.deepEqual(seen, [`online:${bob}`, `online:${cid}`, `offline:${bob}`, `offline:${cid}`]);
  });

  it('refuses a sign-in whose watchlist is not a list of user ids', async () => {
    const c = client({ user: { id: uniq('bad-'), watchlist: 'everyone' } });
    await connected(c);
    const messages = [];
    c.connection.bind('message', (m) => messages.push(m));
    c.signin();
    const error = await waitFor(() => messages.find((m) => m.event === 'pusher:error'), 'a pusher:error');
    assert.match(error.data.message, /watchlist must be an array/);
    assert.ok(!messages.some((m) => m.event === 'pusher:signin_success'));
  });

  it('tells nothing when the app turns watchlist events off', async () => {
    const quiet = await weir.createApp({ watchlist_events: false });
    const eve = uniq('eve-');
    const watcher = weir.client(quiet, { user: { id: uniq('fay-'), watchlist: [eve] } });
    const watched = weir.client(quiet, { user: { id: eve } });
    try {
      const messages = [];
      watcher.connection.bind('message', (m) => messages.push(m.event));
      await signIn(watcher);
      await signIn(watched);
      // The watcher's events are queued in order: a barrier event after the sign-in proves
      // that no watchlist event was queued before it.
      const name = uniq('after-');
      watcher.subscribe(name);
      await subscribed(watcher, name);
      await barrier(weir.server(quiet), watcher, name);
      assert.ok(!messages.includes('pusher_internal:watchlist_events'), `no watchlist event expected: ${messages}`);
    } finally {
      watcher.disconnect();
      watched.disconnect();
    }
  });
});

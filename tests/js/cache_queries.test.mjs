// Cache channels (last event replayed on subscribe, pusher:cache_miss) and the
// channel query endpoints of the HTTP API, through the npm `pusher` SDK.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startWeir, subscribed, once, collect, barrier, disconnectAll, uniq, waitFor, withWeirAndApp } from './support/weir.mjs';

const member = (id, name) => ({ user_id: id, user_info: { name } });

describe('cache channels', () => {
  let weir, app, sdk;
  const client = withWeirAndApp((s) => ({ weir, app, sdk } = s));

  for (const prefix of ['cache-', 'private-cache-', 'presence-cache-']) {
    it(`replays the last event to a new ${prefix} subscriber`, async () => {
      const name = uniq(`${prefix}price-`);
      await sdk.trigger(name, 'price', { v: 1 });
      await sdk.trigger(name, 'price', { v: 2 });
      const c = client({ presence: member('cache-user', 'C') });
      const ch = c.subscribe(name);
      const got = collect(ch, 'price');
      const first = once((h) => ch.bind('price', h), `replayed price on ${name}`);
      await new Promise((resolve, reject) => {
        ch.bind('pusher:subscription_succeeded', resolve);
        ch.bind('pusher:subscription_error', (e) => reject(new Error(JSON.stringify(e))));
      });
      assert.deepEqual(await first, { v: 2 }, 'the last event, not the first');
      // Live events still flow after the replay; the replay happens once.
      const live = once((h) => ch.bind('price', (d) => { if (d.v === 3) h(d); }), 'live price 3');
      await sdk.trigger(name, 'price', { v: 3 });
      await live;
      assert.deepEqual(got.map((g) => g.data), [{ v: 2 }, { v: 3 }]);
    });
  }

  it('sends pusher:cache_miss when a cache channel has no event yet', async () => {
    const name = uniq('cache-empty-');
    const c = client();
    const ch = c.subscribe(name);
    const miss = once((h) => ch.bind('pusher:cache_miss', h), 'pusher:cache_miss');
    await miss;
  });

  it('does not replay on a plain (non-cache) channel', async () => {
    const name = uniq('plain-');
    await sdk.trigger(name, 'old', { stale: true });
    const c = client();
    const ch = await subscribed(c, name);
    const got = collect(ch, 'old');
    await barrier(sdk, c, name);
    assert.equal(got.length, 0);
  });
});

describe('channel queries through the SDK', () => {
  let weir, app, sdk;
  const client = withWeirAndApp((s) => ({ weir, app, sdk } = s));

  const get = async (p, params) => {
    const res = await sdk.get({ path: p, params });
    assert.equal(res.status, 200, `GET ${p} ${JSON.stringify(params)} -> ${res.status}`);
    return res.json();
  };

  it('lists occupied channels, filters by prefix, and reports user_count for presence', async () => {
    const pub = 'news-q';
    const pres = 'presence-lobby-q';
    const a = client({ presence: member('qa', 'A') });
    const b = client({ presence: member('qb', 'B') });
    const b2 = client({ presence: member('qb', 'B') });
    await Promise.all([subscribed(a, pub), subscribed(a, pres), subscribed(b, pres), subscribed(b2, pres)]);

    const all = await get('/channels');
    assert.ok(all.channels && typeof all.channels === 'object', JSON.stringify(all));
    assert.ok(pub in all.channels, `${pub} listed: ${JSON.stringify(all)}`);
    assert.ok(pres in all.channels, `${pres} listed: ${JSON.stringify(all)}`);

    const onlyPresence = await get('/channels', { filter_by_prefix: 'presence-', info: 'user_count' });
    assert.deepEqual(onlyPresence, { channels: { [pres]: { user_count: 2 } } });
  });

  it('rejects info=user_count without a presence- prefix filter (400)', async () => {
    const res = await sdk.get({ path: '/channels', params: { info: 'user_count' } }).catch((e) => e);
    assert.equal(res.status, 400);
  });

  it('reports one channel: occupied, subscription_count, user_count', async () => {
    const pres = uniq('presence-one-');
    const a = client({ presence: member('x1', 'X') });
    const b = client({ presence: member('x2', 'Y') });
    const c = client({ presence: member('x2', 'Y') });
    await Promise.all([subscribed(a, pres), subscribed(b, pres), subscribed(c, pres)]);
    const info = await get(`/channels/${pres}`, { info: 'user_count,subscription_count' });
    assert.deepEqual(info, { occupied: true, user_count: 2, subscription_count: 3 });

    const plain = await get(`/channels/${uniq('nobody-')}`);
    assert.equal(plain.occupied, false);
  });

  it('lists the users of a presence channel', async () => {
    const pres = uniq('presence-users-');
    const a = client({ presence: member('ua', 'A') });
    const b = client({ presence: member('ub', 'B') });
    await Promise.all([subscribed(a, pres), subscribed(b, pres)]);
    const body = await get(`/channels/${pres}/users`);
    assert.deepEqual(body.users.map((u) => u.id).sort(), ['ua', 'ub']);
    for (const u of body.users) assert.deepEqual(Object.keys(u), ['id']);

    b.disconnect();
    await waitFor(async () => (await get(`/channels/${pres}/users`)).users.length === 1, 'user list to shrink after a leave');
  });

  it('refuses /users on a non-presence channel (400)', async () => {
    const res = await sdk.get({ path: '/channels/not-presence/users' }).catch((e) => e);
    assert.equal(res.status, 400);
  });
});

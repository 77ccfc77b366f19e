// Webhooks: weir posts channel_occupied / channel_vacated / member_added /
// member_removed / client_event to a receiver in this test, signed so that the
// npm `pusher` SDK's own webhook helper accepts them.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startWeir, subscribed, disconnectAll, uniq, waitFor, webhookReceiver, webhookSettings,
} from './support/weir.mjs';

// Pusher batches webhooks and may delay channel_vacated a little; allow for it.
const HOOK_DEADLINE_MS = 20_000;
const EVENT_TYPES = ['channel_occupied', 'channel_vacated', 'member_added', 'member_removed', 'client_event', 'cache_miss'];

describe('webhooks validated with the SDK helper', () => {
  let weir, app, sdk, hooks;
  const clients = [];
  const client = (opts) => { const c = weir.client(app, opts); clients.push(c); return c; };

  before(async () => {
    hooks = await webhookReceiver();
    weir = await startWeir();
    app = await weir.createApp({ client_events: true, ...webhookSettings(hooks.url, EVENT_TYPES) });
    sdk = weir.server(app);
  });
  after(async () => {
    disconnectAll(...clients);
    await weir?.stop();
    await hooks?.close();
  });

  const findEvent = (pred, what) => waitFor(() => hooks.events().find(pred), what, HOOK_DEADLINE_MS);

  it('sends channel_occupied and channel_vacated for a public channel', async () => {
    const name = uniq('hooked-');
    const c = client();
    await subscribed(c, name);
    const occ = await findEvent((e) => e.name === 'channel_occupied' && e.channel === name, `channel_occupied for ${name}`);
    assert.equal(occ.delivery.method, 'POST');
    c.unsubscribe(name);
    await findEvent((e) => e.name === 'channel_vacated' && e.channel === name, `channel_vacated for ${name}`);
  });

  it('sends member_added and member_removed for a presence channel', async () => {
    const name = uniq('presence-hooked-');
    const c = client({ presence: { user_id: 'hook-user', user_info: { n: 1 } } });
    await subscribed(c, name);
    await findEvent((e) => e.name === 'member_added' && e.channel === name && e.user_id === 'hook-user', 'member_added');
    c.unsubscribe(name);
    await findEvent((e) => e.name === 'member_removed' && e.channel === name && e.user_id === 'hook-user', 'member_removed');
  });

  it('sends client_event with channel, event, data and socket_id', async () => {
    const name = uniq('private-hooked-');
    const a = client();
    const b = client();
    const [cha] = await Promise.all([subscribed(a, name), subscribed(b, name)]);
    cha.trigger('client-ping', { n: 5 });
    const ev = await findEvent((e) => e.name === 'client_event' && e.channel === name, 'client_event');
    assert.equal(ev.event, 'client-ping');
    assert.equal(ev.socket_id, a.connection.socket_id);
    const data = typeof ev.data === 'string' ? JSON.parse(ev.data) : ev.data;
    assert.deepEqual(data, { n: 5 });
  });

  it('sends cache_miss when a cache channel without an event is subscribed', async () => {
    const name = uniq('cache-hooked-');
    const c = client();
    c.subscribe(name);
    await findEvent((e) => e.name === 'cache_miss' && e.channel === name, `cache_miss for ${name}`);
  });

  it('every delivery is a JSON body {time_ms, events} signed for this app (SDK isValid)', async () => {
    await waitFor(() => hooks.deliveries.length > 0, 'at least one webhook delivery', HOOK_DEADLINE_MS);
    for (const d of hooks.deliveries) {
      assert.equal(d.headers['x-pusher-key'], app.key);
      assert.match(d.headers['x-pusher-signature'], /^[0-9a-f]{64}$/);
      assert.equal(d.headers['content-type'], 'application/json', 'the SDK helper only accepts exactly application/json');
      assert.equal(typeof d.body.time_ms, 'number');
      assert.ok(Array.isArray(d.body.events) && d.body.events.length > 0);
      const hook = sdk.webhook({ headers: d.headers, rawBody: d.rawBody });
      assert.equal(hook.isValid(), true, `SDK rejects delivery: ${d.rawBody}`);
      assert.deepEqual(hook.getEvents(), d.body.events);
    }
  });

  it('a delivery does not validate with the wrong secret or a tampered body', async () => {
    await waitFor(() => hooks.deliveries.length > 0, 'at least one webhook delivery', HOOK_DEADLINE_MS);
    const d = hooks.deliveries[0];
    const wrong = weir.server({ ...app, secret: app.secret + 'bad' });
    assert.equal(wrong.webhook({ headers: d.headers, rawBody: d.rawBody }).isValid(), false);
    const tampered = d.rawBody.replace(/"time_ms":\s*(\d)/, (_, digit) => `"time_ms":${(Number(digit) + 1) % 10}`);
    assert.notEqual(tampered, d.rawBody);
    assert.equal(sdk.webhook({ headers: d.headers, rawBody: tampered }).isValid(), false);
  });
});

describe('webhook delivery is retried after a failure', () => {
  let weir, app, hooks, c;
  let refusals = 0;

  before(async () => {
    // The receiver refuses the first two deliveries with 503, then accepts.
    hooks = await webhookReceiver({ respond: () => (refusals++ < 2 ? 503 : 200) });
    weir = await startWeir();
    app = await weir.createApp(webhookSettings(hooks.url, ['channel_occupied']));
  });
  after(async () => {
    if (c) disconnectAll(c);
    await weir?.stop();
    await hooks?.close();
  });

  it('delivers the same signed event again until the receiver accepts it', async () => {
    const name = uniq('retried-');
    c = weir.client(app);
    await subscribed(c, name);
    const forName = () => hooks.deliveries.filter((d) => (d.body?.events || []).some((e) => e.name === 'channel_occupied' && e.channel === name));
    await waitFor(() => forName().length >= 3, `three deliveries of channel_occupied for ${name} (2 refused, 1 accepted)`, HOOK_DEADLINE_MS);
    const sdk = weir.server(app);
    for (const d of forName()) {
      assert.equal(sdk.webhook({ headers: d.headers, rawBody: d.rawBody }).isValid(), true);
    }
  });
});

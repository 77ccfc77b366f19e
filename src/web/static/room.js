/* weir waiting page: live position over weir's Pusher-protocol WebSocket (internal app),
 * polling /r/{room}/status with jittered backoff while the socket is down.
 * The page embeds its config (ticket, counters, words) in #weir-config; one broadcast of the
 * room's serving counter serves every waiter, each computing its own position and ETA. */
(function () {
  'use strict';
  var cfgEl = document.getElementById('weir-config');
  if (!cfgEl || !window.JSON) return;
  var c;
  try { c = JSON.parse(cfgEl.textContent); } catch (e) { return; }
  // Every language's phrases, filled in by the server when it builds this script.
  var PHRASES = /*weir:phrases*/{};
  var t = PHRASES[c.lang] || PHRASES.en;
  var skew = Date.now() - c.now_ms;  // server time ≈ Date.now() - skew
  var serving = c.serving, rate = c.rate, state = c.state;
  var ws = null, wsUp = false, wsRetry = 0, wsTimer = null;
  var pollTimer = null, pollFailures = 0;
  var leaving = false, checking = false;

  function $(id) { return document.getElementById(id); }
  function setText(id, s) { var e = $(id); if (e && e.textContent !== String(s)) e.textContent = s; }
  function jitter(ms) { return Math.round(ms * (0.5 + Math.random())); }
  function duration(s) {
    if (s < 60) return t.less_than_a_minute;
    if (s < 5400) { var m = Math.round(s / 60); return m === 1 ? t.about_minute : t.about_minutes.replace('{n}', m); }
    var h = Math.round(s / 3600); return h === 1 ? t.about_hour : t.about_hours.replace('{n}', h);
  }
  function note(s) { var e = $('weir-note'); if (!e) return; e.hidden = !s; e.textContent = s || ''; }
  function reload() { if (leaving) return; leaving = true; setTimeout(function () { location.reload(); }, jitter(600)); }

  function show(position, eta) {
    setText('position', position);
    setText('eta', eta == null ? t.eta_unknown : duration(eta));
    var p = $('progress');
    if (p && c.rank > 0) p.value = Math.max(0, Math.min(100, 100 - Math.floor(position * 100 / c.rank)));
  }
  // Same arithmetic as room::queue::position, on the visitor's rank (place in line).
  function fromCounter() {
    if (state !== 'open' || !c.rank) return;
    if (c.rank <= serving) return admit();
    var pos = c.rank - serving - 1;
    show(pos, rate > 0 ? Math.ceil(pos * 60 / rate) : null);
  }

  function go(url) { leaving = true; stopPolling(); if (ws) ws.close(1000); location.replace(url); }
  function handleStatus(s) {
    if (s.admitted && s.redirect_url) return go(s.redirect_url);
    if (s.state !== state) return reload();
    if (s.position != null) show(s.position, s.eta_seconds);
    if (state === 'open' && c.rank && c.rank <= serving) setTimeout(admit, jitter(1000));
  }
  function fetchStatus() {
    return fetch(c.status_url, { credentials: 'same-origin', cache: 'no-store', headers: { Accept: 'application/json' } })
      .then(function (r) { if (!r.ok) throw new Error('status ' + r.status); return r.json(); });
  }
  // The counter passed our ticket: ask once for the redirect (and the token cookie).
  function admit() {
    if (checking || leaving) return;
    checking = true;
    note(t.your_turn);
    fetchStatus().then(function (s) { checking = false; handleStatus(s); })
      .catch(function () { checking = false; setTimeout(admit, jitter(2000)); });
  }

  // Polling fallback: steady interval from the ETA, exponential backoff on errors.
  function stopPolling() { if (pollTimer) clearTimeout(pollTimer); pollTimer = null; }
  function schedulePoll(ms) { stopPolling(); if (!leaving && !wsUp) pollTimer = setTimeout(poll, jitter(ms)); }
  function poll() {
    pollTimer = null;
    if (wsUp || leaving) return;
    fetchStatus().then(function (s) {
      pollFailures = 0;
      handleStatus(s);
      var eta = s.eta_seconds == null ? 20 : s.eta_seconds;
      schedulePoll(Math.min(15000, Math.max(2000, eta * 250)));
    }).catch(function () {
      pollFailures++;
      schedulePoll(Math.min(60000, 2000 * Math.pow(2, pollFailures)));
    });
  }

  function socketUp() {
    wsUp = true; wsRetry = 0;
    stopPolling(); note('');
  }
  function socketDown() {
    wsUp = false; ws = null;
    if (leaving) return;
    if (!pollTimer) schedulePoll(wsRetry === 0 ? 1000 : 3000);
    if (wsRetry > 1) note(t.offline);
    wsRetry++;
    if (wsTimer) clearTimeout(wsTimer);
    wsTimer = setTimeout(connect, jitter(Math.min(60000, 1000 * Math.pow(2, wsRetry))));
  }
  function send(o) { try { ws.send(JSON.stringify(o)); } catch (e) { /* closing */ } }
  function connect() {
    wsTimer = null;
    if (leaving || !window.WebSocket) { if (!window.WebSocket) schedulePoll(1000); return; }
    var url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/app/' +
      encodeURIComponent(c.key) + '?protocol=7&client=weir-room&version=1';
    var sock;
    try { sock = new WebSocket(url); } catch (e) { return socketDown(); }
    ws = sock;
    var idle = null, activity = 120;
    function alive() {
      if (idle) clearTimeout(idle);
      idle = setTimeout(function () { send({ event: 'pusher:ping', data: {} });
        idle = setTimeout(function () { sock.close(); }, 30000); }, activity * 1000);
    }
    sock.onmessage = function (m) {
      alive();
      var f; try { f = JSON.parse(m.data); } catch (e) { return; }
      var d = f.data;
      if (typeof d === 'string') { try { d = JSON.parse(d); } catch (e) { /* plain string */ } }
      switch (f.event) {
        case 'pusher:connection_established':
          activity = Math.max(10, Math.min(120, (d && d.activity_timeout) || 120));
          send({ event: 'pusher:subscribe', data: { channel: c.channel } });
          // Tell weir this socket is ours: while it stays open we count as present.
          if (d && d.socket_id && c.ticket) {
            fetch(c.socket_url, { method: 'POST', credentials: 'same-origin',
              headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ socket_id: d.socket_id }) })
              .catch(function () { /* presence falls back to status requests */ });
          }
          break;
        case 'pusher_internal:subscription_succeeded': socketUp(); break;
        case 'pusher:ping': send({ event: 'pusher:pong', data: {} }); break;
        case 'weir:counter':
          if (d && typeof d.serving === 'number') {
            serving = Math.max(serving, d.serving);
            if (typeof d.rate_per_minute === 'number') rate = d.rate_per_minute;
            fromCounter();
          }
          break;
        case 'weir:state':
          if (d && d.state && d.state !== state) reload();
          break;
      }
    };
    sock.onclose = function () { if (idle) clearTimeout(idle); if (ws === sock) socketDown(); };
  }

  // Scheduled rooms: a local countdown; the open arrives as a weir:state event.
  function countdown() {
    if (state !== 'scheduled' || !c.starts_at_ms || leaving) return;
    var left = Math.max(0, Math.ceil((c.starts_at_ms - (Date.now() - skew)) / 1000));
    var d = Math.floor(left / 86400), h = Math.floor(left % 86400 / 3600), m = Math.floor(left % 3600 / 60), s = left % 60;
    var two = function (n) { return (n < 10 ? '0' : '') + n; };
    setText('countdown', (d ? d + ' d ' : '') + h + ':' + two(m) + ':' + two(s));
    if (left === 0) { setTimeout(function () { if (state === 'scheduled') reload(); }, 3000 + jitter(2000)); return; }
    setTimeout(countdown, 1000 - ((Date.now() - skew) % 1000));
  }

  if (state === 'closed') return;
  if (state === 'passthrough') { if (c.redirect_url) go(c.redirect_url); return; }
  document.documentElement.classList.add('weir-live');
  countdown();
  fromCounter();
  connect();
})();

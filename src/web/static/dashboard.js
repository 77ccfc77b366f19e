/* weir dashboard: polls GET /api/v1/stats with the admin key (kept in sessionStorage, never in
 * the URL) every 2 s, backing off to 10 s while the server is unreachable, and draws the
 * history as inline SVG line charts plus the rooms, apps and top-talkers tables.
 * Everything shown comes from the server as data and is inserted with textContent. */
(function () {
  'use strict';
  var STORE = 'weir-admin-key', ROOM_STORE = 'weir-dashboard-room';
  var POLL_MS = 2000, RETRY_MS = 10000, TIMEOUT_MS = 10000;
  var SVG = 'http://www.w3.org/2000/svg';
  var CHARTS = [
    { id: 'queue_length', title: 'Queue length', perRoom: true },
    { id: 'admitted_per_minute', title: 'Admitted per minute', perRoom: true },
    { id: 'origin_latency_ms', title: 'Origin latency (ms)', perRoom: true },
    { id: 'connections', title: 'Realtime connections' },
    { id: 'messages_per_second', title: 'Messages per second' }
  ];

  var root = document.documentElement;
  var memoryKey = null;          // when sessionStorage is unavailable
  var timer = null, request = null, generation = 0;
  var last = null;               // the last stats answer, redrawn on resize and room change
  var roomIds = '';              // the room options currently in the select, joined
  var focusOnLive = false;       // move focus to the dashboard once a typed key is accepted

  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = String(text);
    return e;
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVG, tag);
    for (var k in attrs) if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = String(text);
    return e;
  }

  function store(name, value) {
    try {
      if (value == null) sessionStorage.removeItem(name); else sessionStorage.setItem(name, value);
      return true;
    } catch (e) { return false; }
  }
  function stored(name) { try { return sessionStorage.getItem(name); } catch (e) { return null; } }
  function getKey() { return stored(STORE) || memoryKey; }
  function setKey(k) { memoryKey = k; if (k != null && store(STORE, k)) memoryKey = null; if (k == null) store(STORE, null); }

  // ---- formatting ----
  function isNum(v) { return typeof v === 'number' && isFinite(v); }
  function fmt(v) {
    if (!isNum(v)) return '–';
    var a = Math.abs(v), digits = Number.isInteger(v) ? 0 : a < 10 ? 2 : a < 100 ? 1 : 0;
    return v.toLocaleString('en', { maximumFractionDigits: digits });
  }
  function two(n) { return (n < 10 ? '0' : '') + n; }
  function clock(ms) { var d = new Date(ms); return two(d.getHours()) + ':' + two(d.getMinutes()) + ':' + two(d.getSeconds()); }
  function duration(s) {
    if (!isNum(s)) return '–';
    if (s < 60) return Math.round(s) + ' s';
    if (s < 5400) return Math.round(s / 60) + ' min';
    return (Math.round(s / 360) / 10) + ' h';
  }
  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }

  // ---- views and state ----
  function setState(s) { if (s) root.setAttribute('data-state', s); else root.removeAttribute('data-state'); }
  function notice(s) { var n = $('notice'); n.hidden = !s; n.textContent = s || ''; }
  function status(s) { $('status').hidden = !s; $('status-text').textContent = s || ''; }

  function showSignin(message) {
    stop();
    last = null;
    clearData();
    $('dashboard').hidden = true;
    $('signout').hidden = true;
    status('');
    notice('');
    var err = $('signin-error');
    err.hidden = !message;
    err.textContent = message || '';
    var input = $('key');
    input.value = '';
    input.setAttribute('aria-invalid', message ? 'true' : 'false');
    $('signin-button').disabled = false;
    $('signin-button').textContent = 'Show dashboard';
    $('signin').hidden = false;
    setState('signed-out');
    input.focus();
  }
  function showDashboard() {
    $('signin').hidden = true;
    $('dashboard').hidden = false;
    $('signout').hidden = false;
  }

  function stop() {
    generation++;
    if (timer) clearTimeout(timer);
    timer = null;
    if (request) request.abort();
    request = null;
  }
  function schedule(ms) {
    if (timer) clearTimeout(timer);
    timer = setTimeout(poll, ms);
  }

  // ---- polling ----
  function poll() {
    timer = null;
    var key = getKey();
    if (!key) return showSignin('');
    var mine = ++generation;
    var ctl = window.AbortController ? new AbortController() : null;
    request = ctl;
    var timeout = setTimeout(function () { if (ctl) ctl.abort(); }, TIMEOUT_MS);
    // After the first answer only the samples after the newest one held are asked for.
    var held = last && last.history && Array.isArray(last.history.t) ? last.history.t : [];
    var since = held.length ? '?since=' + encodeURIComponent(held[held.length - 1]) : '';
    fetch('/api/v1/stats' + since, {
      headers: { Authorization: 'Bearer ' + key, Accept: 'application/json' },
      cache: 'no-store', credentials: 'omit', signal: ctl ? ctl.signal : undefined
    }).then(function (r) {
      return r.text().then(function (body) {
        var json = null;
        try { json = body ? JSON.parse(body) : null; } catch (e) { /* not JSON */ }
        return { status: r.status, json: json };
      });
    }).then(function (res) {
      clearTimeout(timeout);
      if (mine !== generation) return;
      request = null;
      if (res.status === 401 || res.status === 403) {
        setKey(null);
        return showSignin('That key was refused');
      }
      if (res.status === 200 && res.json && typeof res.json === 'object') {
        try { render(res.json); } catch (e) { return failed('The answer could not be shown (' + e.message + ')'); }
        notice('');
        setState('live');
        return schedule(POLL_MS);
      }
      var msg = res.json && res.json.error && res.json.error.message;
      failed('The server answered ' + res.status + (msg ? ': ' + msg : ''));
    }, function () {
      clearTimeout(timeout);
      if (mine !== generation) return;
      request = null;
      failed('');
    });
  }
  function failed(why) {
    showDashboard();
    setState('retrying');
    notice('Connection lost, retrying every ' + RETRY_MS / 1000 + ' s' + (why ? '. ' + why + '.' : '.') +
      (last ? ' Showing the data of ' + clock(last.now_ms) + '.' : ''));
    status(last ? 'retrying · last update ' + clock(last.now_ms) : 'retrying');
    schedule(RETRY_MS);
  }

  function signIn(key) {
    stop();
    setKey(key);
    poll();
  }

  // ---- rendering ----
  function clearData() {
    var ids = ['rooms', 'apps', 'top-channels', 'top-apps', 'top-ips'];
    for (var i = 0; i < ids.length; i++) fillTable(ids[i], [], 1, function () { return []; });
    for (var j = 0; j < CHARTS.length; j++) drawChart(CHARTS[j], [], [], '');
    var sel = $('room');
    while (sel.options.length > 1) sel.remove(1);
    roomIds = '';
    $('window').textContent = '';
  }

  // The answer's history joined to the one held: appended when the server says it follows on
  // (`full: false`), replaced otherwise; at most `history_len` samples, like the server's ring.
  // Every room's series stays aligned with `t` (null where a room had no sample).
  function mergeHistory(held, h, keep) {
    if (!held || !h || h.full !== false || !Array.isArray(held.t)) return h;
    var n = held.t.length, m = Array.isArray(h.t) ? h.t.length : 0;
    var drop = Math.max(0, n + m - (keep > 0 ? keep : n + m));
    function join(a, b, na, nb) {
      a = Array.isArray(a) ? a : []; b = Array.isArray(b) ? b : [];
      var out = a.slice(0, na);
      while (out.length < na) out.push(null);
      for (var i = 0; i < nb; i++) out.push(i < b.length ? b[i] : null);
      return out.slice(drop);
    }
    var out = { full: true, rooms: {} };
    Object.keys(h).forEach(function (k) { if (k !== 'rooms' && k !== 'full') out[k] = join(held[k], h[k], n, m); });
    var hr = held.rooms || {}, nr = h.rooms || {};
    Object.keys(hr).concat(Object.keys(nr)).forEach(function (id) {
      if (out.rooms[id]) return;
      var a = hr[id] || {}, b = nr[id] || {}, r = {}, any = false;
      Object.keys(a).concat(Object.keys(b)).forEach(function (k) {
        if (r[k]) return;
        r[k] = join(a[k], b[k], n, m);
        for (var i = 0; i < r[k].length; i++) if (r[k][i] !== null) any = true;
      });
      // A room whose samples have all left the window is gone from the history, as on the server.
      if (any) out.rooms[id] = r;
    });
    return out;
  }

  function render(s) {
    var first = !last;
    s.history = mergeHistory(last && last.history, s.history, s.history_len);
    last = s;
    showDashboard();
    var h = s.history || {};
    var t = Array.isArray(h.t) ? h.t : [];
    var rooms = Array.isArray(s.rooms) ? s.rooms : [];
    var rt = s.realtime || {};
    var top = s.top || {};
    updateRooms(h.rooms || {}, rooms);
    drawCharts();
    status((s.node ? 'node ' + s.node + ' · ' : '') + 'live · updated ' + clock(s.now_ms || Date.now()));
    $('window').textContent = t.length > 1 ? 'last ' + duration((t[t.length - 1] - t[0]) / 1000) : '';
    if (top.window_seconds) $('top-window').textContent = '(last ' + duration(top.window_seconds).replace('1 min', 'minute') + ')';

    fillTable('rooms', rooms, 9, function (r) {
      var state = el('span', 'state ' + String(r.state || ''), r.state);
      var admitted = fmt(r.admitted_last_minute) + ' / ' + fmt(r.target_per_minute);
      return [r.id, { text: r.name, cls: 'text' }, { node: state }, num(r.queue_length), num(r.live_waiters),
        { text: admitted, cls: 'num' }, num(r.active_users),
        { text: isNum(r.probe_latency_ms) ? fmt(r.probe_latency_ms) + ' ms' : '–', cls: 'num' },
        { text: duration(r.eta_last_ticket_seconds), cls: 'num' }];
    });
    fillTable('apps', Array.isArray(rt.apps) ? rt.apps : [], 3, function (a) {
      var id = el('span', null, a.id);
      if (a.internal === true) {
        var wrap = el('span');
        wrap.append(id, ' ', el('span', 'muted', '(internal)'));
        id = wrap;
      }
      return [{ node: id }, num(a.connections), num(a.messages_per_second)];
    });
    fillTable('top-channels', top.channels || [], 3, function (c) { return [c.app, { text: c.channel, cls: 'text' }, num(c.count)]; });
    fillTable('top-apps', top.apps || [], 2, function (a) { return [a.app, num(a.count)]; });
    fillTable('top-ips', top.ips || [], 2, function (i) { return [i.ip, num(i.count)]; });
    if (first && focusOnLive) $('dashboard').focus({ preventScroll: true });
    focusOnLive = false;
  }
  function num(v) { return { text: fmt(v), cls: 'num' }; }

  function fillTable(id, rows, columns, cells) {
    var body = $(id).tBodies[0];
    var out = document.createDocumentFragment();
    for (var i = 0; i < rows.length; i++) {
      var tr = document.createElement('tr');
      var cs = cells(rows[i] || {});
      for (var j = 0; j < cs.length; j++) {
        var c = cs[j], td = document.createElement('td');
        if (c && typeof c === 'object') {
          if (c.cls) td.className = c.cls;
          if (c.node) td.appendChild(c.node); else td.textContent = c.text == null ? '' : String(c.text);
        } else td.textContent = c == null ? '' : String(c);
        tr.appendChild(td);
      }
      out.appendChild(tr);
    }
    if (!rows.length) {
      var empty = el('tr', 'empty'), td0 = el('td', null, 'nothing yet');
      td0.colSpan = columns;
      empty.appendChild(td0);
      out.appendChild(empty);
    }
    body.replaceChildren(out);
  }

  // The Room select: "All rooms" plus each room with a history, in the order of the rooms list.
  function updateRooms(histRooms, rooms) {
    var sel = $('room');
    var names = {}, ids = [];
    for (var i = 0; i < rooms.length; i++) if (rooms[i] && rooms[i].id != null) names[rooms[i].id] = rooms[i].name;
    for (var r = 0; r < rooms.length; r++) if (rooms[r] && Object.prototype.hasOwnProperty.call(histRooms, rooms[r].id)) ids.push(String(rooms[r].id));
    Object.keys(histRooms).sort().forEach(function (id) { if (ids.indexOf(id) < 0) ids.push(id); });
    var joined = ids.join('\n');
    if (joined === roomIds) return;
    roomIds = joined;
    var want = sel.value || stored(ROOM_STORE) || '';
    while (sel.options.length > 1) sel.remove(1);
    for (var k = 0; k < ids.length; k++) {
      var id = ids[k], n = names[id];
      sel.add(new Option(n && n !== id ? id + ' (' + n + ')' : id, id));
    }
    sel.value = ids.indexOf(want) >= 0 ? want : '';
  }

  function drawCharts() {
    if (!last) return;
    var h = last.history || {};
    var t = Array.isArray(h.t) ? h.t : [];
    var room = $('room').value;
    var rs = room && h.rooms && Object.prototype.hasOwnProperty.call(h.rooms, room) ? h.rooms[room] : null;
    for (var i = 0; i < CHARTS.length; i++) {
      var c = CHARTS[i];
      var series = c.perRoom && room ? (rs && rs[c.id]) : h[c.id];
      var scope = !c.perRoom ? 'all apps' : room ? 'room ' + room : c.id === 'origin_latency_ms' ? 'worst room' : 'all rooms';
      drawChart(c, t, Array.isArray(series) ? series : [], scope);
    }
  }

  function innerWidth(e) {
    var cs = getComputedStyle(e);
    return Math.floor(e.clientWidth - (parseFloat(cs.paddingLeft) || 0) - (parseFloat(cs.paddingRight) || 0));
  }

  function drawChart(c, t, ys, scope) {
    var box = document.querySelector('[data-chart="' + c.id + '"]');
    if (!box) return;
    var n = Math.min(t.length, ys.length);
    var pts = [], latest = null, lo = Infinity, hi = -Infinity, ints = true;
    for (var i = 0; i < n; i++) {
      var y = ys[i];
      if (!isNum(y) || !isNum(t[i])) { pts.push(null); continue; }
      pts.push([t[i], y]);
      latest = y;
      if (!Number.isInteger(y)) ints = false;
      if (y < lo) lo = y;
      if (y > hi) hi = y;
    }
    var count = pts.filter(Boolean).length;

    var head = el('div', 'head');
    head.appendChild(el('h2', null, c.title));
    head.appendChild(el('span', 'scope', scope));
    var big = el('p', 'latest', count ? fmt(latest) : '–');

    var width = Math.max(200, innerWidth(box) || 360), height = 150;
    var left = 44, right = 8, topPad = 8, bottom = 20;
    var w = width - left - right, hgt = height - topPad - bottom;
    var g = svg('svg', { viewBox: '0 0 ' + width + ' ' + height, width: width, height: height, 'aria-hidden': 'true', focusable: 'false' });
    var yMin = Math.min(0, count ? lo : 0), yMax = niceMax(count ? hi * 1.05 : 0);
    if (ints) yMax = Math.ceil(yMax);  // counts: no fractional top label
    if (yMax <= yMin) yMax = yMin + 1;
    var t0 = n ? t[0] : 0, t1 = n ? t[n - 1] : 1;
    if (t1 <= t0) t1 = t0 + 1;
    function X(v) { return left + (v - t0) / (t1 - t0) * w; }
    function Y(v) { return topPad + (1 - (v - yMin) / (yMax - yMin)) * hgt; }

    g.appendChild(svg('line', { 'class': 'grid', x1: left, x2: left + w, y1: topPad, y2: topPad }));
    g.appendChild(svg('line', { 'class': 'grid', x1: left, x2: left + w, y1: Y((yMin + yMax) / 2), y2: Y((yMin + yMax) / 2) }));
    g.appendChild(svg('line', { 'class': 'axis', x1: left, x2: left, y1: topPad, y2: topPad + hgt }));
    g.appendChild(svg('line', { 'class': 'axis', x1: left, x2: left + w, y1: topPad + hgt, y2: topPad + hgt }));
    g.appendChild(svg('text', { x: left - 6, y: topPad + 4, 'text-anchor': 'end' }, fmt(yMax)));
    g.appendChild(svg('text', { x: left - 6, y: topPad + hgt, 'text-anchor': 'end' }, fmt(yMin)));
    if (n) {
      g.appendChild(svg('text', { x: left, y: height - 4, 'text-anchor': 'start' }, clock(t0)));
      g.appendChild(svg('text', { x: left + w, y: height - 4, 'text-anchor': 'end' }, clock(t[n - 1])));
    }

    if (!count) {
      g.appendChild(svg('text', { 'class': 'empty', x: left + w / 2, y: topPad + hgt / 2 + 4, 'text-anchor': 'middle' }, 'no data'));
    } else {
      // One polyline (and shaded area) per run of non-null values; a lone point is a dot.
      var runs = [], run = [];
      for (var k = 0; k < pts.length; k++) {
        if (pts[k]) run.push(pts[k]);
        else if (run.length) { runs.push(run); run = []; }
      }
      if (run.length) runs.push(run);
      for (var r = 0; r < runs.length; r++) {
        var seg = runs[r];
        if (seg.length === 1) {
          g.appendChild(svg('circle', { 'class': 'dotpt', cx: X(seg[0][0]).toFixed(1), cy: Y(seg[0][1]).toFixed(1), r: 2.5 }));
          continue;
        }
        var line = seg.map(function (p) { return X(p[0]).toFixed(1) + ',' + Y(p[1]).toFixed(1); }).join(' ');
        var base = Y(Math.max(yMin, 0)).toFixed(1);
        g.appendChild(svg('path', { 'class': 'area', d: 'M' + X(seg[0][0]).toFixed(1) + ',' + base + ' L' + line.replace(/ /g, ' L') +
          ' L' + X(seg[seg.length - 1][0]).toFixed(1) + ',' + base + ' Z' }));
        g.appendChild(svg('polyline', { 'class': 'line', points: line }));
      }
    }

    box.replaceChildren(head, big, g);
    box.setAttribute('data-points', String(count));
    if (count) box.setAttribute('data-latest', String(latest)); else box.removeAttribute('data-latest');
    box.setAttribute('aria-label', c.title + ' (' + scope + '): ' + (count
      ? 'latest ' + fmt(latest) + ', between ' + fmt(lo) + ' and ' + fmt(hi) + ' over the shown window'
      : 'no data'));
  }

  // ---- wiring ----
  function init() {
    $('signin').addEventListener('submit', function (e) {
      e.preventDefault();
      var k = $('key').value.trim();
      if (!k) return;
      $('signin-button').disabled = true;
      $('signin-button').textContent = 'Checking…';
      $('signin-error').hidden = true;
      focusOnLive = true;
      signIn(k);
    });
    $('signout').addEventListener('click', function () {
      setKey(null);
      store(ROOM_STORE, null);
      showSignin('');
    });
    $('room').addEventListener('change', function () {
      store(ROOM_STORE, $('room').value || null);
      drawCharts();
    });
    var pending = false;
    window.addEventListener('resize', function () {
      if (pending) return;
      pending = true;
      requestAnimationFrame(function () { pending = false; drawCharts(); });
    });

    // A key handed over in the fragment (#key=...) is stored, then removed from the address.
    var m = /^#key=(.+)$/.exec(location.hash);
    if (m) {
      var k;
      try { k = decodeURIComponent(m[1]); } catch (e) { k = m[1]; }
      if (history.replaceState) history.replaceState(null, '', location.pathname + location.search);
      else location.hash = '';
      if (k) setKey(k);
    }
    clearData();
    if (getKey()) {
      // Signed in from an earlier visit of this tab: the dashboard, empty until the first answer.
      setState(null);
      showDashboard();
      status('connecting…');
      poll();
    } else {
      showSignin('');
    }
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();

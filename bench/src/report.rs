//! Turns one run's raw JSON into the results table of BENCHMARKS.md (every figure next to its
//! baseline from the same run, as a ratio) and hand-written SVG charts.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

pub const START: &str = "<!-- bench:results:start -->";
pub const END: &str = "<!-- bench:results:end -->";

struct Row {
    scenario: String,
    figure: String,
    weir: String,
    baseline: String,
    ratio: String,
    goal: String,
    verdict: &'static str,
}

impl Row {
    /// A figure with no goal of its own: shown beside the judged ones, never judged.
    fn unjudged(scenario: impl Into<String>, figure: impl Into<String>, weir: String, baseline: String, ratio: String) -> Row {
        Row { scenario: scenario.into(), figure: figure.into(), weir, baseline, ratio, goal: "—".into(), verdict: "" }
    }
}

/// weir's default `limits.line_wait_ms`: what bounds an accepted request's wait under overload.
const LINE_WAIT_MS: f64 = 1_000.0;

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn nm(v: &Value) -> Option<String> {
    if v.is_null() {
        return Some("not run".into());
    }
    v.get("not_measured").and_then(|x| x.as_str()).map(|s| format!("not measured: {s}"))
}

fn fmt_num(x: f64) -> String {
    if x >= 1000.0 {
        let s = format!("{:.0}", x);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

fn cell(v: Option<f64>, unit: &str, missing: &Option<String>) -> String {
    match (v, missing) {
        (Some(x), _) => format!("{}{unit}", fmt_num(x)),
        (None, Some(m)) => m.clone(),
        (None, None) => "—".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> (String, Option<f64>) {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => {
            let r = a / b;
            // Below 1 a third decimal: a goal of 0.50× missed at 0.499× must not read "0.50×".
            let shown = if r < 1.0 { format!("{r:.3}×") } else { format!("{r:.2}×") };
            (shown, Some(r))
        }
        _ => ("—".into(), None),
    }
}

/// How many turns weir and hello took (`weir_http`) and the spread of weir's ratio over them.
fn turn_spread(w: &Value) -> String {
    let rounds: Vec<f64> = w["round_ratios"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
    match (rounds.iter().copied().reduce(f64::min), rounds.iter().copied().reduce(f64::max)) {
        (Some(lo), Some(hi)) if rounds.len() > 1 => format!("; measured in {} turns each, ratio per turn {lo:.2}–{hi:.2}", rounds.len()),
        _ => String::new(),
    }
}

fn http_row(rows: &mut Vec<Row>, res: &Value, name: &str, goal_ratio: f64) {
    if res["scenarios"][name].is_null() {
        return;
    }
    let w = &res["scenarios"][name]["weir"];
    // The hello measured in turns with this route (`weir_http`); runs before that had one hello.
    let h = if w["hello"].is_null() { &res["scenarios"]["hello"] } else { &w["hello"] };
    let spread = turn_spread(w);
    let spun = w["client_spun"].as_bool() == Some(true);
    let judged = |met: Option<bool>| if spun { "not judged (diagnostic client)" } else { verdict(met) };
    // On loopback a sleeping client is woken by the server's send, on the server's core: the
    // less busy the client, the more of that the server pays (BENCHMARKS.md, nineteenth round).
    let sleeps = match (f(&w["client_sleeps_per_response"]), f(&h["client_sleeps_per_response"])) {
        _ if spun => {
            "; **diagnostic: the client polled without sleeping** (`WEIR_BENCH_CLIENT_SPIN=1`), not the goal's measurement".to_string()
        }
        (Some(ws), Some(hs)) => format!("; the client slept {ws:.2} times per response against weir, {hs:.2} against hello"),
        _ => String::new(),
    };
    let wv = f(&w["ok_per_sec"]).filter(|x| *x > 0.0);
    let hv = f(&h["ok_per_sec"]);
    let (r, rv) = ratio(wv, hv);
    let missing = nm(w).or_else(|| {
        if wv.is_none() && !w.is_null() {
            Some(format!("no 2xx answers (statuses {})", w["statuses"]))
        } else {
            None
        }
    });
    rows.push(Row {
        scenario: name.into(),
        figure: format!(
            "req/s (2xx), {} keep-alive conns; server got {} / hello {} of its core{sleeps}{spread}",
            w["connections"].as_u64().unwrap_or(64),
            f(&w["server_cpu_share"]).map(|c| format!("{:.0} %", c * 100.0)).unwrap_or("?".into()),
            f(&h["server_cpu_share"]).map(|c| format!("{:.0} %", c * 100.0)).unwrap_or("?".into())
        ),
        weir: cell(wv, "", &missing),
        baseline: cell(hv, " (hello)", &nm(h)),
        ratio: r,
        goal: format!("≥ {goal_ratio:.2}× hello"),
        verdict: judged(rv.map(|x| x >= goal_ratio)),
    });
    // The cores here are shared with other work: requests per CPU-second the server actually
    // got is the figure that does not move with the neighbours' load.
    let we = f(&w["ok_per_server_cpu_sec"]).filter(|_| wv.is_some());
    let he = f(&h["ok_per_server_cpu_sec"]);
    let (r, rv) = ratio(we, he);
    rows.push(Row {
        scenario: name.into(),
        figure: "req per server CPU-second".into(),
        weir: cell(we, "", &missing),
        baseline: cell(he, " (hello)", &nm(h)),
        ratio: r,
        goal: format!("≥ {goal_ratio:.2}× hello"),
        verdict: judged(rv.map(|x| x >= goal_ratio)),
    });
    let wp = f(&w["latency"]["p99_ms"]).filter(|_| wv.is_some());
    let hp = f(&h["latency"]["p99_ms"]);
    let (r, _) = ratio(wp, hp);
    rows.push(Row::unjudged(name, "p99 latency at full load", cell(wp, " ms", &missing), cell(hp, " ms (hello)", &nm(h)), r));
    if name == "verify" {
        let half = &w["half_load"];
        let p = f(&half["latency"]["p99_ms"]).filter(|_| f(&half["ok"]).unwrap_or(0.0) > 0.0);
        let hello_half = &w["half_load_hello"];
        let hp = f(&hello_half["latency"]["p99_ms"]).filter(|_| f(&hello_half["ok"]).unwrap_or(0.0) > 0.0);
        let (r, _) = ratio(p, hp);
        rows.push(Row::unjudged(
            name,
            "p99 at half load, as the load generator saw it (open loop from schedule; hello driven at the same rate)",
            cell(p, " ms", &nm(half).or(missing.clone())),
            cell(hp, " ms (hello)", &nm(hello_half)),
            r,
        ));
        // The generator's core is ~85 % busy at half load, and its own queue shows in its p99:
        // the goal is read on the probe, which runs beside it at real-time priority.
        let (pp, hpp) = (probe_p99(&half["probe"], "latency"), probe_p99(&hello_half["probe"], "latency"));
        let (r, _) = ratio(pp, hpp);
        rows.push(Row {
            scenario: name.into(),
            figure: format!(
                "p99 at half load, as the latency probe saw it ({}{})",
                probe_text(&half["probe"]),
                match (steal_of(half), steal_of(hello_half)) {
                    (Some(w), Some(h)) => format!("; the host's steal of the server's / client's core: weir's turns {w}, hello's {h}"),
                    _ => String::new(),
                }
            ),
            weir: cell(pp, " ms", &nm(half).or(missing.clone())),
            baseline: cell(hpp, " ms (hello)", &nm(hello_half)),
            ratio: r,
            goal: "< 2 ms".into(),
            verdict: verdict(pp.map(|x| x < 2.0)),
        });
    }
    // The CPU of the run the last row reports (for verify: the open loop at half load, whose
    // row is the one before the probe's).
    let (last, at) = if name == "verify" { (&w["half_load"], 2) } else { (w, 1) };
    if let Some(c) = f(&last["client_cpu_share"]) {
        if let Some(r) = rows.len().checked_sub(at).and_then(|i| rows.get_mut(i)) {
            r.figure.push_str(&format!(" (client CPU {:.0} %", c * 100.0));
            if let Some(l) = f(&last["pacer_lateness"]["p99_ms"]) {
                r.figure.push_str(&format!(", sends released ≤ {l:.3} ms late at p99"));
            }
            r.figure.push(')');
        }
    }
    // Entry's diagnostic beside it (`scenarios::entry`): the same turns with a client that never
    // sleeps. Not judged; it shows what the loopback client's sleeping costs the server.
    let pc = &w["polling_client"];
    if pc.is_object() {
        let (pw, ph) = (f(&pc["ok_per_sec"]).filter(|x| *x > 0.0), f(&pc["hello"]["ok_per_sec"]));
        let (r, _) = ratio(pw, ph);
        rows.push(Row {
            scenario: name.into(),
            figure: format!(
                "req/s with a client that polls instead of sleeping (diagnostic, not judged: on loopback a sleeping client is woken by the server's send, on the server's core){}",
                turn_spread(pc)
            ),
            weir: cell(pw, "", &nm(pc)),
            baseline: cell(ph, " (hello)", &nm(&pc["hello"])),
            ratio: r,
            goal: "—".into(),
            verdict: "",
        });
    }
}

/// The probe's p99 of `key` (`latency` or `refused_latency`), if it measured any.
fn probe_p99(probe: &Value, key: &str) -> Option<f64> {
    let count = if key == "latency" { &probe["ok"] } else { &probe["refused"] };
    f(&probe[key]["p99_ms"]).filter(|_| count.as_u64().unwrap_or(0) > 0)
}

/// How the latency probe ran, for a row's figure.
/// The host's steal of the server's and the client's core over a measured window ("0.4 / 1.2 %").
fn steal_of(v: &Value) -> Option<String> {
    match (f(&v["steal_server_core_pct"]), f(&v["steal_client_core_pct"])) {
        (Some(s), Some(c)) => Some(format!("{s:.1} / {c:.1} %")),
        _ => None,
    }
}

fn probe_text(probe: &Value) -> String {
    let priority = if probe["priority_raised"].as_bool().unwrap_or(false) { "a real-time-priority thread" } else { "a thread at the client's priority (real-time priority refused)" };
    format!("{:.0} req/s on {} connections of its own, from {priority} beside the load", f(&probe["rate_per_sec"]).unwrap_or(0.0), probe["connections"])
}

fn best_peer(m: &Value, key: &str, higher_better: bool) -> (Option<f64>, String) {
    let mut best: Option<(f64, &str)> = None;
    for p in ["sockudo", "soketi"] {
        if let Some(x) = m[p][key].as_f64() {
            let better = match best {
                None => true,
                Some((b, _)) => if higher_better { x > b } else { x < b },
            };
            if better {
                best = Some((x, p));
            }
        }
    }
    match best {
        Some((x, p)) => (Some(x), p.to_string()),
        None => (None, "peers not measured".into()),
    }
}

/// The cluster scenario: two nodes and their Redis against one node, on the same core. No goal
/// of the issue's; the loss row holds the cluster to fan-out's zero.
fn cluster_rows(rows: &mut Vec<Row>, c: &Value) {
    if c.is_null() {
        return;
    }
    let (w, one) = (&c["cluster"], &c["single"]);
    let missing = nm(c).or_else(|| nm(w));
    let share = |v: &Value| f(&v["server_cpu_share"]).map(|x| format!("{:.0} %", x * 100.0)).unwrap_or("?".into());
    let setup = format!("{} subscribers, half on each of {} nodes sharing one Redis, all on the server's core", c["subscribers"], c["nodes"]);
    let (wv, ov) = (f(&w["msg_per_sec"]), f(&one["msg_per_sec"]));
    let (r, _) = ratio(wv, ov);
    rows.push(Row::unjudged(
        "cluster",
        format!("{setup}: delivered msg/s (server processes' CPU {}, one node's {})", share(w), share(one)),
        cell(wv, "", &missing),
        cell(ov, " (one weir node)", &nm(one)),
        r,
    ));
    let (wp, op) = (f(&w["latency"]["p99_ms"]), f(&one["latency"]["p99_ms"]));
    let (r, _) = ratio(wp, op);
    rows.push(Row::unjudged("cluster", "end-to-end p99 at max throughput", cell(wp, " ms", &missing), cell(op, " ms (one weir node)", &nm(one)), r));
    let loss = w["loss"].as_u64();
    let disc = w["disconnected"].as_u64().unwrap_or(0);
    rows.push(Row {
        scenario: "cluster".into(),
        figure: "lost messages".into(),
        weir: loss.map(|l| format!("{l} (disconnects {disc})")).unwrap_or_else(|| missing.clone().unwrap_or("—".into())),
        baseline: one["loss"].as_u64().map(|l| format!("{l} (one weir node)")).unwrap_or_default(),
        ratio: "—".into(),
        goal: "0".into(),
        verdict: verdict(loss.map(|l| l == 0 && disc == 0)),
    });
}

fn rows(res: &Value) -> Vec<Row> {
    let mut rows = Vec::new();
    http_row(&mut rows, res, "entry", 0.5);
    http_row(&mut rows, res, "status", 0.7);
    http_row(&mut rows, res, "verify", 0.7);

    if let Some(fan) = res["scenarios"]["fanout"].as_object() {
        let mut keys: Vec<&String> = fan.keys().collect();
        keys.sort_by_key(|k| k.parse::<usize>().unwrap_or(0));
        for k in keys {
            let m = &fan[k];
            let w = &m["weir"];
            let wv = f(&w["msg_per_sec"]);
            let (pv, pn) = best_peer(m, "msg_per_sec", true);
            let (r, rv) = ratio(wv, pv);
            rows.push(Row {
                scenario: "fanout".into(),
                figure: format!(
                    "{k} subscribers: delivered msg/s (client CPU {}, server {})",
                    f(&w["client_cpu_share"]).map(|c| format!("{:.0} %", c * 100.0)).unwrap_or("?".into()),
                    f(&w["server_cpu_share"]).map(|c| format!("{:.0} %", c * 100.0)).unwrap_or("?".into())
                ),
                weir: cell(wv, "", &nm(w)),
                baseline: cell(pv, &format!(" ({pn})"), &Some(pn.clone())),
                ratio: r,
                goal: "≥ 2× best peer".into(),
                verdict: verdict(rv.map(|x| x >= 2.0)),
            });
            // Per CPU-second the server got: robust to the shared cores and to a client that
            // limits the wall-clock rate.
            let eff = |v: &Value| match (f(&v["msg_per_sec"]), f(&v["server_cpu_share"])) {
                (Some(m), Some(c)) if c > 0.0 => Some(m / c),
                _ => None,
            };
            let we = eff(w);
            let mut peer_e: Option<(f64, &str)> = None;
            for p in ["sockudo", "soketi"] {
                if let Some(x) = eff(&m[p]) {
                    if peer_e.is_none_or(|(b, _)| x > b) {
                        peer_e = Some((x, p));
                    }
                }
            }
            let (r, rv) = ratio(we, peer_e.map(|x| x.0));
            rows.push(Row {
                scenario: "fanout".into(),
                figure: format!("{k} subscribers: msg per server CPU-second"),
                weir: cell(we, "", &nm(w)),
                baseline: match peer_e {
                    Some((x, p)) => format!("{} ({p})", fmt_num(x)),
                    None => "peers not measured".into(),
                },
                ratio: r,
                goal: "≥ 2× best peer".into(),
                verdict: verdict(rv.map(|x| x >= 2.0)),
            });
            let wp = f(&w["latency"]["p99_ms"]);
            let mut peer_p99: Option<(f64, String)> = None;
            for p in ["sockudo", "soketi"] {
                if let Some(x) = m[p]["latency"]["p99_ms"].as_f64() {
                    if peer_p99.as_ref().is_none_or(|(b, _)| x < *b) {
                        peer_p99 = Some((x, p.to_string()));
                    }
                }
            }
            let (r, rv) = ratio(wp, peer_p99.as_ref().map(|x| x.0));
            rows.push(Row {
                scenario: "fanout".into(),
                figure: format!("{k} subscribers: end-to-end p99 at max throughput"),
                weir: cell(wp, " ms", &nm(w)),
                baseline: match &peer_p99 {
                    Some((x, p)) => format!("{} ms ({p})", fmt_num(*x)),
                    None => "peers not measured".into(),
                },
                ratio: r,
                goal: "lower than best peer".into(),
                verdict: verdict(rv.map(|x| x < 1.0)),
            });
            let wq = f(&w["paced"]["latency"]["p99_ms"]);
            let mut peer_q: Option<(f64, String)> = None;
            for p in ["sockudo", "soketi"] {
                if let Some(x) = m[p]["paced"]["latency"]["p99_ms"].as_f64() {
                    if peer_q.as_ref().is_none_or(|(b, _)| x < *b) {
                        peer_q = Some((x, p.to_string()));
                    }
                }
            }
            let (r, rv) = ratio(wq, peer_q.as_ref().map(|x| x.0));
            // Whose CPU a burst of `k` frames costs: it tells a server-bound p99 from a client-bound one.
            let cpu = |v: &Value| match (f(&v["paced"]["server_cpu_ms_per_event"]), f(&v["paced"]["client_cpu_ms_per_event"])) {
                (Some(s), Some(c)) => format!("; CPU per event: server {s:.1} ms, client {c:.1} ms"),
                _ => String::new(),
            };
            // The servers' slices alternate (`fanout`): the host's steal each one's slices saw.
            let slices = match (f(&w["paced"]["slices"]), f(&w["paced"]["events_per_slice"])) {
                (Some(s), Some(e)) => {
                    let events = if e == 1.0 { "1 event".to_string() } else { format!("{e:.0} events") };
                    Some(format!("every server up at once, published to in {s:.0} slices of {events} each, round robin"))
                }
                _ => None,
            };
            let stolen: Vec<String> = std::iter::once("weir")
                .chain(peer_q.as_ref().map(|(_, p)| p.as_str()))
                .filter_map(|name| steal_of(if name == "weir" { &w["paced"] } else { &m[name]["paced"] }).map(|s| format!("{name} {s}")))
                .collect();
            let stolen = (!stolen.is_empty()).then(|| format!("the host's steal of the server's / client's core in each one's slices: {}", stolen.join(", ")));
            let about: Vec<String> = slices.into_iter().chain(stolen).collect();
            let about = if about.is_empty() { String::new() } else { format!(" ({})", about.join("; ")) };
            rows.push(Row {
                scenario: "fanout".into(),
                figure: format!("{k} subscribers: p99 at a fixed 20,000 msg/s{about}"),
                weir: format!("{}{}", cell(wq, " ms", &nm(w)), cpu(w)),
                baseline: match &peer_q {
                    Some((x, p)) => format!("{} ms ({p}{})", fmt_num(*x), cpu(&m[p.as_str()])),
                    None => "peers not measured".into(),
                },
                ratio: r,
                goal: "lower than best peer".into(),
                verdict: verdict(rv.map(|x| x < 1.0)),
            });
            let loss = w["loss"].as_u64().map(|l| l + w["paced"]["loss"].as_u64().unwrap_or(0));
            let disc = w["disconnected"].as_u64().unwrap_or(0);
            rows.push(Row {
                scenario: "fanout".into(),
                figure: format!("{k} subscribers: lost messages (both phases)"),
                weir: loss.map(|l| format!("{l} (disconnects {disc})")).unwrap_or_else(|| nm(w).unwrap_or("—".into())),
                baseline: ["sockudo", "soketi"].iter().filter_map(|p| m[*p]["loss"].as_u64().map(|l| format!("{p} {}", l + m[*p]["paced"]["loss"].as_u64().unwrap_or(0)))).collect::<Vec<_>>().join(", "),
                ratio: "—".into(),
                goal: "0".into(),
                verdict: verdict(loss.map(|l| l == 0 && disc == 0)),
            });
        }
    }

    cluster_rows(&mut rows, &res["scenarios"]["cluster"]);

    let c = &res["scenarios"]["connections"];
    if !c.is_null() {
        let w = &c["weir"];
        let wv = f(&w["bytes_per_connection"]);
        let (pv, pn) = best_peer(c, "bytes_per_connection", false);
        let (r, rv) = ratio(wv, pv);
        let both_lower = ["sockudo", "soketi"].iter().all(|p| match (wv, c[*p]["bytes_per_connection"].as_f64()) {
            (Some(a), Some(b)) => a < b,
            _ => true,
        });
        rows.push(Row {
            scenario: "connections".into(),
            figure: format!("RSS per idle connection ({} connected)", w["connected"]),
            weir: cell(wv, " B", &nm(w)),
            baseline: cell(pv, &format!(" B ({pn})"), &Some(pn.clone())),
            ratio: r,
            goal: "≤ 10 KB and lower than both peers".into(),
            verdict: verdict(wv.map(|x| x <= 10_240.0 && both_lower && rv.is_some())),
        });
    }

    let q = &res["scenarios"]["queue-scale"];
    if !q.is_null() {
        let v = f(&q["rss_bytes_per_visitor"]);
        rows.push(Row {
            scenario: "queue-scale".into(),
            figure: format!("RSS per queued visitor ({} entered)", q["entered"]),
            weir: cell(v, " B", &nm(q)),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: "< 200 B".into(),
            verdict: verdict(v.map(|x| x < 200.0)),
        });
        let d = f(&q["restart_ready_ms"]);
        rows.push(Row {
            scenario: "queue-scale".into(),
            figure: "restart to ready (/readyz 200)".into(),
            weir: cell(d, " ms", &nm(q)),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: "< 2,000 ms".into(),
            verdict: verdict(d.map(|x| x < 2000.0)),
        });
        if let Some(rss) = f(&q["rss_after_restart_bytes"]) {
            rows.push(Row::unjudged(
                "queue-scale",
                "RSS once ready after the restart (the whole line restored)",
                format!("{:.1} MiB", rss / 1_048_576.0),
                "—".into(),
                "—".into(),
            ));
        }
    }

    let o = &res["scenarios"]["overload"];
    if !o.is_null() {
        let g = f(&o["ok_per_sec"]);
        let cap = f(&o["capacity_per_sec"]);
        let (r, rv) = ratio(g, cap);
        let mut client = String::new();
        if let Some(c) = f(&o["client_cpu_share"]) {
            client.push_str(&format!("; client CPU {:.0} %", c * 100.0));
        }
        if let Some(l) = f(&o["pacer_lateness"]["p99_ms"]) {
            client.push_str(&format!(", sends released ≤ {l:.3} ms late at p99"));
        }
        rows.push(Row {
            scenario: "overload".into(),
            figure: format!("goodput at {}× capacity ({} conns{client})", f(&o["offered_factor"]).unwrap_or(3.0), o["connections"]),
            weir: cell(g, " req/s", &nm(o)),
            baseline: {
                // Which closed loop gave the peak, measured between the overload's rounds.
                let peaks: Vec<String> = o["peaks"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|p| {
                                let each: Vec<String> = p["per_sec"].as_array().map(|w| w.iter().map(|x| fmt_num(f(x).unwrap_or(0.0))).collect()).unwrap_or_default();
                                format!("{} conns {}", p["connections"], each.join("→"))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let detail = if peaks.is_empty() { String::new() } else { format!(": {}", peaks.join(", ")) };
                let rounds: Vec<String> = o["round_ratios"].as_array().map(|a| a.iter().map(|x| format!("{:.2}", f(x).unwrap_or(0.0))).collect()).unwrap_or_default();
                cell(
                    cap,
                    &format!(
                        " req/s (peak: the better closed loop's mean over the windows before, between and after the {} overload windows{detail}; each overload window × the peaks around it: {})",
                        o["rounds"],
                        rounds.join(", ")
                    ),
                    &None,
                )
            },
            ratio: r,
            goal: "≥ 0.90× peak".into(),
            verdict: verdict(rv.map(|x| x >= 0.9)),
        });
        // What the connection count alone costs: bare hyper's closed loop over the overload's
        // connections against its best over the peak's.
        let hello = &o["hello_by_connections"];
        if let (Some(hr), Some(points)) = (f(&hello["ratio"]), hello["points"].as_array()) {
            let text: Vec<String> = points.iter().map(|p| format!("{} conns {}", p["connections"], fmt_num(f(&p["ok_per_sec"]).unwrap_or(0.0)))).collect();
            let weir_at_conns = rv
                .filter(|_| hr > 0.0)
                .map(|x| format!("; weir's goodput at {}× reads {:.2}× against it", f(&o["offered_factor"]).unwrap_or(3.0), x / hr))
                .unwrap_or_default();
            rows.push(Row {
                scenario: "overload".into(),
                figure: format!(
                    "bare hyper's closed loop over {} conns, × its best over the peak's connections: what the connection count alone costs a server here{weir_at_conns}",
                    o["connections"]
                ),
                weir: "—".into(),
                baseline: format!("{} req/s (hello)", text.join(", ")),
                ratio: format!("{hr:.3}×"),
                goal: "—".into(),
                verdict: "",
            });
        }
        if let Some(points) = o["curve"].as_array().filter(|c| !c.is_empty()) {
            let text: Vec<String> = points
                .iter()
                .map(|p| {
                    let busy = f(&p["server_cpu_share"]).map(|c| format!(", server {:.0} %", c * 100.0)).unwrap_or_default();
                    let client = f(&p["client_cpu_share"]).map(|c| format!(", client {:.0} %", c * 100.0)).unwrap_or_default();
                    let late = f(&p["pacer_lateness_p99_ms"]).map(|ms| format!(", sends ≤ {ms:.1} ms late at p99")).unwrap_or_default();
                    format!("{}× → {:.2}× ({} refused{busy}{client}{late})", f(&p["offered_factor"]).unwrap_or(0.0), f(&p["goodput_ratio"]).unwrap_or(0.0), p["refused"])
                })
                .collect();
            rows.push(Row::unjudged(
                "overload",
                format!("goodput curve over {} conns: offered (× peak) → goodput (× peak)", o["connections"]),
                text.join("; "),
                "—".into(),
                "—".into(),
            ));
        }
        // Nothing refused (the connections fit in weir's line): refusals as measured on the probe.
        let probe = &o["refusal_probe"];
        let (q, on) = if o["refused"].as_u64().unwrap_or(0) == 0 && probe["refused"].as_u64().unwrap_or(0) > 0 {
            let served = f(&probe["goodput_ratio"]).map(|g| format!("; it served {g:.2}× peak")).unwrap_or_default();
            (probe, format!(", measured on a weir with `limits.line_wait_ms` = {} whose line the same load overfills{served}", probe["line_wait_ms"]))
        } else {
            (o, String::new())
        };
        let refused = q["refused"].as_u64().unwrap_or(0);
        let with_ra = q["refused_with_retry_after"].as_u64().unwrap_or(0);
        let rp = f(&q["refused_latency"]["p99_ms"]).filter(|_| refused > 0);
        // Who answered: weir's door (off the busy workers) or the workers themselves.
        let counted = &q["server_counted"];
        let door = match (f(&counted["weir_door_refused_total"]), f(&counted["weir_shed_total"])) {
            (Some(door), Some(all)) if all > 0.0 => format!("; weir's door answered {door:.0} of the {all:.0} it refused"),
            _ => String::new(),
        };
        rows.push(Row {
            scenario: "overload".into(),
            figure: format!(
                "refusals as the load generator saw them: p99 from send ({refused} refused, {with_ra} with Retry-After; the client honours it: {} sends deferred{on}{door})",
                q["deferred"].as_u64().unwrap_or(0)
            ),
            weir: if refused == 0 { nm(o).unwrap_or("none refused".into()) } else { cell(rp, " ms", &None) },
            baseline: "—".into(),
            ratio: "—".into(),
            goal: "—".into(),
            verdict: "",
        });
        // The goal is read on the latency probe: the generator's core is busy (see verify).
        let qp = &q["probe"];
        let (p_refused, p_with_ra) = (qp["refused"].as_u64().unwrap_or(0), qp["refused_with_retry_after"].as_u64().unwrap_or(0));
        let pp = probe_p99(qp, "refused_latency");
        let p50 = f(&qp["refused_latency"]["p50_ms"]).filter(|_| p_refused > 0).map(|p| format!("; p50 {p:.2} ms")).unwrap_or_default();
        rows.push(Row {
            scenario: "overload".into(),
            figure: format!(
                "refusals as the latency probe saw them: p99 ({p_refused} refused, {p_with_ra} with Retry-After{p50}; {}{})",
                probe_text(qp),
                steal_of(q).map(|x| format!("; the host's steal of the server's / client's core {x}")).unwrap_or_default()
            ),
            weir: if p_refused == 0 { nm(qp).unwrap_or("none refused".into()) } else { cell(pp, " ms", &None) },
            baseline: "—".into(),
            ratio: "—".into(),
            goal: "< 1 ms, all with Retry-After".into(),
            verdict: if p_refused == 0 { "not measured" } else { verdict(pp.map(|x| x < 1.0 && p_with_ra == p_refused)) },
        });
        // The same refusals without the flood's onset, whose first refusals come back together.
        let settled = &qp["settled"];
        let s_refused = settled["refused"].as_u64().unwrap_or(0);
        if s_refused > 0 {
            let s50 = f(&settled["refused_latency"]["p50_ms"]).map(|p| format!("; p50 {p:.2} ms")).unwrap_or_default();
            rows.push(Row {
                scenario: "overload".into(),
                figure: format!(
                    "the probe's refusals of requests sent {:.0} s or more into the load, past the flood's onset: p99 ({s_refused} of the {p_refused}{s50})",
                    f(&settled["after_s"]).unwrap_or(0.0)
                ),
                weir: cell(probe_p99(settled, "refused_latency"), " ms", &None),
                baseline: "—".into(),
                ratio: "—".into(),
                goal: "—".into(),
                verdict: "",
            });
        }
        let fresh = q["refused_fresh"].as_u64().unwrap_or(0);
        if fresh > 0 {
            let p50 = f(&q["refused_latency"]["p50_ms"]).map(|p| format!("; p50 of all refusals {p:.2} ms")).unwrap_or_default();
            rows.push(Row::unjudged(
                "overload",
                format!("refusals of requests not sent right after a refusal (read at once, no hold to wait out): p99 ({fresh} of the {refused}{p50})"),
                cell(f(&q["refused_fresh_latency"]["p99_ms"]), " ms", &None),
                "—".into(),
                "—".into(),
            ));
        }
        let ap = f(&o["latency"]["p99_ms"]);
        rows.push(Row {
            scenario: "overload".into(),
            figure: "p99 of accepted requests (from schedule)".into(),
            weir: cell(ap, " ms", &nm(o)),
            baseline: cell(f(&res["scenarios"]["entry"]["weir"]["latency"]["p99_ms"]), " ms (entry at peak)", &None),
            ratio: "—".into(),
            goal: "bounded".into(),
            verdict: "",
        });
        rows.push(Row {
            scenario: "overload".into(),
            figure: "p99 of accepted requests from their actual send (what the server held them, without the client's unsent backlog)".into(),
            weir: cell(f(&o["latency_from_send"]["p99_ms"]), " ms", &nm(o)),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: format!("bounded: ≤ 1.25 × weir's line wait ({LINE_WAIT_MS} ms)"),
            verdict: verdict(f(&o["latency_from_send"]["p99_ms"]).map(|p| p <= 1.25 * LINE_WAIT_MS)),
        });
        if let Some(pp) = probe_p99(&o["probe"], "latency") {
            rows.push(Row::unjudged(
                "overload",
                format!("p99 of accepted requests as the latency probe saw them ({})", probe_text(&o["probe"])),
                cell(Some(pp), " ms", &None),
                "—".into(),
                "—".into(),
            ));
        }
    }

    let s = &res["scenarios"]["startup"];
    if !s.is_null() {
        let r = f(&s["ready_ms"]);
        rows.push(Row {
            scenario: "startup".into(),
            figure: "spawn to /readyz 200".into(),
            weir: cell(r, " ms", &nm(s)),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: "< 100 ms".into(),
            verdict: verdict(r.map(|x| x < 100.0)),
        });
        let m = f(&s["idle_rss_bytes"]).map(|b| b / 1_048_576.0);
        rows.push(Row {
            scenario: "startup".into(),
            figure: "idle RSS".into(),
            weir: cell(m, " MiB", &nm(s)),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: "< 30 MiB".into(),
            verdict: verdict(m.map(|x| x < 30.0)),
        });
        let c = f(&s["idle_cpu_share"]).map(|x| x * 100.0);
        rows.push(Row {
            scenario: "startup".into(),
            figure: "idle CPU".into(),
            weir: cell(c, " %", &nm(s)),
            baseline: "—".into(),
            ratio: "—".into(),
            goal: "≈ 0 (< 0.5 %)".into(),
            verdict: verdict(c.map(|x| x < 0.5)),
        });
    }
    rows
}

pub fn table(res: &Value, results_file: &str) -> String {
    let meta = &res["meta"];
    let mut s = String::new();
    let _ = writeln!(s, "{START}");
    let _ = writeln!(s, "_Generated by `weir-bench` — do not edit by hand; rerun the command below._\n");
    let _ = writeln!(s, "- date: {}", meta["date"].as_str().unwrap_or("?"));
    let _ = writeln!(
        s,
        "- machine: {} cores (`nproc`), {}; server pinned to core {}, client to core {}",
        meta["nproc"], meta["cpu_model"].as_str().unwrap_or("?"), meta["server_core"], meta["client_core"]
    );
    let _ = writeln!(s, "- command: `{}`{}", meta["command"].as_str().unwrap_or("?"), if meta["quick"] == Value::Bool(true) { " (quick: tiny counts, smoke test only — not a measurement)" } else { "" });
    let _ = writeln!(s, "- weir commit: `{}`; raw results: `{results_file}`", meta["commit"].as_str().unwrap_or("?"));
    let _ = writeln!(s, "- peers: {}", meta["peers"]);
    let _ = writeln!(s);
    let _ = writeln!(s, "| scenario | figure | weir | baseline (same run) | ratio | goal | verdict |");
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
    for r in rows(res) {
        let _ = writeln!(s, "| {} | {} | {} | {} | {} | {} | {} |", r.scenario, r.figure, r.weir, r.baseline, r.ratio, r.goal, r.verdict);
    }
    let _ = writeln!(s, "\nCharts: [HTTP latency](bench/results/latency-http.svg), [fan-out latency](bench/results/latency-fanout.svg), [fan-out throughput](bench/results/fanout-throughput.svg), [overload goodput](bench/results/overload-goodput.svg).");
    let _ = write!(s, "{END}");
    s
}

/// Replaces the marked section of `doc` (or appends it).
pub fn splice(doc: &str, section: &str) -> String {
    match (doc.find(START), doc.find(END)) {
        (Some(a), Some(b)) if b > a => format!("{}{}{}", &doc[..a], section, &doc[b + END.len()..]),
        _ => format!("{doc}\n{section}\n"),
    }
}

// ---------- SVG ----------

const COLORS: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A line chart: categorical x, one polyline per series, log or linear y.
pub fn line_chart(title: &str, x_title: &str, y_title: &str, xs: &[String], series: &[(String, Vec<Option<f64>>)], log_y: bool) -> String {
    let (w, h, l, r, t, b) = (760.0, 420.0, 80.0, 190.0, 40.0, 60.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let vals: Vec<f64> = series.iter().flat_map(|s| s.1.iter().flatten().copied()).filter(|v| *v > 0.0).collect();
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        w / 2.0,
        esc(title)
    );
    if vals.is_empty() || xs.is_empty() {
        svg.push_str(&format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data measured</text>\n</svg>\n", w / 2.0, h / 2.0));
        return svg;
    }
    let (mut lo, mut hi) = (vals.iter().cloned().fold(f64::MAX, f64::min), vals.iter().cloned().fold(0.0, f64::max));
    if log_y {
        lo = 10f64.powf(lo.log10().floor());
        hi = 10f64.powf(hi.log10().ceil());
        if hi <= lo {
            hi = lo * 10.0;
        }
    } else {
        lo = 0.0;
        hi *= 1.1;
    }
    let y_of = |v: f64| -> f64 {
        let frac = if log_y { (v.log10() - lo.log10()) / (hi.log10() - lo.log10()) } else { (v - lo) / (hi - lo) };
        t + ph - frac * ph
    };
    let x_of = |i: usize| -> f64 { if xs.len() == 1 { l + pw / 2.0 } else { l + pw * i as f64 / (xs.len() - 1) as f64 } };
    // Axes and grid.
    svg.push_str(&format!("<rect x=\"{l}\" y=\"{t}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>\n"));
    let ticks: Vec<f64> = if log_y {
        let mut v = Vec::new();
        let mut d = lo;
        while d <= hi * 1.0001 {
            v.push(d);
            d *= 10.0;
        }
        v
    } else {
        (0..=5).map(|i| lo + (hi - lo) * i as f64 / 5.0).collect()
    };
    for tv in ticks {
        let y = y_of(tv);
        svg.push_str(&format!("<line x1=\"{l}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n", l + pw, l - 6.0, y + 4.0, esc(&fmt_num(tv))));
    }
    for (i, x) in xs.iter().enumerate() {
        svg.push_str(&format!("<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", x_of(i), t + ph + 18.0, esc(x)));
    }
    svg.push_str(&format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", l + pw / 2.0, h - 14.0, esc(x_title)));
    svg.push_str(&format!("<text transform=\"translate(18,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n", t + ph / 2.0, esc(y_title)));
    for (si, (name, ys)) in series.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        let pts: Vec<String> = ys.iter().enumerate().filter_map(|(i, v)| v.filter(|v| *v > 0.0).map(|v| format!("{:.1},{:.1}", x_of(i), y_of(v)))).collect();
        if pts.len() > 1 {
            svg.push_str(&format!("<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n", pts.join(" ")));
        }
        for p in &pts {
            let (x, y) = p.split_once(',').expect("pair");
            svg.push_str(&format!("<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{color}\"/>\n"));
        }
        let ly = t + 10.0 + si as f64 * 18.0;
        svg.push_str(&format!("<rect x=\"{}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"{:.1}\">{}</text>\n", l + pw + 12.0, ly - 10.0, l + pw + 30.0, ly, esc(name)));
    }
    svg.push_str("</svg>\n");
    svg
}

const PCTS: &[(&str, &str)] = &[("p50", "p50_ms"), ("p75", "p75_ms"), ("p90", "p90_ms"), ("p95", "p95_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms"), ("p99.99", "p9999_ms"), ("max", "max_ms")];

fn pct_series(name: String, lat: &Value) -> Option<(String, Vec<Option<f64>>)> {
    if lat["count"].as_u64().unwrap_or(0) == 0 {
        return None;
    }
    Some((name, PCTS.iter().map(|(_, k)| lat[*k].as_f64()).collect()))
}

pub fn charts(res: &Value, dir: &Path) -> std::io::Result<()> {
    let xs: Vec<String> = PCTS.iter().map(|(l, _)| l.to_string()).collect();
    let sc = &res["scenarios"];
    let mut http = Vec::new();
    http.extend(pct_series("hello (bare hyper)".into(), &sc["hello"]["latency"]));
    for s in ["entry", "status", "verify"] {
        http.extend(pct_series(format!("weir {s}"), &sc[s]["weir"]["latency"]));
    }
    http.extend(pct_series("weir overload (accepted)".into(), &sc["overload"]["latency"]));
    std::fs::write(dir.join("latency-http.svg"), line_chart("HTTP latency distribution, closed loop (64 conns)", "percentile", "latency (ms, log)", &xs, &http, true))?;

    if let Some(points) = sc["overload"]["curve"].as_array().filter(|c| !c.is_empty()) {
        let factors: Vec<f64> = points.iter().filter_map(|p| p["offered_factor"].as_f64()).collect();
        let labels: Vec<String> = factors.iter().map(|x| format!("{x}×")).collect();
        let goodput = ("weir goodput".to_string(), points.iter().map(|p| p["goodput_ratio"].as_f64()).collect());
        let ideal = ("offered, up to the peak".to_string(), factors.iter().map(|x| Some(x.min(1.0))).collect());
        let title = format!("Entry goodput vs offered load, open loop over {} connections", sc["overload"]["connections"]);
        std::fs::write(dir.join("overload-goodput.svg"), line_chart(&title, "offered load (× peak)", "goodput (× peak)", &labels, &[goodput, ideal], false))?;
    }

    let mut fan = Vec::new();
    let mut thr = Vec::new();
    let mut subs: Vec<String> = sc["fanout"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    subs.sort_by_key(|k| k.parse::<usize>().unwrap_or(0));
    for server in ["weir", "sockudo", "soketi"] {
        for n in &subs {
            fan.extend(pct_series(format!("{server} {n} subs"), &sc["fanout"][n][server]["paced"]["latency"]));
        }
        let ys: Vec<Option<f64>> = subs.iter().map(|n| sc["fanout"][n][server]["msg_per_sec"].as_f64()).collect();
        if ys.iter().any(|y| y.is_some()) {
            thr.push((server.to_string(), ys));
        }
    }
    std::fs::write(dir.join("latency-fanout.svg"), line_chart("Fan-out end-to-end latency at a fixed 20,000 msg/s", "percentile", "latency (ms, log)", &xs, &fan, true))?;
    std::fs::write(dir.join("fanout-throughput.svg"), line_chart("Fan-out throughput vs subscribers", "subscribers on one channel", "delivered messages / s", &subs, &thr, false))?;
    Ok(())
}

//! The Pusher side: HTTP API signing (auth_version 1.0), WebSocket subscribers that time each
//! event from a timestamp in its payload, and idle connection holders.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};
use tokio::net::TcpSocket;

use crate::hist::Hist;
use crate::ws::{Msg, WsConn};

#[derive(Clone, Debug)]
pub struct App {
    pub id: String,
    pub key: String,
    pub secret: String,
}

/// A signed `POST /apps/{id}/events` request carrying `data` on `channel`.
pub fn publish_request(app: &App, host: &str, channel: &str, data: &str) -> Vec<u8> {
    let body = serde_json::json!({"name": "bench", "channel": channel, "data": data}).to_string();
    let body_md5 = hex::encode(Md5::digest(body.as_bytes()));
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let path = format!("/apps/{}/events", app.id);
    // Keys sorted: auth_key, auth_timestamp, auth_version, body_md5.
    let query = format!("auth_key={}&auth_timestamp={ts}&auth_version=1.0&body_md5={body_md5}", app.key);
    let sig = signature(&app.secret, "POST", &path, &query);
    crate::client::request(
        "POST",
        &format!("{path}?{query}&auth_signature={sig}"),
        host,
        &["Content-Type: application/json".into()],
        body.as_bytes(),
    )
}

/// Pusher's auth_signature: hex HMAC-SHA256 of "METHOD\nPATH\nSORTED_QUERY" with the app secret.
pub fn signature(secret: &str, method: &str, path: &str, sorted_query: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex::encode(ring::hmac::sign(&key, format!("{method}\n{path}\n{sorted_query}").as_bytes()).as_ref())
}

fn ws_path(key: &str) -> String {
    format!("/app/{key}?protocol=7&client=weir-bench&version=0.1")
}

/// True if `needle` occurs in `hay`.
fn has(hay: &[u8], needle: &str) -> bool {
    memchr::memmem::find(hay, needle.as_bytes()).is_some()
}

/// Reads text messages until one contains `want` (`Ok`), a `pusher:error` (`Err`), the end of
/// the stream or `deadline`.
async fn wait_for(ws: &mut WsConn, want: &str, deadline: tokio::time::Instant) -> Result<(), String> {
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| format!("no {want} within the deadline"))?;
        match msg {
            Ok(Some(Msg::Text(t))) if has(t, want) => return Ok(()),
            Ok(Some(Msg::Text(t))) if has(t, "pusher:error") => return Err(format!("server: {}", String::from_utf8_lossy(t))),
            Ok(Some(_)) => continue,
            Ok(None) => return Err(format!("closed before {want}")),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Connects from `src` (a loopback address) and waits for `pusher:connection_established`.
pub async fn connect(addr: SocketAddr, src: Option<IpAddr>, key: &str) -> Result<WsConn, String> {
    let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if let Some(ip) = src {
        crate::sys::pick_port_at_connect(&sock);
        sock.bind(SocketAddr::new(ip, 0)).map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let stream = sock.connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut ws = tokio::time::timeout_at(deadline, WsConn::handshake(stream, &addr.to_string(), &ws_path(key)))
        .await
        .map_err(|_| "no upgrade within 10 s".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    wait_for(&mut ws, "pusher:connection_established", deadline).await?;
    Ok(ws)
}

/// Shared by all subscribers of one fan-out run (single-threaded runtime).
pub struct FanoutState {
    pub base: Instant,
    pub hist: Hist,
    pub delivered: u64,
    pub per_event: Vec<u32>,
    /// Per event, the latency (µs) of its latest delivery so far: how long it took to reach everyone.
    pub last_arrival_us: Vec<u32>,
    pub complete_events: u64,
    pub subscribers: u32,
    pub closed: u64,
    pub pongs: u64,
}

pub type Shared = Rc<RefCell<FanoutState>>;

/// Subscribes `ws` to `channel` and waits for `pusher_internal:subscription_succeeded`.
pub async fn subscribe(mut ws: WsConn, channel: &str) -> Result<WsConn, String> {
    let sub = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}}).to_string();
    ws.send_text(&sub).await.map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    wait_for(&mut ws, "subscription_succeeded", deadline).await?;
    Ok(ws)
}

/// The decimal number right after the first `{name}=` in `t` (what `t.find("t=")` then
/// `parse::<u64>()` would give), found with one `memchr` pass instead of a JSON parse: the
/// payload is `t=NANOS i=EVENT xxx…`, quoted inside the Pusher message.
fn field(t: &[u8], name: u8) -> Option<u64> {
    let mut from = 0;
    let at = loop {
        let eq = from + memchr::memchr(b'=', &t[from..])?;
        if eq > 0 && t[eq - 1] == name {
            break eq + 1;
        }
        from = eq + 1;
    };
    let digits = t[at..].iter().take_while(|c| c.is_ascii_digit());
    let mut v: u64 = 0;
    let mut any = false;
    for c in digits {
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        any = true;
    }
    any.then_some(v)
}

/// Reads events and records their latency until the socket closes or `stop` fires.
pub async fn receive(mut ws: WsConn, state: Shared, stop: Rc<tokio::sync::Notify>) {
    // Registered once: a fresh `notified()` per message took and released the Notify's lock twice.
    let stopped = stop.notified();
    tokio::pin!(stopped);
    loop {
        let msg = tokio::select! {
            biased;
            m = ws.next() => m,
            _ = &mut stopped => break,
        };
        match msg {
            Ok(Some(Msg::Text(t))) => {
                let now = Instant::now();
                if let (Some(ts), Some(i)) = (field(t, b't'), field(t, b'i')) {
                    let mut s = state.borrow_mut();
                    let lat = ((now - s.base).as_nanos() as u64).saturating_sub(ts);
                    s.hist.record(lat);
                    if let Some(last) = s.last_arrival_us.get_mut(i as usize) {
                        *last = (*last).max(u32::try_from(lat / 1000).unwrap_or(u32::MAX));
                    }
                    s.delivered += 1;
                    let subs = s.subscribers;
                    if let Some(c) = s.per_event.get_mut(i as usize) {
                        *c += 1;
                        if *c == subs {
                            s.complete_events += 1;
                        }
                    }
                } else if has(t, "pusher:ping") {
                    let _ = ws.send_text(r#"{"event":"pusher:pong","data":{}}"#).await;
                    state.borrow_mut().pongs += 1;
                }
            }
            Ok(Some(Msg::Binary)) => {}
            Ok(None) | Err(_) => {
                state.borrow_mut().closed += 1;
                return;
            }
        }
    }
    ws.close().await;
}

/// `weir-bench ws-hold`: opens `count` idle connections from `src`, prints `ready OK FAILED`,
/// then holds them until stdin closes or `hold` elapses (so it always stops by itself).
pub fn hold_main(addr: SocketAddr, key: &str, count: usize, src: Option<IpAddr>, hold: Duration) {
    crate::sys::raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let sem = Rc::new(tokio::sync::Semaphore::new(64));
        let held = Rc::new(RefCell::new(Vec::with_capacity(count)));
        let failed = Rc::new(RefCell::new(0usize));
        let first_err = Rc::new(RefCell::new(None::<String>));
        let mut tasks = Vec::new();
        for _ in 0..count {
            let sem = sem.clone();
            let held = held.clone();
            let failed = failed.clone();
            let first_err = first_err.clone();
            let key = key.to_string();
            tasks.push(tokio::task::spawn_local(async move {
                let _p = sem.acquire().await.expect("open");
                match connect(addr, src, &key).await {
                    Ok(ws) => held.borrow_mut().push(ws),
                    Err(e) => {
                        *failed.borrow_mut() += 1;
                        first_err.borrow_mut().get_or_insert(e);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let ok = held.borrow().len();
        println!("ready {ok} {} {}", failed.borrow(), first_err.borrow().clone().unwrap_or_default().replace('\n', " "));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // Hold until the parent closes our stdin (or dies), bounded by `hold`.
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            while std::io::stdin().read_line(&mut s).map(|n| n > 0).unwrap_or(false) {}
        });
        let _ = tokio::time::timeout(hold, stdin_closed).await;
        drop(held);
    });
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of Pusher's HTTP API authentication documentation.
    #[test]
    fn signature_matches_pusher_docs() {
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let md5 = hex::encode(Md5::digest(body.as_bytes()));
        assert_eq!(md5, "ec365a775a4cd0599faeb73354201b6f");
        let q = format!("auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5={md5}");
        assert_eq!(
            signature("7ad3773142a6692b25b8", "POST", "/apps/3/events", &q),
            "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn fields_parse_from_a_frame() {
        let frame = r#"{"event":"bench","channel":"c","data":"t=12345 i=7 xxxx"}"#;
        assert_eq!(field(frame.as_bytes(), b't'), Some(12345));
        assert_eq!(field(frame.as_bytes(), b'i'), Some(7));
        assert_eq!(field(br#"{"a=1","data":"t= i=2"}"#, b't'), None);
        assert_eq!(field(b"t=99999999999999999999", b't'), None);
    }
}

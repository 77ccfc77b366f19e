//! The Pusher side: HTTP API signing (auth_version 1.0), WebSocket subscribers that time each
//! event from a timestamp in its payload, and idle connection holders.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use md5::{Digest, Md5};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

use crate::hist::Hist;

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

pub fn ws_url(addr: SocketAddr, key: &str) -> String {
    format!("ws://{addr}/app/{key}?protocol=7&client=weir-bench&version=0.1")
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects from `src` (a loopback address) and waits for `pusher:connection_established`.
pub async fn connect(addr: SocketAddr, src: Option<IpAddr>, key: &str) -> Result<Ws, String> {
    let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip, 0)).map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let stream = sock.connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut ws, _) = tokio_tungstenite::client_async(ws_url(addr, key), stream)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| "no connection_established within 10 s".to_string())?;
        match msg {
            Some(Ok(Message::Text(t))) if t.contains("pusher:connection_established") => return Ok(ws),
            Some(Ok(Message::Text(t))) if t.contains("pusher:error") => return Err(format!("server: {t}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed before connection_established".into()),
        }
    }
}

/// Shared by all subscribers of one fan-out run (single-threaded runtime).
pub struct FanoutState {
    pub base: Instant,
    pub hist: Hist,
    pub delivered: u64,
    pub per_event: Vec<u32>,
    pub complete_events: u64,
    pub subscribers: u32,
    pub closed: u64,
    pub pongs: u64,
}

pub type Shared = Rc<RefCell<FanoutState>>;

/// Subscribes `ws` to `channel`, waits for success, then reads events until closed or `stop`.
pub async fn subscribe(mut ws: Ws, channel: &str) -> Result<Ws, String> {
    let sub = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}}).to_string();
    ws.send(Message::Text(sub.into())).await.map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| "no subscription_succeeded within 15 s".to_string())?;
        match msg {
            Some(Ok(Message::Text(t))) if t.contains("subscription_succeeded") => return Ok(ws),
            Some(Ok(Message::Text(t))) if t.contains("pusher:error") => return Err(format!("server: {t}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed before subscription_succeeded".into()),
        }
    }
}

fn field(t: &str, name: &str) -> Option<u64> {
    let at = t.find(name)? + name.len();
    let digits: &str = &t[at..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Reads events and records their latency until the socket closes or `stop` fires.
pub async fn receive(mut ws: Ws, state: Shared, stop: Rc<tokio::sync::Notify>) {
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = stop.notified() => break,
        };
        match msg {
            Some(Ok(Message::Text(t))) => {
                let now = Instant::now();
                if let (Some(ts), Some(i)) = (field(&t, "t="), field(&t, "i=")) {
                    let mut s = state.borrow_mut();
                    let lat = (now - s.base).as_nanos() as u64;
                    s.hist.record(lat.saturating_sub(ts));
                    s.delivered += 1;
                    let subs = s.subscribers;
                    if let Some(c) = s.per_event.get_mut(i as usize) {
                        *c += 1;
                        if *c == subs {
                            s.complete_events += 1;
                        }
                    }
                } else if t.contains("pusher:ping") {
                    let _ = ws.send(Message::Text(r#"{"event":"pusher:pong","data":{}}"#.into())).await;
                    state.borrow_mut().pongs += 1;
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                state.borrow_mut().closed += 1;
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    let _ = ws.close(None).await;
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
        assert_eq!(field(frame, "t="), Some(12345));
        assert_eq!(field(frame, "i="), Some(7));
    }
}

//! A lean client WebSocket (RFC 6455) for the subscribers: a hand-written upgrade, then frames
//! read straight from the socket into one reusable buffer per connection and handed out as
//! borrowed slices. The fan-out client receives hundreds of thousands of messages a second on one
//! core; tungstenite zero-filled its 128 KiB read buffer before every read (half the client's
//! CPU in a `perf` profile) and allocated each message. Pings are answered here; what a message
//! means (Pusher events) is left to [`crate::pusher`]. No extensions, no TLS.

use std::io;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Initial buffer per connection: fan-out messages are ~150 bytes, so one read takes in dozens
/// of them when the client falls behind, and 5,000 subscribers hold 40 MB at most.
const READ_BUF: usize = 8 * 1024;
/// Room to ask the kernel for on each read; the buffer grows (doubling) only for a larger frame.
const MIN_READ: usize = 2 * 1024;
/// Largest message accepted (16 MiB): a bound, not a protocol limit; the scenarios send < 1 KiB.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Largest upgrade response head accepted.
const MAX_HEAD: usize = 16 * 1024;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A complete data message (fragments already joined), borrowed until the next read.
pub enum Msg<'a> {
    Text(&'a [u8]),
    /// The load client never expects binary messages; their content is not kept.
    Binary,
}

pub struct WsConn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Start of the bytes in `buf` not yet parsed.
    pos: usize,
    /// A fragmented message being joined, and whether it is text.
    frag: Vec<u8>,
    frag_text: Option<bool>,
    /// `frag` was handed out by the last `next`; clear it on the next call.
    frag_done: bool,
}

struct Header {
    fin: bool,
    opcode: u8,
    head: usize,
    len: usize,
    mask: Option<[u8; 4]>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Parses a frame header; `None` until all of it is in `b`.
fn parse_header(b: &[u8]) -> io::Result<Option<Header>> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[0] & 0x70 != 0 {
        return Err(bad("reserved frame bits set (no extension was negotiated)"));
    }
    let (len, mut head) = match b[1] & 0x7f {
        126 if b.len() < 4 => return Ok(None),
        126 => (u16::from_be_bytes([b[2], b[3]]) as u64, 4),
        127 if b.len() < 10 => return Ok(None),
        127 => (u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")), 10),
        n => (n as u64, 2),
    };
    if len > MAX_MESSAGE as u64 {
        return Err(bad(format!("frame of {len} bytes")));
    }
    // Servers must not mask; accepted anyway, it costs one branch.
    let mask = if b[1] & 0x80 != 0 {
        if b.len() < head + 4 {
            return Ok(None);
        }
        let m = [b[head], b[head + 1], b[head + 2], b[head + 3]];
        head += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(Header { fin: b[0] & 0x80 != 0, opcode: b[0] & 0x0f, head, len: len as usize, mask }))
}

fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// A masked client frame, as RFC 6455 requires of clients.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mut mask = [0u8; 4];
    // The key only has to be unpredictable to intermediaries; a failed draw keeps zeros.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut mask);
    f.extend_from_slice(&mask);
    let at = f.len();
    f.extend_from_slice(payload);
    apply_mask(&mut f[at..], mask);
    f
}

fn accept_key(key: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, format!("{key}{GUID}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(d.as_ref())
}

impl WsConn {
    /// Sends the upgrade request for `path` and checks the 101 answer. Bytes the server sent right
    /// after it (often the first message) stay buffered.
    pub async fn handshake(mut stream: TcpStream, host: &str, path: &str) -> io::Result<WsConn> {
        let mut nonce = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).map_err(|_| bad("no randomness"))?;
        let key = base64::engine::general_purpose::STANDARD.encode(nonce);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::with_capacity(READ_BUF);
        loop {
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed during the upgrade"));
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut headers);
            let head_len = match r.parse(&buf).map_err(|e| bad(format!("upgrade response: {e}")))? {
                httparse::Status::Partial if buf.len() > MAX_HEAD => return Err(bad("upgrade response head too large")),
                httparse::Status::Partial => continue,
                httparse::Status::Complete(n) => n,
            };
            if r.code != Some(101) {
                return Err(bad(format!("upgrade answered HTTP {}", r.code.unwrap_or(0))));
            }
            let want = accept_key(&key);
            let accept = r.headers.iter().find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"));
            if accept.map(|h| h.value) != Some(want.as_bytes()) {
                return Err(bad("wrong or missing Sec-WebSocket-Accept"));
            }
            return Ok(WsConn { stream, buf, pos: head_len, frag: Vec::new(), frag_text: None, frag_done: false });
        }
    }

    /// Reads more bytes, keeping the unparsed tail; `false` at end of stream.
    async fn fill(&mut self, need: usize) -> io::Result<bool> {
        if self.pos > 0 {
            // Usually everything was parsed and this is free; otherwise it moves one partial frame.
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let spare = self.buf.capacity() - self.buf.len();
        if spare < MIN_READ || self.buf.len() + spare < need {
            self.buf.reserve(MIN_READ.max(need.saturating_sub(self.buf.len())));
        }
        Ok(self.stream.read_buf(&mut self.buf).await? > 0)
    }

    /// The next data message; `None` once the server closed (a close frame, answered, or EOF).
    /// Cancel-safe: nothing is lost if the future is dropped while waiting for bytes.
    pub async fn next(&mut self) -> io::Result<Option<Msg<'_>>> {
        if self.frag_done {
            self.frag.clear();
            self.frag_done = false;
        }
        loop {
            let h = loop {
                let avail = &self.buf[self.pos..];
                let need = match parse_header(avail)? {
                    Some(h) if avail.len() >= h.head + h.len => break h,
                    Some(h) => h.head + h.len,
                    None => 14,
                };
                if !self.fill(need).await? {
                    return Ok(None);
                }
            };
            let (start, end) = (self.pos + h.head, self.pos + h.head + h.len);
            self.pos = end;
            if let Some(m) = h.mask {
                apply_mask(&mut self.buf[start..end], m);
            }
            match h.opcode {
                1 | 2 if self.frag_text.is_some() => return Err(bad("new message inside a fragmented one")),
                1 | 2 if h.fin => {
                    let data = &self.buf[start..end];
                    return Ok(Some(if h.opcode == 1 { Msg::Text(data) } else { Msg::Binary }));
                }
                1 | 2 => {
                    self.frag_text = Some(h.opcode == 1);
                    self.frag.extend_from_slice(&self.buf[start..end]);
                }
                0 => {
                    let Some(text) = self.frag_text else { return Err(bad("continuation without a first fragment")) };
                    if self.frag.len() + h.len > MAX_MESSAGE {
                        return Err(bad("fragmented message too large"));
                    }
                    self.frag.extend_from_slice(&self.buf[start..end]);
                    if h.fin {
                        self.frag_text = None;
                        self.frag_done = true;
                        return Ok(Some(if text { Msg::Text(&self.frag) } else { Msg::Binary }));
                    }
                }
                8 => {
                    // Echo the status code (if any), as the closing handshake asks.
                    let code = self.buf[start..end.min(start + 2)].to_vec();
                    let _ = self.stream.write_all(&client_frame(8, &code)).await;
                    return Ok(None);
                }
                9 => {
                    let f = client_frame(10, &self.buf[start..end]);
                    self.stream.write_all(&f).await?;
                }
                10 => {}
                op => return Err(bad(format!("unknown opcode {op}"))),
            }
        }
    }

    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.stream.write_all(&client_frame(1, text.as_bytes())).await
    }

    /// Starts the closing handshake (status 1000) without waiting for the answer.
    pub async fn close(&mut self) {
        let _ = self.stream.write_all(&client_frame(8, &1000u16.to_be_bytes())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn accept_key_matches_rfc_6455() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn headers_parse_all_lengths() {
        let h = parse_header(&[0x81, 5]).unwrap().unwrap();
        assert!(h.fin && h.opcode == 1 && h.head == 2 && h.len == 5 && h.mask.is_none());
        assert!(parse_header(&[0x81, 126, 1]).unwrap().is_none());
        let h = parse_header(&[0x01, 126, 1, 0]).unwrap().unwrap();
        assert!(!h.fin && h.head == 4 && h.len == 256);
        let h = parse_header(&[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]).unwrap().unwrap();
        assert!(h.head == 10 && h.len == 65_536);
        let h = parse_header(&[0x81, 0x82, 1, 2, 3, 4]).unwrap().unwrap();
        assert!(h.head == 6 && h.mask == Some([1, 2, 3, 4]));
        assert!(parse_header(&[0xc1, 0]).is_err());
    }

    fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![first];
        if payload.len() < 126 {
            f.push(payload.len() as u8);
        } else {
            f.push(126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(payload);
        f
    }

    /// Reads one masked client frame: (opcode, unmasked payload).
    async fn read_client_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(h[1] & 0x80, 0x80, "client frames are masked");
        let len = (h[1] & 0x7f) as usize;
        assert!(len < 126);
        let mut mask = [0u8; 4];
        s.read_exact(&mut mask).await.unwrap();
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).await.unwrap();
        apply_mask(&mut p, mask);
        (h[0] & 0x0f, p)
    }

    /// Upgrade, a message glued to the 101, a fragmented message with a ping in between, a large
    /// message split across writes, and the closing handshake.
    #[tokio::test]
    async fn reads_frames_and_answers_control_frames() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            while !req.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.unwrap();
                req.push(b[0]);
            }
            let req = String::from_utf8(req).unwrap();
            let key = req.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ")).unwrap();
            let mut out = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                accept_key(key)
            )
            .into_bytes();
            out.extend(server_frame(0x81, b"hello"));
            out.extend(server_frame(0x01, b"frag-"));
            out.extend(server_frame(0x89, b"p"));
            out.extend(server_frame(0x80, b"ment"));
            s.write_all(&out).await.unwrap();
            assert_eq!(read_client_frame(&mut s).await, (10, b"p".to_vec()));
            let big = server_frame(0x81, &[b'7'; 3000]);
            s.write_all(&big[..1000]).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            s.write_all(&big[1000..]).await.unwrap();
            assert_eq!(read_client_frame(&mut s).await, (1, b"hi".to_vec()));
            s.write_all(&server_frame(0x88, &1001u16.to_be_bytes())).await.unwrap();
            assert_eq!(read_client_frame(&mut s).await, (8, 1001u16.to_be_bytes().to_vec()));
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut ws = WsConn::handshake(stream, &addr.to_string(), "/app/k").await.unwrap();
        assert!(matches!(ws.next().await.unwrap(), Some(Msg::Text(b"hello"))));
        assert!(matches!(ws.next().await.unwrap(), Some(Msg::Text(b"frag-ment"))));
        match ws.next().await.unwrap() {
            Some(Msg::Text(b)) => assert!(b.len() == 3000 && b.iter().all(|&x| x == b'7')),
            _ => panic!("expected the large message"),
        }
        ws.send_text("hi").await.unwrap();
        assert!(ws.next().await.unwrap().is_none());
        server.await.unwrap();
    }
}

//! A minimal HTTP/1.1 keep-alive client: writes prebuilt request bytes, parses the response head
//! with `httparse`, reads a `Content-Length` or chunked body. Far cheaper per request than a
//! general client, so one pinned core can drive a server on the other core.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Resp {
    pub status: u16,
    /// `Retry-After` in seconds, when given as seconds.
    pub retry_after: Option<u64>,
    pub set_cookies: Vec<String>,
    pub location: Option<String>,
    pub body: Vec<u8>,
}

pub struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

/// Builds a request; `extra` is a list of complete header lines without CRLF.
pub fn request(method: &str, path: &str, host: &str, extra: &[String], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for h in extra {
        r.push_str(h);
        r.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" || method == "PATCH" {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    let mut v = r.into_bytes();
    v.extend_from_slice(body);
    v
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Self {
        Conn { addr, stream: None, buf: Vec::with_capacity(16 * 1024) }
    }

    /// Opens the connection now, so the first request's latency is the request's alone.
    pub async fn connect(&mut self) -> io::Result<()> {
        self.stream().await.map(|_| ())
    }

    async fn stream(&mut self) -> io::Result<&mut TcpStream> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
            self.buf.clear();
        }
        Ok(self.stream.as_mut().expect("just set"))
    }

    /// Sends one request and reads its response. `keep_body` = false skips copying the body.
    /// On any error the connection is dropped and reopened by the next call.
    pub async fn send(&mut self, req: &[u8], keep_body: bool) -> io::Result<Resp> {
        match self.send_inner(req, keep_body).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }

    async fn send_inner(&mut self, req: &[u8], keep_body: bool) -> io::Result<Resp> {
        let s = self.stream().await?;
        s.write_all(req).await?;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let res = read_response(self.stream.as_mut().expect("open"), &mut buf, keep_body).await;
        self.buf = buf;
        let (resp, close) = res?;
        if close {
            self.stream = None;
        }
        Ok(resp)
    }

    pub async fn send_timeout(&mut self, req: &[u8], keep_body: bool, t: Duration) -> io::Result<Resp> {
        match tokio::time::timeout(t, self.send(req, keep_body)).await {
            Ok(r) => r,
            Err(_) => {
                self.stream = None;
                Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out"))
            }
        }
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    let n = s.read_buf(buf).await?;
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    Ok(())
}

/// Reads one response; returns it and whether the server will close the connection.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, keep_body: bool) -> io::Result<(Resp, bool)> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 48];
        let mut r = httparse::Response::new(&mut headers);
        match r.parse(buf).map_err(|_| bad("bad response head"))? {
            httparse::Status::Partial => {
                fill(s, buf).await?;
                continue;
            }
            httparse::Status::Complete(head_len) => {
                let status = r.code.unwrap_or(0);
                let mut resp = Resp {
                    status,
                    retry_after: None,
                    set_cookies: Vec::new(),
                    location: None,
                    body: Vec::new(),
                };
                let mut content_length: Option<usize> = None;
                let mut chunked = false;
                let mut close = false;
                for h in r.headers.iter() {
                    let n = h.name;
                    if n.eq_ignore_ascii_case("content-length") {
                        content_length = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok());
                    } else if n.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = h.value.windows(7).any(|w| w.eq_ignore_ascii_case(b"chunked"));
                    } else if n.eq_ignore_ascii_case("retry-after") {
                        resp.retry_after = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok());
                    } else if n.eq_ignore_ascii_case("set-cookie") {
                        resp.set_cookies.push(String::from_utf8_lossy(h.value).into_owned());
                    } else if n.eq_ignore_ascii_case("location") {
                        resp.location = Some(String::from_utf8_lossy(h.value).into_owned());
                    } else if n.eq_ignore_ascii_case("connection") {
                        close = h.value.eq_ignore_ascii_case(b"close");
                    }
                }
                buf.drain(..head_len);
                if chunked {
                    read_chunked(s, buf, &mut resp.body, keep_body).await?;
                } else {
                    let len = content_length.unwrap_or(0);
                    while buf.len() < len {
                        fill(s, buf).await?;
                    }
                    if keep_body {
                        resp.body.extend_from_slice(&buf[..len]);
                    }
                    buf.drain(..len);
                }
                return Ok((resp, close));
            }
        }
    }
}

async fn read_chunked(s: &mut TcpStream, buf: &mut Vec<u8>, out: &mut Vec<u8>, keep: bool) -> io::Result<()> {
    loop {
        let line_end = loop {
            if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                break p;
            }
            fill(s, buf).await?;
        };
        let size_str = std::str::from_utf8(&buf[..line_end]).map_err(|_| bad("chunk size"))?;
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("chunk size"))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            loop {
                if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                    buf.drain(..p + 2);
                    if p == 0 {
                        return Ok(());
                    }
                    continue;
                }
                fill(s, buf).await?;
            }
        }
        while buf.len() < size + 2 {
            fill(s, buf).await?;
        }
        if keep {
            out.extend_from_slice(&buf[..size]);
        }
        buf.drain(..size + 2);
    }
}

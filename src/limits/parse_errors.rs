//! JSON bodies for the answers hyper writes itself. A request hyper cannot parse never reaches
//! weir's code: hyper answers 400 (not HTTP/1.1), 414 (a URI over 64 KB) or 431 (more request
//! headers than it takes) with an empty body and closes the connection. [`with_json_body`]
//! recognises those answers on their way to the socket (`backoff::Throttled` checks each write)
//! and gives them the `{"error": {"code", "message"}}` body every other error has.
//!
//! The check is one byte for answers weir wrote (their status is not 4xx, or they carry a body):
//! only a head that starts exactly as hyper's own error answers do is rewritten.

/// hyper's error answers up to their `content-length: 0`, with the code and message they get.
const HYPER_ANSWERS: [(&[u8], &str, &str); 3] = [
    (
        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n",
        "bad_request",
        "the request is not valid HTTP/1.1",
    ),
    (
        b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\n",
        "uri_too_long",
        "the request's path and query are longer than this server takes (64 KB)",
    ),
    (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n",
        "headers_too_large",
        "the request has more headers, or longer ones, than this server takes",
    ),
];

/// `write`, one of hyper's own error answers, with a JSON error body; `None` for any other write.
pub fn with_json_body(write: &[u8]) -> Option<Vec<u8>> {
    // Fast path: hyper's answers are 4xx heads of about a hundred bytes ending the write.
    if write.len() > 256 || write.get(9) != Some(&b'4') || !write.ends_with(b"\r\n\r\n") {
        return None;
    }
    let (prefix, code, message) = HYPER_ANSWERS.iter().find(|(prefix, ..)| write.starts_with(prefix))?;
    // The status line and `connection: close`, then the rest of hyper's head (its `date`).
    let status_and_close = &prefix[..prefix.len() - b"content-length: 0\r\n".len()];
    let rest = &write[prefix.len()..];
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    let mut out = Vec::with_capacity(write.len() + body.len() + 64);
    out.extend_from_slice(status_and_close);
    out.extend_from_slice(b"content-type: application/json\r\ncontent-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(rest);
    out.extend_from_slice(body.as_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_s_own_errors_get_the_json_body() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Fri, 04 Dec 2026 12:10:29 GMT\r\n\r\n";
        let out = String::from_utf8(with_json_body(head).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert_eq!(
            head,
            format!(
                "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\ndate: Fri, 04 Dec 2026 12:10:29 GMT",
                body.len()
            )
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "headers_too_large");
        for status in ["400 Bad Request", "414 URI Too Long"] {
            let head = format!("HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n");
            assert!(with_json_body(head.as_bytes()).is_some(), "{status}");
        }
    }

    #[test]
    fn weir_s_own_answers_pass_unchanged() {
        let ours = [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 56\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n{}",
            b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            b"{\"data\": \"HTTP/1.1 400 Bad Request\"}",
        ];
        for write in ours {
            assert_eq!(with_json_body(write), None, "{}", String::from_utf8_lossy(write));
        }
    }
}

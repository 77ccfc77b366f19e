//! Static assets compiled into the binary (the waiting page's script), served at
//! `/_weir/static/...` with an ETag and long-lived caching for versioned URLs. Every new visitor
//! fetches the script once, so it is gzip-compressed once, at first use, not per request.

use std::hash::{Hash, Hasher};
use std::sync::LazyLock;

use axum::extract::Query;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use crate::http::AppState;

/// The script with every language's phrases in it (`i18n::script_phrases`).
static ROOM_JS: LazyLock<String> =
    LazyLock::new(|| include_str!("static/room.js").replacen(PHRASES_SLOT, &super::i18n::script_phrases(), 1));
const PHRASES_SLOT: &str = "/*weir:phrases*/{}";

/// A content hash of the script: the `?v=` of its URL and its ETag.
static ROOM_JS_VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ROOM_JS.hash(&mut h);
    format!("{:016x}", h.finish())
});

/// The script gzip-compressed (`None` if compression failed: then the compression layer does it).
static ROOM_JS_GZIP: LazyLock<Option<bytes::Bytes>> = LazyLock::new(|| super::gzip::compress(ROOM_JS.as_bytes()).map(bytes::Bytes::from));

/// The versioned URL pages link to; a new build changes it, so it can be cached forever.
pub static ROOM_JS_PATH: LazyLock<String> = LazyLock::new(|| format!("/_weir/static/room.js?v={}", *ROOM_JS_VERSION));

pub fn routes() -> Router<AppState> {
    Router::new().route("/_weir/static/room.js", get(room_js))
}

#[derive(Deserialize)]
struct Version {
    v: Option<String>,
}

async fn room_js(query: Result<Query<Version>, axum::extract::rejection::QueryRejection>, headers: HeaderMap) -> Response {
    let gzipped = ROOM_JS_GZIP.as_ref().filter(|_| super::gzip::accepts_gzip(&headers));
    // Each encoding is its own representation, with its own strong ETag.
    let etag = format!("\"{}{}\"", *ROOM_JS_VERSION, if gzipped.is_some() { "-gzip" } else { "" });
    let versioned = query.ok().and_then(|Query(q)| q.v).is_some_and(|v| v == *ROOM_JS_VERSION);
    // Versioned: immutable for a year. Unversioned (someone's bookmark): revalidate after 5 min.
    let cache = if versioned { "public, max-age=31536000, immutable" } else { "public, max-age=300" };
    let content_type = [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")];
    let mut response = if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.split(',').any(|t| t.trim() == etag)) {
        StatusCode::NOT_MODIFIED.into_response()
    } else if let Some(body) = gzipped {
        (content_type, [(header::CONTENT_ENCODING, "gzip")], body.clone()).into_response()
    } else {
        (content_type, ROOM_JS.as_str()).into_response()
    };
    let h = response.headers_mut();
    if gzipped.is_some() {
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_carries_every_languages_phrases() {
        assert!(!ROOM_JS.contains(PHRASES_SLOT), "the slot is filled");
        let start = ROOM_JS.find("var PHRASES = ").expect("the phrases' variable") + "var PHRASES = ".len();
        let len = ROOM_JS[start..].find(";\n").expect("one statement");
        let phrases: serde_json::Value = serde_json::from_str(&ROOM_JS[start..start + len]).expect("JSON");
        for t in super::super::i18n::LANGUAGES {
            assert_eq!(phrases[t.lang]["about_minutes"], t.about_minutes, "{}", t.lang);
            assert_eq!(phrases[t.lang]["eta_unknown"], t.eta_unknown, "{}", t.lang);
        }
    }
}

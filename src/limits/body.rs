//! Request bodies declared too large are refused before a byte of them is read: axum's body
//! limits count bytes as they arrive, so a `Content-Length` far over the limit with a body that
//! never comes would otherwise hold an in-flight slot until the request timeout, and end as a
//! 503 that blames the server for the client's mistake.

use axum::extract::Request;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The bodies axum's extractors accept by default (its `DefaultBodyLimit`).
pub const AXUM_DEFAULT: usize = 2 * 1024 * 1024;

/// Whether `headers` declare a body of more than `limit` bytes.
pub fn declared_over(headers: &HeaderMap, limit: usize) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > limit as u64)
}

/// The 413 for a body over `limit`.
pub fn too_large(limit: usize) -> ApiError {
    ApiError::payload_too_large(format!("request body over {limit} bytes"))
}

/// A middleware refusing requests that declare a body over `limit` (a route group's
/// `DefaultBodyLimit`, which still bounds bodies sent without a length).
pub fn refuse_declared_over(
    limit: usize,
) -> impl Fn(Request, Next) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>> + Clone + Send + Sync + 'static {
    move |request: Request, next: Next| {
        Box::pin(async move {
            if declared_over(request.headers(), limit) {
                return too_large(limit).into_response();
            }
            next.run(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_declared_length_over_the_limit_counts() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_LENGTH, v.parse().unwrap());
            h
        };
        assert!(declared_over(&with("1025"), 1024));
        assert!(declared_over(&with("10000000000"), 1024));
        assert!(!declared_over(&with("1024"), 1024));
        assert!(!declared_over(&with("nonsense"), 1024), "hyper refuses a malformed length itself");
        assert!(!declared_over(&HeaderMap::new(), 1024));
    }
}

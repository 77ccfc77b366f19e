//! Request bodies declared too large are refused before a byte of them is read: axum's body
//! limits count bytes as they arrive, so a `Content-Length` far over the limit with a body that
//! never comes would otherwise hold an in-flight slot until the request timeout, and end as a
//! 503 that blames the server for the client's mistake. For the same reason a body is
//! [`watch`]ed: a request that times out while its body is still arriving is the client's
//! doing, answered 408, not 503 (`limits::shed`).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

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

/// Whether a watched body has been read to its end.
#[derive(Clone, Default)]
pub struct Received(Arc<AtomicBool>);

impl Received {
    pub fn is_complete(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Wraps `request`'s body so that its end is seen; `None` (and the request untouched) when it
/// has no body, as GETs do: that costs one call on the hot paths.
pub fn watch(request: Request) -> (Request, Option<Received>) {
    if request.body().is_end_stream() {
        return (request, None);
    }
    let received = Received::default();
    let (parts, body) = request.into_parts();
    let watched = Watched { inner: body, received: received.clone() };
    (Request::from_parts(parts, Body::new(watched)), Some(received))
}

pin_project_lite::pin_project! {
    struct Watched {
        #[pin]
        inner: Body,
        received: Received,
    }
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            _ => false,
        };
        if ended {
            this.received.0.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watched_body_is_complete_once_read_to_its_end() {
        let (request, received) = watch(Request::new(Body::from("hello")));
        let received = received.expect("a body is watched");
        assert!(!received.is_complete());
        let bytes = axum::body::to_bytes(request.into_body(), 1024).await.unwrap();
        assert_eq!(&bytes[..], b"hello");
        assert!(received.is_complete());
        assert!(watch(Request::new(Body::empty())).1.is_none(), "no body, nothing to watch");
    }

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

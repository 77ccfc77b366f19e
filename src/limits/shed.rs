//! Load shedding: each route group gets its own concurrency bound; a request over the bound is
//! refused at once with 503 and `Retry-After` instead of queueing, so goodput holds under
//! overload. A request that outlives the timeout is answered 503 as well.

use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use tower::ServiceBuilder;

use crate::error::ApiError;

/// Wraps `router` in timeout → load-shed → concurrency-limit, in that order (outermost first):
/// the shed check runs before any work, and the timeout covers everything inside.
pub fn bounded<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    group: &'static str,
    max_in_flight: usize,
    timeout: Duration,
) -> Router<S> {
    router.layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(move |err: tower::BoxError| async move {
                refusal(group, &err).into_response()
            }))
            .timeout(timeout)
            .load_shed()
            .concurrency_limit(max_in_flight),
    )
}

fn refusal(group: &'static str, err: &tower::BoxError) -> ApiError {
    if err.is::<tower::load_shed::error::Overloaded>() {
        metrics::counter!("weir_shed_total", "group" => group).increment(1);
        ApiError::unavailable("server is at capacity; retry shortly", 1)
    } else if err.is::<tower::timeout::error::Elapsed>() {
        metrics::counter!("weir_timeouts_total", "group" => group).increment(1);
        ApiError::unavailable("request timed out", 1)
    } else {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", err.to_string())
    }
}

//! Bounds on work: load shedding per route group, request timeouts, body limits, connections
//! held open by slow request heads, connections served in turns under overload, refusals answered at the door.

pub mod backoff;
pub mod body;
pub mod door;
pub mod head_guard;
pub mod parse_errors;
pub mod shed;
pub mod turns;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// Polls a connection's lazily created timer set to `at`: boxed once, reset when the deadline
/// moves, so a socket wrapper pays for a timer only once it first needs one.
fn poll_timer(timer: &mut Option<Pin<Box<Sleep>>>, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
    if timer.deadline() != at {
        timer.as_mut().reset(at);
    }
    timer.as_mut().poll(cx)
}

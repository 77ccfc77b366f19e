//! Server-rendered visitor pages: minijinja templates compiled into the binary, and the small
//! HTTP helpers pages need (cookies, content negotiation).

pub mod cookies;
pub mod pages;

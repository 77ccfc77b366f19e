//! Server-rendered visitor pages: minijinja templates compiled into the binary ([`pages`]),
//! their words in several languages ([`i18n`]), the page script and other static assets
//! ([`assets`]), and the small HTTP helpers pages need ([`cookies`], and [`gzip`]: pages and the
//! script compressed once, not on every request).

pub mod assets;
pub mod cookies;
pub mod gzip;
pub mod i18n;
pub mod pages;
pub mod template_api;

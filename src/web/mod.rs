//! Server-rendered visitor pages: minijinja templates compiled into the binary ([`pages`]),
//! their words in several languages ([`i18n`]), the page script and other static assets
//! ([`assets`]), and the small HTTP helpers pages need ([`cookies`]).

pub mod assets;
pub mod cookies;
pub mod i18n;
pub mod pages;
pub mod template_api;

//! Page rendering. The built-in templates live in `templates/` and are compiled into the binary;
//! their environment is built once. Autoescaping is on for `.html`, so room names and branding
//! text are safe.
//!
//! Every room page gets the same context (see [`RoomPage::context`]), so a room's custom
//! template (`branding.template`) can render any state. Custom templates run in their own
//! sandboxed environment: no loader (only the built-ins can be extended or included), a fuel
//! budget bounding the work of one render, and autoescaping forced on. A custom template that
//! fails at render time falls back to the built-in page, so it can never take a room down.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use minijinja::{AutoEscape, Environment, Value};
use parking_lot::Mutex;
use serde::Serialize;

use super::i18n::{self, Strings};
use crate::room::model::{RoomSpec, RoomState};
use crate::room::VisitorStatus;

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("waiting.html", include_str!("templates/waiting.html")),
    ("scheduled.html", include_str!("templates/scheduled.html")),
    ("paused.html", include_str!("templates/paused.html")),
    ("closed.html", include_str!("templates/closed.html")),
    ("passthrough.html", include_str!("templates/passthrough.html")),
    ("error.html", include_str!("templates/error.html")),
    ("pow.html", include_str!("templates/pow.html")),
];

/// Name of a room's uploaded template inside its sandbox environment.
const CUSTOM: &str = "custom.html";
/// Instruction budget for one render of a custom template: a page with loops over a few
/// hundred items fits; `{% for i in range(10**9) %}` does not.
const CUSTOM_FUEL: u64 = 200_000;
/// Compiled custom templates kept (one per room); the cache is cleared when it grows past
/// this, so deleted rooms cannot make it grow forever.
const MAX_CACHED_CUSTOM: usize = 1024;

/// Default colours (weir blue on light grey).
const DEFAULT_PRIMARY: &str = "#2458d6";
const DEFAULT_BACKGROUND: &str = "#f5f6f8";

fn add_builtins(env: &mut Environment<'static>) {
    for (name, source) in TEMPLATES {
        if let Err(e) = env.add_template(name, source) {
            // Unreachable in a tested build (`templates_compile`); logged rather than panicking.
            tracing::error!(error = %e, name, "built-in template does not compile");
        }
    }
}

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        add_builtins(&mut env);
        env
    })
}

fn sandbox(source: String) -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    env.set_fuel(Some(CUSTOM_FUEL));
    add_builtins(&mut env);
    env.add_template_owned(CUSTOM, source)?;
    Ok(env)
}

fn describe(e: &minijinja::Error) -> String {
    match e.line() {
        Some(line) => format!("line {line}: {}", e.detail().unwrap_or(&e.kind().to_string())),
        None => e.to_string(),
    }
}

/// Checks an uploaded template: it compiles, and renders every page state with sample data
/// within the fuel budget. The message names the line.
pub fn check_custom(source: &str) -> Result<(), String> {
    let env = sandbox(source.to_string()).map_err(|e| describe(&e))?;
    let template = env.get_template(CUSTOM).map_err(|e| describe(&e))?;
    for page in ["waiting", "scheduled", "paused", "closed", "passthrough"] {
        template.render(sample_context(page)).map_err(|e| describe(&e))?;
    }
    Ok(())
}

fn sample_context(page: &str) -> Value {
    minijinja::context! {
        page, state => page, t => &i18n::EN, title => "Sample room", name => "Sample room", text => "Welcome",
        logo_url => "https://example.com/logo.png", primary_color => DEFAULT_PRIMARY,
        background_color => DEFAULT_BACKGROUND, position => 41, ticket => 100, progress => 59,
        eta_seconds => 300, eta_text => "about 5 minutes", starts_at => "2030-01-01T00:00:00Z",
        starts_at_text => "2030-01-01 00:00 UTC", countdown_text => "1:00:00",
        redirect_url => "https://example.com/", weir_head => Value::from_safe_string(String::new()),
    }
}

/// Compiled custom templates by room id, with the hash of the source they were built from.
type CustomCache = Mutex<HashMap<String, (u64, Arc<Environment<'static>>)>>;

fn custom_env(room: &str, source: &str) -> Option<Arc<Environment<'static>>> {
    static CACHE: OnceLock<CustomCache> = OnceLock::new();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    source.hash(&mut hasher);
    let hash = hasher.finish();
    let cache = CACHE.get_or_init(Default::default);
    if let Some((h, env)) = cache.lock().get(room) {
        if *h == hash {
            return Some(env.clone());
        }
    }
    let env = match sandbox(source.to_string()) {
        Ok(env) => Arc::new(env),
        Err(e) => {
            tracing::warn!(room, error = %describe(&e), "custom template does not compile; using the built-in page");
            return None;
        }
    };
    let mut cache = cache.lock();
    if cache.len() >= MAX_CACHED_CUSTOM {
        cache.clear();
    }
    cache.insert(room.to_string(), (hash, env.clone()));
    Some(env)
}

fn fallback_body() -> String {
    "<!doctype html><title>weir</title><p>Something went wrong. Please reload this page.</p>".to_string()
}

fn finish(status: StatusCode, body: String) -> Response {
    let mut response = (status, Html(body)).into_response();
    // Pages are per visitor (ticket, position): never cached by browsers or proxies.
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Renders a built-in `template` with `context`; a rendering failure degrades to a plain page.
pub fn render(status: StatusCode, template: &str, context: impl Serialize) -> Response {
    let body = env().get_template(template).and_then(|t| t.render(context)).unwrap_or_else(|e| {
        tracing::error!(error = %e, template, "page rendering failed");
        fallback_body()
    });
    finish(status, body)
}

/// The error page in the visitor's language, without room branding.
pub fn error_page_for(status: StatusCode, headers: &HeaderMap, title: impl Fn(&Strings) -> &str, message: impl Fn(&Strings) -> &str) -> Response {
    let t = i18n::choose(None, headers);
    render(
        status,
        "error.html",
        minijinja::context! {
            t, title => title(t), message => message(t), page => "error",
            primary_color => DEFAULT_PRIMARY, background_color => DEFAULT_BACKGROUND,
        },
    )
}

/// An English error page (kept for callers without request headers).
pub fn error_page(status: StatusCode, title: &str, message: &str) -> Response {
    render(
        status,
        "error.html",
        minijinja::context! {
            t => &i18n::EN, title, message, page => "error",
            primary_color => DEFAULT_PRIMARY, background_color => DEFAULT_BACKGROUND,
        },
    )
}

/// What the page script needs (embedded as JSON in `#weir-config`).
#[derive(Serialize)]
struct ScriptConfig<'a> {
    room: &'a str,
    key: &'static str,
    channel: String,
    status_url: String,
    socket_url: String,
    state: &'static str,
    ticket: u64,
    rank: u64,
    serving: u64,
    rate: f64,
    starts_at_ms: Option<i64>,
    now_ms: i64,
    redirect_url: Option<&'a str>,
    t: &'static serde_json::value::RawValue,
}

/// Everything a room page is rendered from.
pub struct RoomPage<'a> {
    pub spec: &'a RoomSpec,
    pub status: &'a VisitorStatus,
    /// The visitor's place in line (its ticket, unless a pre-queue was shuffled).
    pub rank: u64,
    /// The room's serving counter (a rank: every rank at or below it has had its turn).
    pub serving: u64,
    pub now_ms: i64,
    pub headers: &'a HeaderMap,
}

/// `H:MM:SS`, with a day count in front beyond 24 hours.
pub fn countdown_text(seconds: u64) -> String {
    let (d, h, m, s) = (seconds / 86_400, seconds % 86_400 / 3600, seconds % 3600 / 60, seconds % 60);
    if d > 0 {
        format!("{d} d {h}:{m:02}:{s:02}")
    } else {
        format!("{h}:{m:02}:{s:02}")
    }
}

impl RoomPage<'_> {
    fn page(&self) -> &'static str {
        if self.status.redirect_url.is_some() {
            return "passthrough";
        }
        match self.status.state {
            RoomState::Scheduled => "scheduled",
            RoomState::Paused => "paused",
            RoomState::Closed => "closed",
            RoomState::Passthrough => "passthrough",
            RoomState::Open => "waiting",
        }
    }

    /// The context every room template (built-in or custom) gets.
    pub fn context(&self) -> Value {
        let (spec, status) = (self.spec, self.status);
        let b = &spec.branding;
        let t = i18n::choose(b.language.as_deref(), self.headers);
        let page = self.page();
        let position = status.position.unwrap_or(0);
        let ticket = status.ticket.unwrap_or(0);
        let progress = position.saturating_mul(100).checked_div(self.rank).map_or(0, |p| 100u64.saturating_sub(p));
        let starts_at_ms = spec.starts_at_ms();
        let remaining_s = starts_at_ms.map(|s| ((s - self.now_ms).max(0) as u64).div_ceil(1000)).unwrap_or(0);
        let starts_at_text = spec
            .starts_at
            .as_deref()
            .and_then(|s| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok())
            .and_then(|d| d.to_offset(time::UtcOffset::UTC).format(time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC")).ok())
            .unwrap_or_default();
        let config = ScriptConfig {
            room: &spec.id,
            key: crate::realtime::INTERNAL_APP_KEY,
            channel: crate::room::driver::room_channel(&spec.id),
            status_url: format!("/r/{}/status", spec.id),
            socket_url: format!("/r/{}/socket", spec.id),
            state: status.state.as_str(),
            ticket,
            rank: self.rank,
            serving: self.serving,
            rate: spec.rate_per_minute,
            starts_at_ms,
            now_ms: self.now_ms,
            redirect_url: status.redirect_url.as_deref(),
            t: &t.prepared().json,
        };
        // `<` escaped so the JSON cannot close its script element.
        let json = serde_json::to_string(&config).unwrap_or_else(|_| "{}".into()).replace('<', "\\u003c");
        // Without JavaScript the page refreshes itself: a quarter of the wait, 5-30 s.
        let refresh_s = match page {
            "scheduled" => remaining_s.clamp(1, 30),
            "waiting" => status.eta_seconds.map(|e| (e / 4).clamp(5, 30)).unwrap_or(15),
            _ => 15,
        };
        let mut head = String::new();
        match (page, status.redirect_url.as_deref()) {
            ("passthrough", Some(url)) => {
                let url = html_escape(url);
                head.push_str(&format!("<meta http-equiv=\"refresh\" content=\"0;url={url}\">"));
            }
            ("closed", _) => {}
            _ => head.push_str(&format!(
                "<script type=\"application/json\" id=\"weir-config\">{json}</script>\n\
                 <script src=\"{}\" defer onerror=\"setTimeout(function(){{location.reload()}},{})\"></script>\n\
                 <noscript><meta http-equiv=\"refresh\" content=\"{refresh_s}\"></noscript>",
                super::assets::ROOM_JS_PATH.as_str(),
                refresh_s * 1000
            )),
        }
        minijinja::context! {
            page, state => status.state.as_str(), t => t.prepared().value.clone(),
            name => spec.name.clone(),
            title => b.title.clone().unwrap_or_else(|| spec.name.clone()),
            text => b.text.clone(), logo_url => b.logo_url.clone(),
            primary_color => b.primary_color.clone().unwrap_or_else(|| DEFAULT_PRIMARY.into()),
            background_color => b.background_color.clone().unwrap_or_else(|| DEFAULT_BACKGROUND.into()),
            position, ticket, progress, eta_seconds => status.eta_seconds,
            eta_text => status.eta_seconds.map(|e| i18n::duration(t, e)),
            starts_at => spec.starts_at.clone(), starts_at_text, countdown_text => countdown_text(remaining_s),
            redirect_url => status.redirect_url.clone(),
            weir_head => Value::from_safe_string(head),
        }
    }

    /// Renders the room's custom template if it has one and it works, else the built-in page.
    pub fn render(&self, status: StatusCode) -> Response {
        let context = self.context();
        if let Some(source) = &self.spec.branding.template {
            if let Some(env) = custom_env(&self.spec.id, source) {
                match env.get_template(CUSTOM).and_then(|t| t.render(&context)) {
                    Ok(body) => return finish(status, body),
                    Err(e) => tracing::warn!(room = %self.spec.id, error = %describe(&e), "custom template failed; using the built-in page"),
                }
            }
        }
        render(status, &format!("{}.html", self.page()), context)
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow_page_renders_its_script() {
        let r = super::env()
            .get_template("pow.html")
            .unwrap()
            .render(minijinja::context! { name => "n", room => "r", challenge => "c.1", difficulty => 8, to => "/x" })
            .unwrap();
        assert!(r.contains(r#"const challenge = "c.1";"#), "{r}");
    }

    #[test]
    fn templates_compile() {
        for (name, _) in super::TEMPLATES {
            assert!(super::env().get_template(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn custom_templates_are_checked() {
        assert!(check_custom("<h1>{{ title }}</h1>{{ weir_head }}{% if page == 'waiting' %}{{ position }}{% endif %}").is_ok());
        let e = check_custom("<p>ok</p>\n<p>{% if %}</p>").unwrap_err();
        assert!(e.starts_with("line 2"), "{e}");
        let e = check_custom("line one\n\n{{ position | nosuchfilter }}").unwrap_err();
        assert!(e.starts_with("line 3"), "{e}");
        let e = check_custom("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}").unwrap_err();
        assert!(e.contains("fuel"), "{e}");
        assert!(check_custom("{% include '/etc/passwd' %}").is_err());
    }

    #[test]
    fn countdowns() {
        assert_eq!(countdown_text(0), "0:00:00");
        assert_eq!(countdown_text(3725), "1:02:05");
        assert_eq!(countdown_text(90_061), "1 d 1:01:01");
    }
}

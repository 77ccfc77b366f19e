//! Page rendering. The built-in templates live in `templates/` and are compiled into the binary;
//! their environment is built once. Autoescaping is on for `.html`, so room names and branding
//! text are safe.
//!
//! Every room page gets the same context (see `RoomPage::context`), so a room's custom
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

use super::gzip;
use super::i18n::{self, Strings};
use crate::room::model::{RoomSpec, RoomState};
use crate::fast_map::FastMap;
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
/// The most a custom template may write for one page. Fuel bounds the steps a template takes,
/// not what one step makes (`'x' * 100000000` is one step): a page over this is refused at
/// upload and, should the visitor's values make it so, replaced by the built-in page.
pub const MAX_CUSTOM_PAGE_BYTES: usize = 256 * 1024;
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
        let body = template.render(sample_context(page)).map_err(|e| describe(&e))?;
        if body.len() > MAX_CUSTOM_PAGE_BYTES {
            return Err(format!("the {page} page renders {} bytes; at most {MAX_CUSTOM_PAGE_BYTES}", body.len()));
        }
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

/// A page already gzip-compressed (the compression layer passes it through as it is). Built by
/// hand, its header map sized once for these headers and the visitor's cookies: growing it as
/// headers arrive rehashes it (every new visitor's page comes through here).
fn finish_gzip(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = Response::new(axum::body::Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.reserve(8);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
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
    rate: f64,
    starts_at_ms: Option<i64>,
    redirect_url: Option<&'a str>,
    /// The language of the script's phrases (it carries them all).
    lang: &'static str,
    // The per-visitor values last, in one run: everything before them is the same for every
    // visitor of a room, so it is compressed (and checksummed) once as one piece (see `gzip`).
    ticket: serde_json::Value,
    rank: serde_json::Value,
    serving: serde_json::Value,
    now_ms: serde_json::Value,
    /// How long the page waits before reloading if its script fails to load.
    refresh_ms: serde_json::Value,
}

/// Everything a room page is rendered from.
pub struct RoomPage<'a> {
    pub spec: &'a Arc<RoomSpec>,
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
    let mut out = String::with_capacity(16);
    write_countdown(&mut out, seconds);
    out
}

/// [`countdown_text`] into `out`, without `format!` (~1,000 instructions on every page).
fn write_countdown(out: &mut String, seconds: u64) {
    let (d, h, m, s) = (seconds / 86_400, seconds % 86_400 / 3600, seconds % 3600 / 60, seconds % 60);
    let mut number = itoa::Buffer::new();
    if d > 0 {
        out.push_str(number.format(d));
        out.push_str(" d ");
    }
    out.push_str(number.format(h));
    for two in [m, s] {
        out.push(':');
        out.push(char::from(b'0' + (two / 10) as u8));
        out.push(char::from(b'0' + (two % 10) as u8));
    }
}

/// The values of a room page that differ from one visitor (or one second) to the next.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slot {
    Position,
    Ticket,
    Progress,
    EtaText,
    Countdown,
    RefreshS,
    JsonRefreshMs,
    JsonTicket,
    JsonRank,
    JsonServing,
    JsonNowMs,
}

const SLOTS: [Slot; 11] = [
    Slot::Position,
    Slot::Ticket,
    Slot::Progress,
    Slot::EtaText,
    Slot::Countdown,
    Slot::RefreshS,
    Slot::JsonRefreshMs,
    Slot::JsonTicket,
    Slot::JsonRank,
    Slot::JsonServing,
    Slot::JsonNowMs,
];

/// Marks a slot in a skeleton render: private-use characters that no escaping touches and
/// that branding text is checked not to contain.
const MARK_OPEN: char = '\u{E000}';
const MARK_CLOSE: char = '\u{E001}';

fn marker(slot: Slot) -> String {
    let index = SLOTS.iter().position(|s| *s == slot).unwrap_or(0);
    format!("{MARK_OPEN}{}{MARK_CLOSE}", char::from(b'a' + index as u8))
}

/// A per-visitor value, or (for a skeleton) the marker standing in for it.
fn value_or_marker<T: Into<Value>>(values: Option<&Dynamic>, slot: Slot, get: impl Fn(&Dynamic) -> T) -> Value {
    values.map_or_else(|| Value::from(marker(slot)), |v| get(v).into())
}

/// The longest per-visitor value a page shows (an ETA text; numbers are at most 20 digits).
const VALUE_MAX: usize = 64;

/// A built-in page rendered with markers in place of the per-visitor values, split at them.
struct Skeleton {
    pieces: Vec<Piece>,
    len: usize,
    /// Each text piece compressed once, in order (see [`gzip`]), or `None` for a piece that
    /// compression would not shrink (sent stored, with the values around it); `None` as a whole
    /// if compression failed.
    deflated: Option<Vec<Option<gzip::Deflated>>>,
    deflated_len: usize,
    /// Room for the longest stored run (text sent stored plus the values around it), so that
    /// filling a page never grows its buffer.
    stored_len: usize,
}

enum Piece {
    Text(Box<str>),
    Slot(Slot),
}

impl Skeleton {
    /// Splits a marked render. `None` if anything looks off (then the page renders in full).
    fn parse(marked: &str) -> Option<Skeleton> {
        let mut pieces = Vec::new();
        let mut rest = marked;
        while let Some(open) = rest.find(MARK_OPEN) {
            let after = &rest[open + MARK_OPEN.len_utf8()..];
            let mut chars = after.chars();
            let index = chars.next()? as usize;
            if chars.next()? != MARK_CLOSE {
                return None;
            }
            let slot = *SLOTS.get(index.checked_sub('a' as usize)?)?;
            let mut text = &rest[..open];
            let mut next = &after[1 + MARK_CLOSE.len_utf8()..];
            // JSON numbers were serialized as marked strings: drop their quotes.
            if matches!(slot, Slot::JsonTicket | Slot::JsonRank | Slot::JsonServing | Slot::JsonNowMs | Slot::JsonRefreshMs) {
                text = text.strip_suffix('"')?;
                next = next.strip_prefix('"')?;
            }
            pieces.push(Piece::Text(text.into()));
            pieces.push(Piece::Slot(slot));
            rest = next;
        }
        if rest.contains(MARK_CLOSE) {
            return None;
        }
        pieces.push(Piece::Text(rest.into()));
        let texts = pieces.iter().filter_map(|p| match p {
            Piece::Text(t) => Some(t),
            Piece::Slot(_) => None,
        });
        let deflated: Option<Vec<Option<gzip::Deflated>>> = texts
            .map(|t| gzip::deflate_piece(t.as_bytes()).map(|d| (d.compressed_len() < t.len()).then_some(d)))
            .collect();
        let deflated_len = deflated.iter().flatten().map(|d| d.as_ref().map_or(0, gzip::Deflated::compressed_len)).sum::<usize>();
        // An upper bound: every stored text and every value in one run.
        let stored_text: usize = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Text(t) => Some(t.len()),
                Piece::Slot(_) => None,
            })
            .zip(deflated.iter().flatten())
            .filter_map(|(len, d)| d.is_none().then_some(len))
            .sum();
        let stored_len = stored_text + VALUE_MAX * pieces.iter().filter(|p| matches!(p, Piece::Slot(_))).count();
        Some(Skeleton { pieces, len: marked.len(), deflated, deflated_len, stored_len })
    }

    fn fill(&self, v: &Dynamic) -> String {
        let mut out = String::with_capacity(self.len + 64);
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Slot(slot) => write_slot(&mut out, *slot, v),
            }
        }
        out
    }

    /// The page as a gzip body: the pre-compressed text, and in between one stored block for
    /// each run of values and short text.
    fn fill_gzip(&self, v: &Dynamic) -> Option<Vec<u8>> {
        let mut deflated = self.deflated.as_ref()?.iter();
        // Each stored block adds a 5-byte header.
        let mut body = gzip::GzipWriter::with_capacity(self.deflated_len + self.stored_len + 5 * self.pieces.len());
        let mut value = String::with_capacity(VALUE_MAX);
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => match deflated.next()? {
                    Some(d) => body.precompressed(t.as_bytes(), d),
                    None => body.stored(t.as_bytes()),
                },
                Piece::Slot(slot) => {
                    value.clear();
                    write_slot(&mut value, *slot, v);
                    body.stored(value.as_bytes());
                }
            }
        }
        Some(body.finish())
    }
}

/// A per-visitor value as the page shows it.
fn write_slot(out: &mut String, slot: Slot, v: &Dynamic) {
    fn number(out: &mut String, n: impl itoa::Integer) {
        out.push_str(itoa::Buffer::new().format(n));
    }
    match slot {
        Slot::Position => number(out, v.position),
        Slot::Ticket | Slot::JsonTicket => number(out, v.ticket),
        Slot::Progress => number(out, v.progress),
        Slot::EtaText => push_html_escaped(out, v.eta_text.as_deref().unwrap_or("")),
        Slot::Countdown => write_countdown(out, v.countdown_s),
        Slot::RefreshS => number(out, v.refresh_s),
        Slot::JsonRefreshMs => number(out, v.refresh_s * 1000),
        Slot::JsonRank => number(out, v.rank),
        Slot::JsonServing => number(out, v.serving),
        Slot::JsonNowMs => number(out, v.now_ms),
    }
}

/// What a skeleton depends on besides the room's spec.
#[derive(PartialEq, Eq, Clone, Copy)]
struct SkeletonKey {
    lang: &'static str,
    page: &'static str,
    state: &'static str,
    eta_known: bool,
}

/// Skeletons of one room, valid for exactly one spec (compared by `Arc` identity: the cache
/// holds the `Arc`, so its address cannot be reused while cached).
struct RoomSkeletons {
    spec: Arc<RoomSpec>,
    pages: Vec<(SkeletonKey, Option<Arc<Skeleton>>)>,
}

/// Rooms whose skeletons are cached; cleared past this, like the custom-template cache.
const MAX_SKELETON_ROOMS: usize = 1024;

fn skeletons() -> &'static Mutex<FastMap<String, RoomSkeletons>> {
    static CACHE: OnceLock<Mutex<FastMap<String, RoomSkeletons>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The per-visitor values of a page.
struct Dynamic {
    /// The page's language (chosen once: it reads `Accept-Language`).
    strings: &'static Strings,
    position: u64,
    ticket: u64,
    progress: u64,
    eta_text: Option<String>,
    /// Seconds to the scheduled start (its text is written only where a page shows it).
    countdown_s: u64,
    refresh_s: u64,
    rank: u64,
    serving: u64,
    now_ms: i64,
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

    fn strings(&self) -> &'static Strings {
        i18n::choose(self.spec.branding.language.as_deref(), self.headers)
    }

    fn dynamic(&self) -> Dynamic {
        let status = self.status;
        let t = self.strings();
        let position = status.position.unwrap_or(0);
        let remaining_s = self.spec.starts_at_ms().map(|s| ((s - self.now_ms).max(0) as u64).div_ceil(1000)).unwrap_or(0);
        // Without JavaScript the page refreshes itself: a quarter of the wait, 5-30 s.
        let refresh_s = match self.page() {
            "scheduled" => remaining_s.clamp(1, 30),
            "waiting" => status.eta_seconds.map(|e| (e / 4).clamp(5, 30)).unwrap_or(15),
            _ => 15,
        };
        Dynamic {
            strings: t,
            position,
            ticket: status.ticket.unwrap_or(0),
            progress: position.saturating_mul(100).checked_div(self.rank).map_or(0, |p| 100u64.saturating_sub(p)),
            eta_text: status.eta_seconds.map(|e| i18n::duration(t, e)),
            countdown_s: remaining_s,
            refresh_s,
            rank: self.rank,
            serving: self.serving,
            now_ms: self.now_ms,
        }
    }

    /// The context every room template (built-in or custom) gets: with `values`, the real
    /// page; without, a skeleton with markers in place of the per-visitor values.
    fn context(&self, values: Option<&Dynamic>) -> Value {
        let (spec, status) = (self.spec, self.status);
        let b = &spec.branding;
        let t = self.strings();
        let page = self.page();
        let starts_at_text = spec
            .starts_at
            .as_deref()
            .and_then(|s| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok())
            .and_then(|d| d.to_offset(time::UtcOffset::UTC).format(time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC")).ok())
            .unwrap_or_default();
        let json_number = |slot, get: fn(&Dynamic) -> i64| -> serde_json::Value {
            values.map_or_else(|| marker(slot).into(), |v| get(v).into())
        };
        let config = ScriptConfig {
            room: &spec.id,
            key: crate::realtime::INTERNAL_APP_KEY,
            channel: crate::room::driver::room_channel(&spec.id),
            status_url: format!("/r/{}/status", spec.id),
            socket_url: format!("/r/{}/socket", spec.id),
            state: status.state.as_str(),
            rate: spec.rate_per_minute,
            starts_at_ms: spec.starts_at_ms(),
            redirect_url: status.redirect_url.as_deref(),
            lang: t.lang,
            ticket: json_number(Slot::JsonTicket, |v| v.ticket as i64),
            rank: json_number(Slot::JsonRank, |v| v.rank as i64),
            serving: json_number(Slot::JsonServing, |v| v.serving as i64),
            now_ms: json_number(Slot::JsonNowMs, |v| v.now_ms),
            refresh_ms: json_number(Slot::JsonRefreshMs, |v| (v.refresh_s * 1000) as i64),
        };
        // `<` escaped so the JSON cannot close its script element.
        let json = serde_json::to_string(&config).unwrap_or_else(|_| "{}".into()).replace('<', "\\u003c");
        let mut head = String::new();
        match (page, status.redirect_url.as_deref()) {
            ("passthrough", Some(url)) => {
                head.push_str("<meta http-equiv=\"refresh\" content=\"0;url=");
                push_html_escaped(&mut head, url);
                head.push_str("\">");
            }
            ("closed", _) => {}
            // The script first and the config after it, so that the per-visitor values come
            // as late as they can. A deferred script's `error` fires once the page is parsed.
            _ => head.push_str(&format!(
                "<script src=\"{}\" defer onerror=\"setTimeout(function(){{location.reload()}},\
                 JSON.parse(document.getElementById('weir-config').textContent).refresh_ms||5000)\"></script>\n\
                 <script type=\"application/json\" id=\"weir-config\">{json}</script>\n\
                 <noscript><meta http-equiv=\"refresh\" content=\"{}\"></noscript>",
                super::assets::ROOM_JS_PATH.as_str(),
                value_or_marker(values, Slot::RefreshS, |v| v.refresh_s),
            )),
        }
        let eta_text = match values {
            Some(v) => v.eta_text.clone(),
            None => status.eta_seconds.map(|_| marker(Slot::EtaText)),
        };
        minijinja::context! {
            page, state => status.state.as_str(), t => t.prepared().value.clone(),
            name => spec.name.clone(),
            title => b.title.clone().unwrap_or_else(|| spec.name.clone()),
            text => b.text.clone(), logo_url => b.logo_url.clone(),
            primary_color => b.primary_color.clone().unwrap_or_else(|| DEFAULT_PRIMARY.into()),
            background_color => b.background_color.clone().unwrap_or_else(|| DEFAULT_BACKGROUND.into()),
            position => value_or_marker(values, Slot::Position, |v| v.position),
            ticket => value_or_marker(values, Slot::Ticket, |v| v.ticket),
            progress => value_or_marker(values, Slot::Progress, |v| v.progress),
            eta_seconds => status.eta_seconds, eta_text,
            starts_at => spec.starts_at.clone(), starts_at_text,
            countdown_text => value_or_marker(values, Slot::Countdown, |v| countdown_text(v.countdown_s)),
            redirect_url => status.redirect_url.clone(),
            weir_head => Value::from_safe_string(head),
        }
    }

    /// The built-in page from its cached skeleton, when this page can use one: the per-visitor
    /// values are written into the pre-rendered text instead of running the template again.
    fn skeleton(&self, values: &Dynamic) -> Option<Arc<Skeleton>> {
        let page = self.page();
        if self.spec.branding.template.is_some() || !matches!(page, "waiting" | "scheduled" | "paused") {
            return None;
        }
        let key = SkeletonKey { lang: values.strings.lang, page, state: self.status.state.as_str(), eta_known: self.status.eta_seconds.is_some() };
        let cached = {
            let cache = skeletons().lock();
            cache.get(&self.spec.id).filter(|r| Arc::ptr_eq(&r.spec, self.spec)).and_then(|r| r.pages.iter().find(|(k, _)| *k == key).map(|(_, s)| s.clone()))
        };
        let skeleton = match cached {
            Some(s) => s,
            None => {
                let built = self.build_skeleton(page).map(Arc::new);
                let mut cache = skeletons().lock();
                if cache.len() >= MAX_SKELETON_ROOMS && !cache.contains_key(&self.spec.id) {
                    cache.clear();
                }
                let room = cache.entry(self.spec.id.clone()).or_insert_with(|| RoomSkeletons { spec: self.spec.clone(), pages: Vec::new() });
                if !Arc::ptr_eq(&room.spec, self.spec) {
                    *room = RoomSkeletons { spec: self.spec.clone(), pages: Vec::new() };
                }
                room.pages.push((key, built.clone()));
                built
            }
        };
        skeleton
    }

    fn build_skeleton(&self, page: &str) -> Option<Skeleton> {
        let b = &self.spec.branding;
        let branding = [Some(&self.spec.name), b.title.as_ref(), b.text.as_ref(), b.logo_url.as_ref(), b.primary_color.as_ref(), b.background_color.as_ref()];
        if branding.iter().flatten().any(|s| s.contains([MARK_OPEN, MARK_CLOSE])) {
            return None;
        }
        let marked = env().get_template(&format!("{page}.html")).and_then(|t| t.render(self.context(None))).ok()?;
        Skeleton::parse(&marked)
    }

    /// Renders the room's custom template if it has one and it works, else the built-in page.
    pub fn render(&self, status: StatusCode) -> Response {
        let values = self.dynamic();
        if let Some(skeleton) = self.skeleton(&values) {
            if gzip::accepts_gzip(self.headers) {
                if let Some(body) = skeleton.fill_gzip(&values) {
                    return finish_gzip(status, body);
                }
            }
            return finish(status, skeleton.fill(&values));
        }
        let context = self.context(Some(&values));
        if let Some(source) = &self.spec.branding.template {
            if let Some(env) = custom_env(&self.spec.id, source) {
                match env.get_template(CUSTOM).and_then(|t| t.render(&context)) {
                    Ok(body) if body.len() <= MAX_CUSTOM_PAGE_BYTES => return finish(status, body),
                    Ok(body) => tracing::warn!(room = %self.spec.id, bytes = body.len(), "custom template page too large; using the built-in page"),
                    Err(e) => tracing::warn!(room = %self.spec.id, error = %describe(&e), "custom template failed; using the built-in page"),
                }
            }
        }
        render(status, &format!("{}.html", self.page()), context)
    }

    /// The page rendered in full, bypassing the skeleton cache (tests compare the two).
    #[cfg(test)]
    fn render_in_full(&self) -> String {
        let values = self.dynamic();
        env().get_template(&format!("{}.html", self.page())).and_then(|t| t.render(self.context(Some(&values)))).unwrap_or_default()
    }
}

/// What minijinja's auto-escaping would write for `s` in text or an attribute.
fn push_html_escaped(out: &mut String, s: &str) {
    let mut rest = s;
    while let Some(i) = rest.find(['&', '"', '<', '>']) {
        out.push_str(&rest[..i]);
        out.push_str(match rest.as_bytes()[i] {
            b'&' => "&amp;",
            b'"' => "&quot;",
            b'<' => "&lt;",
            _ => "&gt;",
        });
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {

    #[test]
    fn html_escaping_matches_the_replace_chain() {
        for s in ["", "plain", "a & b", "\"<x>\"", "&&<<>>\"\"", "étoile <b>5</b> & \"ok\""] {
            let mut out = String::from("prefix:");
            push_html_escaped(&mut out, s);
            let expected = s.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;").replace('>', "&gt;");
            assert_eq!(out, format!("prefix:{expected}"));
        }
    }

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

    fn spec(state: &str, branding: serde_json::Value) -> Arc<RoomSpec> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "id": "sale", "name": "Sale & <friends>", "origin": "http://o/", "rate_per_minute": 60.0,
                "state": state, "starts_at": "2030-01-01T00:00:00Z", "created_at_ms": 1, "branding": branding,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn skeleton_pages_equal_full_renders() {
        let branding = serde_json::json!({"title": "Big \"sale\" <b>", "text": "It's on", "primary_color": "#123456"});
        let mut headers = HeaderMap::new();
        for (state, lang) in [("open", "en"), ("open", "de"), ("scheduled", "fr"), ("paused", "es")] {
            let spec = spec(state, branding.clone());
            headers.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static(lang));
            for (ticket, eta) in [(7, Some(95)), (1234, None), (9, Some(0))] {
                let status = VisitorStatus {
                    room: "sale".into(), state: spec.state, ticket: Some(ticket), position: Some(ticket / 2),
                    eta_seconds: eta, admitted: false, redirect_url: None, starts_at: spec.starts_at.clone(),
                    token: None,
                    now_ms: 1_893_455_000_123,
                };
                let page = RoomPage { spec: &spec, status: &status, rank: ticket, serving: 3, now_ms: status.now_ms, headers: &headers };
                let values = page.dynamic();
                // Twice: the first builds and caches the skeleton, the second uses it.
                for _ in 0..2 {
                    let skeleton = page.skeleton(&values).expect("these pages have skeletons");
                    let fast = skeleton.fill(&values);
                    assert_eq!(fast, page.render_in_full(), "{state} {lang} {ticket} {eta:?}");
                    let mut unzipped = String::new();
                    let gzipped = skeleton.fill_gzip(&values).expect("the skeleton's text compresses");
                    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gzipped[..]), &mut unzipped).unwrap();
                    assert_eq!(unzipped, fast, "the gzip body is the same page");
                }
            }
        }
    }

    #[test]
    fn branding_with_marker_characters_renders_in_full() {
        let spec = spec("open", serde_json::json!({"text": "odd \u{E000}a\u{E001} text"}));
        let status = VisitorStatus {
            room: "sale".into(), state: spec.state, ticket: Some(5), position: Some(2), eta_seconds: None,
            admitted: false, redirect_url: None, starts_at: None, token: None, now_ms: 0,
        };
        let headers = HeaderMap::new();
        let page = RoomPage { spec: &spec, status: &status, rank: 5, serving: 3, now_ms: 0, headers: &headers };
        assert!(page.skeleton(&page.dynamic()).is_none());
        assert!(page.render_in_full().contains("odd \u{E000}a\u{E001} text"));
    }

    #[test]
    fn countdowns() {
        assert_eq!(countdown_text(0), "0:00:00");
        assert_eq!(countdown_text(3725), "1:02:05");
        assert_eq!(countdown_text(90_061), "1 d 1:01:01");
    }
}

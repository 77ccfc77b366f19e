//! The visitor pages' words in each supported language, and the choice of language:
//! the room's `branding.language` if set, else the best `Accept-Language` match, else English.
//! Durations are phrased here too, so the server and the page script say the same thing
//! (the script gets the patterns in its config).

use axum::http::{header, HeaderMap};
use serde::Serialize;

/// Every phrase a built-in page uses. `{n}` in the duration patterns is replaced by a number.
#[derive(Debug, Serialize)]
pub struct Strings {
    pub lang: &'static str,
    pub in_queue: &'static str,
    pub keep_open: &'static str,
    pub ahead: &'static str,
    pub eta: &'static str,
    pub eta_unknown: &'static str,
    pub ticket: &'static str,
    pub progress: &'static str,
    pub paused: &'static str,
    pub closed: &'static str,
    pub opens_at: &'static str,
    pub opens_in: &'static str,
    pub prequeue: &'static str,
    pub your_turn: &'static str,
    pub continue_link: &'static str,
    pub offline: &'static str,
    pub not_found_title: &'static str,
    pub not_found_text: &'static str,
    pub error_title: &'static str,
    pub error_text: &'static str,
    pub unavailable_title: &'static str,
    pub unavailable_text: &'static str,
    pub less_than_a_minute: &'static str,
    pub about_minute: &'static str,
    pub about_minutes: &'static str,
    pub about_hour: &'static str,
    pub about_hours: &'static str,
}

/// Every supported language, English (the default) first.
pub static LANGUAGES: [&Strings; 4] = [&EN, &DE, &FR, &ES];

pub static EN: Strings = Strings {
    lang: "en",
    in_queue: "You are in the queue",
    keep_open: "Please keep this page open. It updates by itself, and you keep your place even if you reload.",
    ahead: "People ahead of you",
    eta: "Estimated wait",
    eta_unknown: "unknown for now",
    ticket: "Your ticket",
    progress: "Your progress in the queue",
    paused: "The queue is paused for a moment. You keep your place.",
    closed: "This event has ended or is sold out. Thank you for your patience.",
    opens_at: "The queue opens at",
    opens_in: "Opens in",
    prequeue: "You already have a place. Everyone who arrives before the start is treated alike: places are drawn fairly when it opens.",
    your_turn: "It's your turn! Taking you to the site…",
    continue_link: "Continue",
    offline: "Connection lost, still trying. You keep your place.",
    not_found_title: "No such waiting room",
    not_found_text: "Check the link you followed.",
    error_title: "Something went wrong",
    error_text: "Please try again in a moment.",
    unavailable_title: "The site is not reachable right now",
    unavailable_text: "You keep your place. Please try again in a moment.",
    less_than_a_minute: "less than a minute",
    about_minute: "about 1 minute",
    about_minutes: "about {n} minutes",
    about_hour: "about 1 hour",
    about_hours: "about {n} hours",
};

pub static DE: Strings = Strings {
    lang: "de",
    in_queue: "Sie sind in der Warteschlange",
    keep_open: "Bitte lassen Sie diese Seite geöffnet. Sie aktualisiert sich selbst, und Ihr Platz bleibt Ihnen auch nach einem Neuladen erhalten.",
    ahead: "Personen vor Ihnen",
    eta: "Geschätzte Wartezeit",
    eta_unknown: "derzeit unbekannt",
    ticket: "Ihre Nummer",
    progress: "Ihr Fortschritt in der Warteschlange",
    paused: "Die Warteschlange ist kurz angehalten. Ihr Platz bleibt erhalten.",
    closed: "Diese Aktion ist beendet oder ausverkauft. Vielen Dank für Ihre Geduld.",
    opens_at: "Die Warteschlange öffnet am",
    opens_in: "Öffnet in",
    prequeue: "Sie haben bereits einen Platz. Alle, die vor dem Start ankommen, werden gleich behandelt: Die Plätze werden beim Start fair ausgelost.",
    your_turn: "Sie sind dran! Sie werden weitergeleitet …",
    continue_link: "Weiter",
    offline: "Verbindung unterbrochen, neuer Versuch läuft. Ihr Platz bleibt erhalten.",
    not_found_title: "Diesen Warteraum gibt es nicht",
    not_found_text: "Bitte prüfen Sie den Link.",
    error_title: "Etwas ist schiefgelaufen",
    error_text: "Bitte versuchen Sie es gleich noch einmal.",
    unavailable_title: "Die Seite ist gerade nicht erreichbar",
    unavailable_text: "Ihr Platz bleibt erhalten. Bitte versuchen Sie es gleich noch einmal.",
    less_than_a_minute: "weniger als eine Minute",
    about_minute: "etwa 1 Minute",
    about_minutes: "etwa {n} Minuten",
    about_hour: "etwa 1 Stunde",
    about_hours: "etwa {n} Stunden",
};

pub static FR: Strings = Strings {
    lang: "fr",
    in_queue: "Vous êtes dans la file d'attente",
    keep_open: "Gardez cette page ouverte. Elle se met à jour toute seule, et vous gardez votre place même si vous la rechargez.",
    ahead: "Personnes devant vous",
    eta: "Attente estimée",
    eta_unknown: "inconnue pour le moment",
    ticket: "Votre numéro",
    progress: "Votre progression dans la file",
    paused: "La file d'attente est en pause un instant. Vous gardez votre place.",
    closed: "Cet événement est terminé ou complet. Merci de votre patience.",
    opens_at: "La file d'attente ouvre le",
    opens_in: "Ouverture dans",
    prequeue: "Vous avez déjà une place. Toutes les personnes arrivées avant l'ouverture sont traitées de la même façon : les places sont tirées au sort à l'ouverture.",
    your_turn: "C'est votre tour ! Redirection vers le site…",
    continue_link: "Continuer",
    offline: "Connexion perdue, nouvelle tentative en cours. Vous gardez votre place.",
    not_found_title: "Cette file d'attente n'existe pas",
    not_found_text: "Vérifiez le lien que vous avez suivi.",
    error_title: "Une erreur est survenue",
    error_text: "Veuillez réessayer dans un instant.",
    unavailable_title: "Le site n'est pas joignable pour le moment",
    unavailable_text: "Vous gardez votre place. Veuillez réessayer dans un instant.",
    less_than_a_minute: "moins d'une minute",
    about_minute: "environ 1 minute",
    about_minutes: "environ {n} minutes",
    about_hour: "environ 1 heure",
    about_hours: "environ {n} heures",
};

pub static ES: Strings = Strings {
    lang: "es",
    in_queue: "Está en la cola",
    keep_open: "Mantenga esta página abierta. Se actualiza sola y conserva su lugar aunque la recargue.",
    ahead: "Personas delante de usted",
    eta: "Espera estimada",
    eta_unknown: "desconocida por ahora",
    ticket: "Su número",
    progress: "Su avance en la cola",
    paused: "La cola está en pausa un momento. Conserva su lugar.",
    closed: "Este evento ha terminado o está agotado. Gracias por su paciencia.",
    opens_at: "La cola abre el",
    opens_in: "Abre en",
    prequeue: "Ya tiene un lugar. Todas las personas que llegan antes del inicio reciben el mismo trato: los lugares se sortean al abrir.",
    your_turn: "¡Es su turno! Le llevamos al sitio…",
    continue_link: "Continuar",
    offline: "Conexión perdida, reintentando. Conserva su lugar.",
    not_found_title: "Esta sala de espera no existe",
    not_found_text: "Compruebe el enlace que ha seguido.",
    error_title: "Algo ha salido mal",
    error_text: "Inténtelo de nuevo en un momento.",
    unavailable_title: "El sitio no está disponible ahora",
    unavailable_text: "Conserva su lugar. Inténtelo de nuevo en un momento.",
    less_than_a_minute: "menos de un minuto",
    about_minute: "aproximadamente 1 minuto",
    about_minutes: "aproximadamente {n} minutos",
    about_hour: "aproximadamente 1 hora",
    about_hours: "aproximadamente {n} horas",
};

pub fn by_code(code: &str) -> Option<&'static Strings> {
    match code {
        "en" => Some(&EN),
        "de" => Some(&DE),
        "fr" => Some(&FR),
        "es" => Some(&ES),
        _ => None,
    }
}

/// The phrases the page script (`static/room.js`) writes itself; the rest are in the page
/// already. The script carries them for every language (`script_phrases`, cached with it), so a
/// page's config names only its language.
#[derive(Serialize)]
struct ScriptStrings {
    eta_unknown: &'static str,
    your_turn: &'static str,
    offline: &'static str,
    less_than_a_minute: &'static str,
    about_minute: &'static str,
    about_minutes: &'static str,
    about_hour: &'static str,
    about_hours: &'static str,
}

impl ScriptStrings {
    fn of(t: &'static Strings) -> Self {
        Self {
            eta_unknown: t.eta_unknown,
            your_turn: t.your_turn,
            offline: t.offline,
            less_than_a_minute: t.less_than_a_minute,
            about_minute: t.about_minute,
            about_minutes: t.about_minutes,
            about_hour: t.about_hour,
            about_hours: t.about_hours,
        }
    }
}

/// A language's strings pre-serialized: the script's share as JSON, and all of them as a
/// template value. Built once per language so a page render serializes nothing.
pub struct Prepared {
    pub json: Box<serde_json::value::RawValue>,
    pub value: minijinja::Value,
}

impl Strings {
    pub fn prepared(&'static self) -> &'static Prepared {
        static PREPARED: std::sync::OnceLock<Vec<(&'static str, Prepared)>> = std::sync::OnceLock::new();
        let all = PREPARED.get_or_init(|| {
            LANGUAGES
                .into_iter()
                .map(|t| {
                    let json = serde_json::value::to_raw_value(&ScriptStrings::of(t)).expect("static strings serialize");
                    (t.lang, Prepared { json, value: minijinja::Value::from_serialize(t) })
                })
                .collect()
        });
        all.iter().find(|(lang, _)| *lang == self.lang).map(|(_, p)| p).unwrap_or(&all[0].1)
    }
}

/// Every language's phrases for the page script, as one JSON object keyed by language: built
/// into the script (`web::assets`), which every waiting page loads once and caches.
pub fn script_phrases() -> String {
    let entries: Vec<String> = LANGUAGES.iter().map(|t| format!("\"{}\":{}", t.lang, t.prepared().json.get())).collect();
    format!("{{{}}}", entries.join(","))
}

/// Longest `Accept-Language` header considered; the rest is ignored (browsers send ~50 bytes).
const MAX_ACCEPT_LANGUAGE: usize = 512;

/// The room's forced language, else the highest-weighted supported `Accept-Language` entry,
/// else English.
pub fn choose(forced: Option<&str>, headers: &HeaderMap) -> &'static Strings {
    if let Some(s) = forced.and_then(by_code) {
        return s;
    }
    let Some(header) = headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()) else { return &EN };
    let header = header.get(..header.len().min(MAX_ACCEPT_LANGUAGE)).unwrap_or("");
    let mut best: Option<(f32, &'static Strings)> = None;
    for entry in header.split(',').take(32) {
        let mut parts = entry.split(';');
        let tag = parts.next().unwrap_or("").trim();
        let q = parts
            .find_map(|p| p.trim().strip_prefix("q=").and_then(|q| q.parse::<f32>().ok()))
            .unwrap_or(1.0);
        if let Some(s) = by_primary_subtag(tag.split('-').next().unwrap_or("")) {
            if q > 0.0 && best.is_none_or(|(bq, _)| q > bq) {
                best = Some((q, s));
            }
        }
    }
    best.map(|(_, s)| s).unwrap_or(&EN)
}

/// The strings for a language tag's primary subtag in any case (`EN`, `en`), without
/// allocating: asked for every entry of every new visitor's `Accept-Language`.
fn by_primary_subtag(subtag: &str) -> Option<&'static Strings> {
    let &[a, b] = subtag.as_bytes() else { return None };
    let lower = [a.to_ascii_lowercase(), b.to_ascii_lowercase()];
    by_code(std::str::from_utf8(&lower).ok()?)
}

/// "about 3 minutes", "less than a minute", "about 2 hours" in the page's language.
pub fn duration(t: &Strings, seconds: u64) -> String {
    match seconds {
        0..=59 => t.less_than_a_minute.to_string(),
        60..=5399 => match (seconds + 30) / 60 {
            1 => t.about_minute.to_string(),
            m => with_number(t.about_minutes, m),
        },
        _ => match (seconds + 1800) / 3600 {
            1 => t.about_hour.to_string(),
            h => with_number(t.about_hours, h),
        },
    }
}

/// `template` with its `{n}` replaced by `n` (every new visitor's page has one).
fn with_number(template: &str, n: u64) -> String {
    let mut digits = itoa::Buffer::new();
    let n = digits.format(n);
    // A byte scan: `split_once` with a string pattern first builds a substring searcher,
    // which costs more than scanning these twenty-odd bytes.
    let Some(at) = template.as_bytes().windows(3).position(|w| w == b"{n}") else { return template.to_string() };
    let (before, after) = (&template[..at], &template[at + 3..]);
    let mut out = String::with_capacity(before.len() + n.len() + after.len());
    for part in [before, n, after] {
        out.push_str(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(al: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_str(al).unwrap());
        h
    }

    /// Every phrase the page script reads from its config (`t.<name>`) is in the config, in
    /// every language, and nothing else is.
    #[test]
    fn the_script_gets_the_phrases_it_uses() {
        let script = include_str!("static/room.js");
        let mut used: Vec<&str> = script
            .match_indices("t.")
            .filter(|(at, _)| !script[..*at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .map(|(at, _)| {
                let name = &script[at + 2..];
                &name[..name.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(name.len())]
            })
            .filter(|name| !name.is_empty())
            .collect();
        used.sort_unstable();
        used.dedup();
        assert!(used.len() >= 8, "found {used:?}");
        for t in LANGUAGES {
            let json: serde_json::Map<String, serde_json::Value> = serde_json::from_str(t.prepared().json.get()).unwrap();
            let mut shipped: Vec<&str> = json.keys().map(String::as_str).collect();
            shipped.sort_unstable();
            assert_eq!(shipped, used, "{}", t.lang);
            assert!(json.values().all(|v| v.as_str().is_some_and(|s| !s.is_empty())), "{}", t.lang);
        }
    }

    #[test]
    fn accept_language() {
        assert_eq!(choose(None, &HeaderMap::new()).lang, "en");
        assert_eq!(choose(None, &with("de-DE,de;q=0.9,en;q=0.8")).lang, "de");
        assert_eq!(choose(None, &with("it,fr;q=0.5,en;q=0.4")).lang, "fr");
        assert_eq!(choose(None, &with("es;q=0.2, en;q=0.9")).lang, "en");
        assert_eq!(choose(None, &with("fr;q=0")).lang, "en");
        assert_eq!(choose(Some("es"), &with("de")).lang, "es");
        assert_eq!(choose(None, &with(&"x,".repeat(5000))).lang, "en");
        // Tags are case-insensitive (RFC 4647), and only the primary subtag picks the language.
        assert_eq!(choose(None, &with("DE-AT, EN;q=0.5")).lang, "de");
        assert_eq!(choose(None, &with("Fr-CA")).lang, "fr");
        assert_eq!(choose(None, &with("deu, e, esp;q=0.9")).lang, "en");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(&EN, 10), "less than a minute");
        assert_eq!(duration(&EN, 60), "about 1 minute");
        assert_eq!(duration(&DE, 600), "etwa 10 Minuten");
        assert_eq!(duration(&FR, 7200), "environ 2 heures");
    }
}

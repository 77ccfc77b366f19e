//! Per-room look of the visitor pages: logo, colours, title, text, language and an optional
//! custom template. Validated at the admin edge (colours `#rrggbb`, URLs http(s), bounded
//! lengths, supported languages, a template that compiles and renders in the sandbox) so pages
//! can use every field without further checks. Rendering lives in `web::pages`.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Longest logo URL accepted, in bytes (a URL, not a data: blob).
pub const MAX_URL_BYTES: usize = 2048;
/// Longest title, in characters (a heading, not a paragraph).
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest free text, in characters (a short paragraph under the heading).
pub const MAX_TEXT_CHARS: usize = 2000;
/// Largest custom template, in bytes: generous for a page, small enough to compile per room.
pub const MAX_TEMPLATE_BYTES: usize = 64 * 1024;

/// Languages the built-in pages are translated into.
pub const LANGUAGES: &[&str] = &["en", "de", "fr", "es"];

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Branding {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logo_url: Option<String>,
    /// Buttons, progress bar and links, `#rrggbb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_color: Option<String>,
    /// Page background, `#rrggbb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background_color: Option<String>,
    /// Heading shown instead of the room's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// A paragraph shown under the heading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Forces the page language (`en`, `de`, `fr`, `es`); otherwise `Accept-Language` decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// A custom page template (minijinja), set with `PUT /api/v1/rooms/{id}/template`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

fn is_colour(s: &str) -> bool {
    s.len() == 7 && s.starts_with('#') && s[1..].bytes().all(|b| b.is_ascii_hexdigit())
}

impl Branding {
    /// Checks every field; the error names it (`branding.primary_color: ...`).
    pub fn validate(&self) -> Result<(), ApiError> {
        if let Some(u) = &self.logo_url {
            let ok = u.len() <= MAX_URL_BYTES
                && url::Url::parse(u).is_ok_and(|p| matches!(p.scheme(), "http" | "https") && p.host().is_some());
            if !ok {
                return Err(ApiError::invalid_field("branding.logo_url", format!("must be an absolute http(s) URL of at most {MAX_URL_BYTES} bytes")));
            }
        }
        for (field, value) in [("branding.primary_color", &self.primary_color), ("branding.background_color", &self.background_color)] {
            if value.as_deref().is_some_and(|c| !is_colour(c)) {
                return Err(ApiError::invalid_field(field, "must be a colour like #1a2b3c"));
            }
        }
        if self.title.as_deref().is_some_and(|t| t.trim().is_empty() || t.chars().count() > MAX_TITLE_CHARS) {
            return Err(ApiError::invalid_field("branding.title", format!("must be 1-{MAX_TITLE_CHARS} characters")));
        }
        if self.text.as_deref().is_some_and(|t| t.chars().count() > MAX_TEXT_CHARS) {
            return Err(ApiError::invalid_field("branding.text", format!("must be at most {MAX_TEXT_CHARS} characters")));
        }
        if self.language.as_deref().is_some_and(|l| !LANGUAGES.contains(&l)) {
            return Err(ApiError::invalid_field("branding.language", format!("must be one of {}", LANGUAGES.join(", "))));
        }
        if let Some(t) = &self.template {
            validate_template(t)?;
        }
        Ok(())
    }

    /// Applies a PATCH: the new branding replaces the old one, except that a custom template
    /// is kept unless the patch names one (it is managed through its own endpoint).
    pub fn patched(&self, next: Branding) -> Branding {
        Branding { template: next.template.or_else(|| self.template.clone()), ..next }
    }
}

/// Size limit, then compile and trial-render in the sandbox (`web::pages::check_custom`).
pub fn validate_template(source: &str) -> Result<(), ApiError> {
    if source.len() > MAX_TEMPLATE_BYTES {
        return Err(ApiError::payload_too_large(format!("template: larger than {MAX_TEMPLATE_BYTES} bytes")));
    }
    crate::web::pages::check_custom(source).map_err(|message| ApiError::invalid_field("template", message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        assert!(Branding::default().validate().is_ok());
        let ok = Branding {
            logo_url: Some("https://cdn.example/logo.svg".into()),
            primary_color: Some("#0A7cff".into()),
            background_color: Some("#ffffff".into()),
            title: Some("Big sale".into()),
            text: Some("Hold tight".into()),
            language: Some("de".into()),
            template: None,
        };
        assert!(ok.validate().is_ok());
        let cases = [
            (Branding { logo_url: Some("javascript:alert(1)".into()), ..ok.clone() }, "branding.logo_url"),
            (Branding { logo_url: Some(format!("https://x/{}", "a".repeat(3000))), ..ok.clone() }, "branding.logo_url"),
            (Branding { primary_color: Some("red".into()), ..ok.clone() }, "branding.primary_color"),
            (Branding { background_color: Some("#12345g".into()), ..ok.clone() }, "branding.background_color"),
            (Branding { title: Some(" ".into()), ..ok.clone() }, "branding.title"),
            (Branding { text: Some("x".repeat(2001)), ..ok.clone() }, "branding.text"),
            (Branding { language: Some("xx".into()), ..ok.clone() }, "branding.language"),
        ];
        for (b, field) in cases {
            let e = b.validate().unwrap_err();
            assert!(e.message.starts_with(field), "{field}: {}", e.message);
        }
    }

    #[test]
    fn patch_keeps_template() {
        let old = Branding { template: Some("x".into()), title: Some("a".into()), ..Default::default() };
        let next = old.patched(Branding { title: Some("b".into()), ..Default::default() });
        assert_eq!(next.template.as_deref(), Some("x"));
        assert_eq!(next.title.as_deref(), Some("b"));
    }
}

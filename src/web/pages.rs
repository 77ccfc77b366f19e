//! Page rendering. Templates live in `templates/` and are compiled into the binary; the
//! environment is built once. Autoescaping is on for `.html`, so room names are safe.

use std::sync::OnceLock;

use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use minijinja::Environment;
use serde::Serialize;

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("waiting.html", include_str!("templates/waiting.html")),
    ("scheduled.html", include_str!("templates/scheduled.html")),
    ("paused.html", include_str!("templates/paused.html")),
    ("closed.html", include_str!("templates/closed.html")),
    ("error.html", include_str!("templates/error.html")),
    ("pow.html", include_str!("templates/pow.html")),
];

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        for (name, source) in TEMPLATES {
            env.add_template(name, source).expect("built-in templates are valid (checked by tests)");
        }
        env
    })
}

/// Renders `template` with `context`; a rendering failure degrades to a plain error page.
pub fn render(status: StatusCode, template: &str, context: impl Serialize) -> Response {
    let body = env()
        .get_template(template)
        .and_then(|t| t.render(context))
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, template, "page rendering failed");
            "<!doctype html><title>weir</title><p>Something went wrong. Please reload this page.</p>".to_string()
        });
    let mut response = (status, Html(body)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    response
}

pub fn error_page(status: StatusCode, title: &str, message: &str) -> Response {
    render(status, "error.html", minijinja::context! { title, message })
}

#[cfg(test)]
mod tests {
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
}

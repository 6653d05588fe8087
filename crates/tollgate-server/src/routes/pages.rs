//! The HTML pages behind the links in emails, so that clicking one works without a
//! product frontend: confirm an email address, choose a new password. They call the
//! same identity flows as the JSON API. (The full account portal is a later issue.)

use axum::Form;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Html;
use serde::Deserialize;
use tollgate_core::identity::flows::FieldError;
use tollgate_core::identity::{IdentityError, Locale};
use utoipa::IntoParams;

use crate::extract::Origin;
use crate::state::AppState;

#[derive(Deserialize, IntoParams)]
pub struct TokenQuery {
    /// The token from the emailed link.
    pub token: Option<String>,
}

fn locale(headers: &HeaderMap) -> Locale {
    headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()).and_then(Locale::negotiate).unwrap_or_default()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn page(locale: Locale, title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"{lang}\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"referrer\" content=\"no-referrer\"><title>{title}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem;\
         color:#1f2328;background:#fff}}@media(prefers-color-scheme:dark){{body{{color:#e6edf3;background:#0d1117}}}}\
         input,button{{font:inherit;padding:.5rem;width:100%;box-sizing:border-box;margin:.25rem 0}}\
         .error{{color:#cf222e}}</style></head><body><h1>{title}</h1>{body}</body></html>",
        lang = locale.as_str(),
        title = escape(title),
    ))
}

fn invalid_link(locale: Locale) -> (StatusCode, Html<String>) {
    let (title, text) = match locale {
        Locale::En => ("Link not valid", "This link is invalid, already used or expired. Ask for a new one."),
        Locale::Fr => ("Lien non valide", "Ce lien est invalide, déjà utilisé ou expiré. Demandez-en un nouveau."),
    };
    (StatusCode::BAD_REQUEST, page(locale, title, &format!("<p>{text}</p>")))
}

/// Confirms an email address from the emailed link (a new account's address, or the
/// new address of an email change).
#[utoipa::path(get, path = "/verify-email", tag = "pages", params(TokenQuery),
    responses(
        (status = 200, description = "HTML: address confirmed", content_type = "text/html", body = String),
        (status = 400, description = "HTML: invalid, used or expired link", content_type = "text/html", body = String),
    ))]
pub async fn verify_email(
    State(state): State<AppState>,
    Origin(origin): Origin,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> (StatusCode, Html<String>) {
    let locale = locale(&headers);
    let Some(token) = query.token else { return invalid_link(locale) };
    match state.identity.verify_email(&token, &origin).await {
        Ok(user) => {
            let (title, text) = match locale {
                Locale::En => ("Email confirmed", "is confirmed. You can close this page and sign in."),
                Locale::Fr => ("Adresse confirmée", "est confirmée. Vous pouvez fermer cette page et vous connecter."),
            };
            (
                StatusCode::OK,
                page(locale, title, &format!("<p><strong>{}</strong> {text}</p>", escape(user.email.as_str()))),
            )
        }
        Err(IdentityError::EmailTaken) => {
            let text = match locale {
                Locale::En => "That address is now used by another account.",
                Locale::Fr => "Cette adresse est désormais utilisée par un autre compte.",
            };
            (StatusCode::CONFLICT, page(locale, "Email", &format!("<p class=\"error\">{text}</p>")))
        }
        Err(IdentityError::InvalidToken) => invalid_link(locale),
        Err(e) => {
            tracing::error!(error = %e, "email verification page failed");
            (StatusCode::INTERNAL_SERVER_ERROR, page(locale, "Error", "<p class=\"error\">Something went wrong.</p>"))
        }
    }
}

fn reset_form(locale: Locale, token: &str, error: Option<&str>) -> Html<String> {
    let (title, label, button) = match locale {
        Locale::En => ("Choose a new password", "New password (8 to 128 characters)", "Set password"),
        Locale::Fr => {
            ("Choisissez un nouveau mot de passe", "Nouveau mot de passe (8 à 128 caractères)", "Enregistrer")
        }
    };
    let error = error.map(|e| format!("<p class=\"error\">{}</p>", escape(e))).unwrap_or_default();
    page(
        locale,
        title,
        &format!(
            "{error}<form method=\"post\" action=\"/reset-password\">\
             <input type=\"hidden\" name=\"token\" value=\"{token}\">\
             <label>{label}<input type=\"password\" name=\"password\" minlength=\"8\" maxlength=\"128\" required \
             autocomplete=\"new-password\" autofocus></label><button type=\"submit\">{button}</button></form>",
            token = escape(token),
        ),
    )
}

/// The form behind a password-reset link. It does not use the token; submitting does.
#[utoipa::path(get, path = "/reset-password", tag = "pages", params(TokenQuery),
    responses((status = 200, description = "HTML form for the new password", content_type = "text/html", body = String)))]
pub async fn reset_password_form(headers: HeaderMap, Query(query): Query<TokenQuery>) -> (StatusCode, Html<String>) {
    let locale = locale(&headers);
    match query.token {
        Some(token) => (StatusCode::OK, reset_form(locale, &token, None)),
        None => invalid_link(locale),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct ResetForm {
    pub token: String,
    pub password: String,
}

/// Sets the new password (the emailed token authorises the change, so a cross-site
/// post cannot forge one).
#[utoipa::path(post, path = "/reset-password", tag = "pages",
    request_body(content = ResetForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "HTML: password changed", content_type = "text/html", body = String),
        (status = 400, description = "HTML: invalid link", content_type = "text/html", body = String),
        (status = 422, description = "HTML: the form again with the policy error", content_type = "text/html", body = String),
    ))]
pub async fn reset_password(
    State(state): State<AppState>,
    Origin(origin): Origin,
    headers: HeaderMap,
    Form(form): Form<ResetForm>,
) -> (StatusCode, Html<String>) {
    let locale = locale(&headers);
    match state.identity.reset_password(&form.token, &form.password, &origin).await {
        Ok(_) => {
            let (title, text) = match locale {
                Locale::En => {
                    ("Password changed", "Your password is changed and every session was signed out. Sign in again.")
                }
                Locale::Fr => {
                    ("Mot de passe modifié", "Votre mot de passe est modifié et toutes les sessions sont fermées.")
                }
            };
            (StatusCode::OK, page(locale, title, &format!("<p>{text}</p>")))
        }
        Err(IdentityError::Invalid(errors)) => {
            let message = errors.first().map(|e: &FieldError| e.message.clone()).unwrap_or_default();
            (StatusCode::UNPROCESSABLE_ENTITY, reset_form(locale, &form.token, Some(&message)))
        }
        Err(IdentityError::InvalidToken) => invalid_link(locale),
        Err(e) => {
            tracing::error!(error = %e, "password reset page failed");
            (StatusCode::INTERNAL_SERVER_ERROR, page(locale, "Error", "<p class=\"error\">Something went wrong.</p>"))
        }
    }
}

//! Transactional email: the templates (English and French) and the outbox record.
//! Emails are written to the outbox in the same transaction as the token they carry;
//! a background sender delivers them (see the server's `mailer`).

use crate::Timestamp;
use crate::identity::{EmailAddress, Locale};
use crate::ids::EmailId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmailTemplate {
    VerifyEmail,
    PasswordReset,
    MagicLink,
    ChangeEmail,
    /// A subscription payment failed; the link leads to where it can be fixed.
    PaymentFailed,
}

impl EmailTemplate {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VerifyEmail => "verify_email",
            Self::PasswordReset => "password_reset",
            Self::MagicLink => "magic_link",
            Self::ChangeEmail => "change_email",
            Self::PaymentFailed => "payment_failed",
        }
    }
}

/// An email to put in the outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEmail {
    pub id: EmailId,
    pub to: EmailAddress,
    pub template: &'static str,
    pub subject: String,
    pub text_body: String,
    pub html_body: String,
    pub created_at: Timestamp,
}

/// An email claimed from the outbox for delivery.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEmail {
    pub id: EmailId,
    pub to: EmailAddress,
    pub template: String,
    pub subject: String,
    pub text_body: String,
    pub html_body: String,
    /// Delivery attempts before this one.
    pub attempts: i32,
    pub created_at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmailStatus {
    Pending,
    Sent,
    /// Written to the log instead of sent (no SMTP configured).
    Logged,
    /// Gave up after the last retry.
    Failed,
}

crate::identity::str_enum!(EmailStatus { Pending => "pending", Sent => "sent", Logged => "logged", Failed => "failed" });

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Renders `template` for `locale` around `link`. The link is the only dynamic part,
/// so there is nothing user-controlled to escape except the link itself.
pub fn render(template: EmailTemplate, locale: Locale, link: &str, to: EmailAddress, now: Timestamp) -> NewEmail {
    let (subject, intro, action, outro) = match (template, locale) {
        (EmailTemplate::VerifyEmail, Locale::En) => (
            "Confirm your email address",
            "Welcome! Please confirm your email address.",
            "Confirm email",
            "This link expires in 24 hours. If you did not sign up, ignore this email.",
        ),
        (EmailTemplate::VerifyEmail, Locale::Fr) => (
            "Confirmez votre adresse e-mail",
            "Bienvenue ! Merci de confirmer votre adresse e-mail.",
            "Confirmer l'adresse",
            "Ce lien expire dans 24 heures. Si vous ne vous êtes pas inscrit, ignorez cet e-mail.",
        ),
        (EmailTemplate::PasswordReset, Locale::En) => (
            "Reset your password",
            "Someone asked to reset the password of your account.",
            "Choose a new password",
            "This link expires in 1 hour and works once. If it was not you, ignore this email.",
        ),
        (EmailTemplate::PasswordReset, Locale::Fr) => (
            "Réinitialisez votre mot de passe",
            "Une réinitialisation du mot de passe de votre compte a été demandée.",
            "Choisir un nouveau mot de passe",
            "Ce lien expire dans 1 heure et ne sert qu'une fois. Si ce n'était pas vous, ignorez cet e-mail.",
        ),
        (EmailTemplate::MagicLink, Locale::En) => (
            "Your sign-in link",
            "Use this link to sign in.",
            "Sign in",
            "This link expires in 15 minutes and works once. If you did not ask for it, ignore this email.",
        ),
        (EmailTemplate::MagicLink, Locale::Fr) => (
            "Votre lien de connexion",
            "Utilisez ce lien pour vous connecter.",
            "Se connecter",
            "Ce lien expire dans 15 minutes et ne sert qu'une fois. Si vous ne l'avez pas demandé, ignorez cet e-mail.",
        ),
        (EmailTemplate::ChangeEmail, Locale::En) => (
            "Confirm your new email address",
            "Please confirm that this is your new email address.",
            "Confirm new address",
            "Your address changes only once you confirm. This link expires in 24 hours.",
        ),
        (EmailTemplate::ChangeEmail, Locale::Fr) => (
            "Confirmez votre nouvelle adresse e-mail",
            "Merci de confirmer qu'il s'agit bien de votre nouvelle adresse e-mail.",
            "Confirmer la nouvelle adresse",
            "Votre adresse ne change qu'après confirmation. Ce lien expire dans 24 heures.",
        ),
        (EmailTemplate::PaymentFailed, Locale::En) => (
            "Your payment failed",
            "We could not take the payment for your subscription. Your plan stays active while we retry.",
            "Update your payment method",
            "If the payment keeps failing, your subscription will be canceled.",
        ),
        (EmailTemplate::PaymentFailed, Locale::Fr) => (
            "Votre paiement a échoué",
            "Le paiement de votre abonnement n'a pas pu être effectué. Votre offre reste active pendant les nouvelles tentatives.",
            "Mettre à jour votre moyen de paiement",
            "Si le paiement échoue encore, votre abonnement sera résilié.",
        ),
    };
    let text_body = format!("{intro}\n\n{action}: {link}\n\n{outro}\n");
    let link_html = escape_html(link);
    let html_body = format!(
        "<!doctype html><html lang=\"{lang}\"><body style=\"font-family:sans-serif\">\
         <p>{intro}</p><p><a href=\"{link_html}\">{action}</a></p>\
         <p style=\"color:#666\">{outro}</p></body></html>",
        lang = locale.as_str(),
        intro = escape_html(intro),
        action = escape_html(action),
        outro = escape_html(outro),
    );
    NewEmail {
        id: EmailId::new(),
        to,
        template: template.as_str(),
        subject: subject.to_owned(),
        text_body,
        html_body,
        created_at: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_locales_with_link() {
        let to = EmailAddress::parse("ada@example.com").unwrap();
        let now = time::OffsetDateTime::UNIX_EPOCH;
        for template in [
            EmailTemplate::VerifyEmail,
            EmailTemplate::PasswordReset,
            EmailTemplate::MagicLink,
            EmailTemplate::ChangeEmail,
            EmailTemplate::PaymentFailed,
        ] {
            let en = render(template, Locale::En, "https://x.test/a?token=t&x=1", to.clone(), now);
            let fr = render(template, Locale::Fr, "https://x.test/a?token=t&x=1", to.clone(), now);
            assert_ne!(en.subject, fr.subject);
            assert!(en.text_body.contains("https://x.test/a?token=t&x=1"));
            assert!(fr.html_body.contains("https://x.test/a?token=t&amp;x=1"));
        }
    }
}

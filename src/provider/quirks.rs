//! Provider quirks: the small ways real IdPs differ from RFC 6749, as data plus hooks.
//!
//! A [`Quirks`] value sits in an [`OAuth2Config`](super::OAuth2Config) and is consulted at four
//! points: the authorization parameters, the scopes sent, the parsed token answer, and error
//! classification. Every hook has a neutral default, so a quirk set overrides only what its
//! provider does differently. The presets ([`GoogleQuirks`], [`MicrosoftQuirks`],
//! [`GitHubQuirks`]) are what [`OidcConfig::google`](super::OidcConfig::google),
//! [`OidcConfig::microsoft`](super::OidcConfig::microsoft) and
//! [`OAuth2Config::github`](super::OAuth2Config::github) use; a host can write its own for
//! another provider.

use std::fmt::Debug;

use super::{AuthorizationRequest, ProviderError};
use crate::ids::Scopes;
use crate::token::ProviderTokens;

/// Hooks for a provider's deviations from plain OAuth 2.0.
///
/// ```
/// use tokenbroker::provider::{AuthorizationRequest, Quirks};
///
/// /// A provider that wants `audience` on every login.
/// #[derive(Debug)]
/// struct Auth0Like;
///
/// impl Quirks for Auth0Like {
///     fn authorize_params(&self, _: &AuthorizationRequest, params: &mut Vec<(String, String)>) {
///         params.push(("audience".into(), "https://api.example".into()));
///     }
/// }
/// ```
pub trait Quirks: Debug + Send + Sync + 'static {
    /// Adds authorization parameters for one login (after the configured ones, before the
    /// host's extras). `request.has_refresh_token` tells whether a refresh token is held.
    fn authorize_params(&self, request: &AuthorizationRequest, params: &mut Vec<(String, String)>) {
        let _ = (request, params);
    }

    /// The scopes to send, given the scopes asked for (login and refresh alike).
    fn requested_scopes(&self, scopes: Scopes) -> Scopes {
        scopes
    }

    /// Adjusts a parsed token answer (e.g. maps a provider's long scope names to the names
    /// that were asked for). `requested` is what was sent, when known.
    fn fix_tokens(&self, tokens: &mut ProviderTokens, requested: Option<&Scopes>) {
        let _ = (tokens, requested);
    }

    /// Re-classifies an error the generic reader produced.
    fn classify_error(&self, error: ProviderError) -> ProviderError {
        error
    }
}

/// The standards as written: RFC 6749, and OpenID Connect Core §11 offline access — when
/// `offline_access` is asked for and no refresh token is held, add `prompt=consent`
/// (providers issue offline grants only after explicit consent). Nothing else changes.
#[derive(Debug, Clone, Copy, Default)]
pub struct StandardQuirks;

impl Quirks for StandardQuirks {
    fn authorize_params(&self, request: &AuthorizationRequest, params: &mut Vec<(String, String)>) {
        if request.scopes.contains("offline_access") && !request.has_refresh_token {
            set_param(params, "prompt", "consent");
        }
    }
}

/// Google: `access_type=offline`, `include_granted_scopes=true`, and `prompt=consent` exactly
/// when no refresh token is held (Google issues a refresh token only on the consent screen,
/// and asking for consent on every login annoys users and piles up grants).
///
/// Google answers with long scope URLs (`https://www.googleapis.com/auth/userinfo.email`) for
/// the short names `email` and `profile`; [`fix_tokens`](Quirks::fix_tokens) adds the short
/// names back so that the granted set contains what was asked for. Refresh answers carry no new
/// refresh token; the broker keeps the old one.
#[derive(Debug, Clone, Copy, Default)]
pub struct GoogleQuirks;

const GOOGLE_SCOPE_ALIASES: &[(&str, &str)] = &[
    ("email", "https://www.googleapis.com/auth/userinfo.email"),
    (
        "profile",
        "https://www.googleapis.com/auth/userinfo.profile",
    ),
];

impl Quirks for GoogleQuirks {
    fn authorize_params(&self, request: &AuthorizationRequest, params: &mut Vec<(String, String)>) {
        set_param(params, "access_type", "offline");
        set_param(params, "include_granted_scopes", "true");
        if !request.has_refresh_token {
            set_param(params, "prompt", "consent");
        }
    }

    fn fix_tokens(&self, tokens: &mut ProviderTokens, _requested: Option<&Scopes>) {
        if let Some(scopes) = &mut tokens.scopes {
            for (short, long) in GOOGLE_SCOPE_ALIASES {
                if scopes.contains(long) {
                    scopes.insert(*short);
                }
            }
        }
    }
}

/// Microsoft identity platform v2: `offline_access` is always requested (without it there is
/// no refresh token); granted scopes come back as resource URLs
/// (`https://graph.microsoft.com/User.Read`) and without `offline_access`, so the names asked
/// for are added back; `interaction_required`, `consent_required` and `login_required` mean
/// the user must sign in again, like `invalid_grant`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MicrosoftQuirks;

impl Quirks for MicrosoftQuirks {
    fn requested_scopes(&self, mut scopes: Scopes) -> Scopes {
        scopes.insert("offline_access");
        scopes
    }

    fn fix_tokens(&self, tokens: &mut ProviderTokens, requested: Option<&Scopes>) {
        let (Some(granted), Some(requested)) = (&mut tokens.scopes, requested) else {
            return;
        };
        for scope in requested.iter() {
            let echoed = granted.contains(scope)
                || granted
                    .iter()
                    .any(|g| g.rsplit_once('/').is_some_and(|(_, name)| name == scope));
            // `offline_access` is never echoed; a refresh token in the answer is the proof.
            let offline = scope == "offline_access" && tokens.refresh_token.is_some();
            if echoed || offline {
                granted.insert(scope);
            }
        }
    }

    fn classify_error(&self, error: ProviderError) -> ProviderError {
        match error {
            ProviderError::Rejected {
                error, description, ..
            } if matches!(
                error.as_str(),
                "interaction_required" | "consent_required" | "login_required"
            ) =>
            {
                ProviderError::InvalidGrant {
                    description: Some(match description {
                        Some(d) => format!("{error}: {d}"),
                        None => error,
                    }),
                }
            }
            other => other,
        }
    }
}

/// GitHub (plain OAuth 2.0): errors arrive with HTTP 200 and an `error` field (the generic
/// reader already treats any `error` field as an error), scopes are comma-separated (also
/// handled generically), classic OAuth-app tokens have no `expires_in` and never expire (the
/// token set then has no expiry), and GitHub App user tokens expire after 8 hours with
/// strictly single-use refresh tokens. `bad_refresh_token` and `bad_verification_code` mean
/// the grant is gone; `incorrect_client_credentials` is a configuration error.
#[derive(Debug, Clone, Copy, Default)]
pub struct GitHubQuirks;

impl Quirks for GitHubQuirks {
    fn classify_error(&self, error: ProviderError) -> ProviderError {
        match error {
            // GitHub says the app's registration does not match the request.
            ProviderError::Rejected {
                error, description, ..
            } if error == "redirect_uri_mismatch" || error == "unsupported_grant_type" => {
                ProviderError::Config {
                    reason: format!(
                        "GitHub rejected the client configuration: {error}{}",
                        description.map(|d| format!(" ({d})")).unwrap_or_default()
                    ),
                }
            }
            other => other,
        }
    }
}

/// Sets a parameter, replacing an earlier value of the same name (so a quirk never sends a
/// parameter twice, which strict servers reject).
pub(crate) fn set_param(params: &mut Vec<(String, String)>, name: &str, value: &str) {
    params.retain(|(n, _)| n != name);
    params.push((name.to_owned(), value.to_owned()));
}

//! The provider presets and their quirks, on answers recorded from (or shaped exactly like)
//! each provider's real responses. A closure stands in for the network and records requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenbroker::http::{HttpClient, HttpError, HttpRequest, HttpResponse};
use tokenbroker::provider::{
    AuthorizationRequest, CodeExchange, IssuerPolicy, OAuth2Config, OAuth2Provider, OidcConfig,
    Provider, ProviderError, RefreshTokenReuse, TokenKind,
};
use tokenbroker::{ProviderId, Scopes, Secret, TokenSet};

type Seen = Arc<Mutex<Vec<HttpRequest>>>;

fn canned(status: u16, body: &'static str) -> (Arc<dyn HttpClient>, Seen) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let client = move |req: HttpRequest| {
        // GitHub's `/user`, which the preset asks after a login: a fixed account.
        let account = req.uri().path() == "/user";
        log.lock().unwrap().push(req);
        async move {
            let (status, body) = if account {
                (200, r#"{"id":583231,"login":"octocat"}"#)
            } else {
                (status, body)
            };
            Ok::<HttpResponse, HttpError>(
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json; charset=utf-8")
                    .body(body.as_bytes().to_vec())
                    .unwrap(),
            )
        }
    };
    (Arc::new(client), seen)
}

fn redirect() -> url::Url {
    "https://app.example/callback".parse().unwrap()
}

fn google() -> OidcConfig {
    OidcConfig::google(
        ProviderId::new("google").unwrap(),
        "1234.apps.googleusercontent.com",
        Secret::new("GOCSPX-secret"),
        redirect(),
    )
}

fn microsoft(tenant: &str) -> OidcConfig {
    OidcConfig::microsoft(
        ProviderId::new("microsoft").unwrap(),
        tenant,
        "00000000-0000-0000-0000-00000000c11e",
        Secret::new("ms~secret"),
        redirect(),
    )
    .with_scopes_added("User.Read")
}

fn github() -> OAuth2Config {
    OAuth2Config::github(
        ProviderId::new("github").unwrap(),
        "Iv1.0123456789abcdef",
        Secret::new("gh-secret"),
        redirect(),
    )
    .with_scopes(Scopes::parse("read:user repo"))
}

trait AddScopes {
    fn with_scopes_added(self, scopes: &str) -> Self;
}

impl AddScopes for OidcConfig {
    fn with_scopes_added(mut self, scopes: &str) -> Self {
        self.oauth2.scopes = self.oauth2.scopes.union(&Scopes::parse(scopes));
        self
    }
}

fn request(scopes: Scopes, has_refresh_token: bool) -> AuthorizationRequest {
    let mut r = AuthorizationRequest::new(
        Secret::new("state-1"),
        "challenge-1".into(),
        Secret::new("nonce-1"),
        scopes,
    );
    r.has_refresh_token = has_refresh_token;
    r
}

fn query(url: &url::Url) -> HashMap<String, String> {
    url.query_pairs().into_owned().collect()
}

fn form(req: &HttpRequest) -> HashMap<String, String> {
    url::form_urlencoded::parse(req.body())
        .into_owned()
        .collect()
}

fn plain(config: &OAuth2Config, http: Arc<dyn HttpClient>) -> OAuth2Provider {
    OAuth2Provider::new(config.clone(), http)
}

async fn refresh(provider: &OAuth2Provider) -> Result<tokenbroker::ProviderTokens, ProviderError> {
    provider.refresh(&Secret::new("rt-old"), None).await
}

// ---------------------------------------------------------------------------------------------
// Google
// ---------------------------------------------------------------------------------------------

#[test]
fn google_asks_for_consent_only_while_no_refresh_token_is_held() {
    let (http, _) = canned(200, "{}");
    let config = google();
    let p = plain(&config.oauth2, http);
    let first = query(
        &p.authorization_url(&request(config.oauth2.scopes.clone(), false))
            .unwrap(),
    );
    assert_eq!(first["access_type"], "offline");
    assert_eq!(first["include_granted_scopes"], "true");
    assert_eq!(first["prompt"], "consent");
    assert_eq!(first["code_challenge_method"], "S256");
    assert_eq!(first["nonce"], "nonce-1");
    assert_eq!(
        Scopes::parse(&first["scope"]),
        Scopes::parse("openid email profile")
    );

    let again = query(
        &p.authorization_url(&request(config.oauth2.scopes.clone(), true))
            .unwrap(),
    );
    assert_eq!(again["access_type"], "offline");
    assert!(
        !again.contains_key("prompt"),
        "no consent screen on every login"
    );
}

#[test]
fn the_hosts_own_prompt_wins_and_no_parameter_is_sent_twice() {
    let (http, _) = canned(200, "{}");
    let config = google();
    let p = plain(&config.oauth2, http);
    let mut r = request(config.oauth2.scopes.clone(), false);
    r.extra_params
        .push(("prompt".into(), "select_account consent".into()));
    let url = p.authorization_url(&r).unwrap();
    let prompts: Vec<_> = url.query_pairs().filter(|(k, _)| k == "prompt").collect();
    assert_eq!(prompts.len(), 1);
    assert_eq!(prompts[0].1, "select_account consent");
}

/// Recorded shape of Google's code-exchange answer: long scope URLs for `email`/`profile`.
const GOOGLE_CODE_ANSWER: &str = r#"{
  "access_token": "ya29.a0AfB_byC-recorded",
  "expires_in": 3599,
  "refresh_token": "1//0gRecordedRefresh",
  "scope": "https://www.googleapis.com/auth/userinfo.profile openid https://www.googleapis.com/auth/userinfo.email",
  "token_type": "Bearer",
  "id_token": "eyJhbGciOiJSUzI1NiJ9.e30.sig"
}"#;

#[tokio::test]
async fn google_long_scope_names_count_as_the_short_ones_asked_for() {
    let (http, seen) = canned(200, GOOGLE_CODE_ANSWER);
    let config = google();
    let p = plain(&config.oauth2, http);
    let mut exchange = CodeExchange::new(
        Secret::new("4/0Ab-code"),
        Secret::new("verifier"),
        Secret::new("nonce-1"),
    );
    exchange.requested_scopes = config.oauth2.scopes.clone();
    let tokens = p.exchange_code(&exchange).await.unwrap();
    let granted = tokens.scopes.clone().unwrap();
    assert!(config.oauth2.scopes.is_subset(&granted), "{granted}");
    assert_eq!(tokens.expires_in, Some(Duration::from_secs(3599)));
    // Google takes the client credentials in the body.
    let sent = form(&seen.lock().unwrap()[0]);
    assert_eq!(sent["client_id"], "1234.apps.googleusercontent.com");
    assert_eq!(sent["code_verifier"], "verifier");
}

#[tokio::test]
async fn google_refresh_answers_without_a_refresh_token_and_the_old_one_is_kept() {
    let (http, _) = canned(
        200,
        r#"{"access_token":"ya29.new","expires_in":3599,"scope":"openid https://www.googleapis.com/auth/userinfo.email","token_type":"Bearer"}"#,
    );
    let config = google();
    let p = plain(&config.oauth2, http);
    assert_eq!(p.refresh_token_reuse(), RefreshTokenReuse::Tolerated);
    let tokens = refresh(&p).await.unwrap();
    assert!(tokens.refresh_token.is_none());
    let now = time::OffsetDateTime::now_utc();
    let stored =
        TokenSet::new(Secret::new("ya29.old"), now).with_refresh_token(Secret::new("1//keep"));
    let merged = stored.merge(TokenSet::from_response(tokens, now, &Scopes::new()));
    assert_eq!(merged.refresh_token().unwrap().expose_secret(), "1//keep");
    assert_eq!(merged.access_token().expose_secret(), "ya29.new");
}

#[tokio::test]
async fn google_expired_or_revoked_is_relink_required() {
    let (http, _) = canned(
        400,
        r#"{"error": "invalid_grant", "error_description": "Token has been expired or revoked."}"#,
    );
    let p = plain(&google().oauth2, http);
    match refresh(&p).await {
        Err(ProviderError::InvalidGrant { description }) => {
            assert_eq!(
                description.as_deref(),
                Some("Token has been expired or revoked.")
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn google_revocation_goes_to_its_endpoint() {
    let (http, seen) = canned(200, "{}");
    let p = plain(&google().oauth2, http);
    p.revoke(&Secret::new("1//rt"), TokenKind::RefreshToken)
        .await
        .unwrap();
    let req = &seen.lock().unwrap()[0];
    assert_eq!(
        req.uri().to_string(),
        "https://oauth2.googleapis.com/revoke"
    );
    assert_eq!(form(req)["token"], "1//rt");
}

#[test]
fn google_accepts_both_issuer_spellings() {
    let policy = google().issuer;
    assert!(policy.check("https://accounts.google.com", None).is_ok());
    assert!(policy.check("accounts.google.com", None).is_ok());
    assert!(policy.check("https://evil.example", None).is_err());
}

// ---------------------------------------------------------------------------------------------
// Microsoft
// ---------------------------------------------------------------------------------------------

#[test]
fn microsoft_always_asks_for_offline_access_and_puts_the_tenant_in_the_url() {
    let (http, _) = canned(200, "{}");
    let config = microsoft("organizations");
    let p = plain(&config.oauth2, http);
    // Even a request that forgot offline_access gets it: without it there is no refresh token.
    let url = p
        .authorization_url(&request(Scopes::parse("openid User.Read"), false))
        .unwrap();
    assert_eq!(url.path(), "/organizations/oauth2/v2.0/authorize");
    let q = query(&url);
    assert!(Scopes::parse(&q["scope"]).contains("offline_access"));
    assert!(
        !q.contains_key("prompt"),
        "Microsoft needs no consent prompt for offline access"
    );
    assert_eq!(
        config.oauth2.token_endpoint.as_str(),
        "https://login.microsoftonline.com/organizations/oauth2/v2.0/token"
    );
}

/// Recorded shape of a Microsoft v2 refresh answer: resource-qualified scopes, no
/// `offline_access` echoed, `ext_expires_in`, a rotated refresh token.
const MICROSOFT_REFRESH_ANSWER: &str = r#"{
  "token_type": "Bearer",
  "scope": "https://graph.microsoft.com/User.Read profile openid email",
  "expires_in": 4763,
  "ext_expires_in": 4763,
  "access_token": "eyJ0eXAiOiJKV1QiLCJub25jZSI6recorded",
  "refresh_token": "0.AXoA-rotated",
  "id_token": "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.e30.sig"
}"#;

#[tokio::test]
async fn microsoft_rotates_keeps_ext_expires_in_and_maps_scope_names_back() {
    let (http, seen) = canned(200, MICROSOFT_REFRESH_ANSWER);
    let config = microsoft("common");
    let p = plain(&config.oauth2, http);
    assert_eq!(p.refresh_token_reuse(), RefreshTokenReuse::Tolerated);
    let asked = Scopes::parse("openid User.Read offline_access");
    let tokens = p
        .refresh(&Secret::new("0.AXoA-old"), Some(&asked))
        .await
        .unwrap();
    assert_eq!(
        tokens.refresh_token.as_ref().unwrap().expose_secret(),
        "0.AXoA-rotated"
    );
    assert_eq!(tokens.extras["ext_expires_in"], 4763);
    let granted = tokens.scopes.clone().unwrap();
    assert!(asked.is_subset(&granted), "{granted}");
    let sent = form(&seen.lock().unwrap()[0]);
    assert!(Scopes::parse(&sent["scope"]).contains("offline_access"));
    assert_eq!(sent["grant_type"], "refresh_token");
}

#[tokio::test]
async fn microsoft_expired_and_interaction_required_are_relink_required() {
    for body in [
        r#"{"error":"invalid_grant","error_description":"AADSTS70008: The provided authorization code or refresh token has expired due to inactivity.","error_codes":[70008],"timestamp":"2026-11-25 09:00:00Z","trace_id":"t","correlation_id":"c"}"#,
        r#"{"error":"interaction_required","error_description":"AADSTS50076: Due to a configuration change made by your administrator, you must use multi-factor authentication.","error_codes":[50076],"suberror":"basic_action"}"#,
        r#"{"error":"consent_required","error_description":"AADSTS65001: The user or administrator has not consented."}"#,
    ] {
        let (http, _) = canned(400, body);
        let p = plain(&microsoft("common").oauth2, http);
        assert!(
            matches!(refresh(&p).await, Err(ProviderError::InvalidGrant { .. })),
            "{body}"
        );
    }
}

#[tokio::test]
async fn microsoft_has_no_revocation_endpoint() {
    let (http, seen) = canned(200, "{}");
    let p = plain(&microsoft("common").oauth2, http);
    assert!(matches!(
        p.revoke(&Secret::new("rt"), TokenKind::RefreshToken).await,
        Err(ProviderError::Unsupported { .. })
    ));
    assert!(seen.lock().unwrap().is_empty(), "nothing was sent");
}

#[test]
fn microsoft_issuer_template_is_checked_against_the_tokens_tenant() {
    let tid = "9188040d-6c67-4c5b-b112-36a304b66dad";
    let common = microsoft("common").issuer;
    let iss = format!("https://login.microsoftonline.com/{tid}/v2.0");
    assert!(common.check(&iss, Some(tid)).is_ok());
    // A token whose `iss` names another tenant than its `tid` is forged or misrouted.
    assert!(
        common
            .check(&iss, Some("11111111-1111-1111-1111-111111111111"))
            .is_err()
    );
    assert!(common.check(&iss, None).is_err(), "no tid, no check");
    // A single-tenant app accepts only its tenant.
    let pinned = microsoft(tid).issuer;
    assert!(pinned.check(&iss, Some(tid)).is_ok());
    let other = "11111111-1111-1111-1111-111111111111";
    let other_iss = format!("https://login.microsoftonline.com/{other}/v2.0");
    assert!(pinned.check(&other_iss, Some(other)).is_err());
    assert!(matches!(
        pinned,
        IssuerPolicy::TenantTemplate {
            tenants: Some(_),
            ..
        }
    ));
}

// ---------------------------------------------------------------------------------------------
// GitHub
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn github_errors_with_status_200_are_classified() {
    for (body, expect) in [
        (
            r#"{"error":"bad_refresh_token","error_description":"The refresh token passed is incorrect or expired.","error_uri":"https://docs.github.com/apps/troubleshooting"}"#,
            "invalid_grant",
        ),
        (
            r#"{"error":"bad_verification_code","error_description":"The code passed is incorrect or expired."}"#,
            "invalid_grant",
        ),
        (
            r#"{"error":"incorrect_client_credentials","error_description":"The client_id and/or client_secret passed are incorrect."}"#,
            "invalid_client",
        ),
        (
            r#"{"error":"redirect_uri_mismatch","error_description":"The redirect_uri MUST match the registered callback URL for this application."}"#,
            "config",
        ),
    ] {
        let (http, _) = canned(200, body);
        let p = plain(&github(), http);
        let err = refresh(&p).await.unwrap_err();
        let kind = match err {
            ProviderError::InvalidGrant { .. } => "invalid_grant",
            ProviderError::InvalidClient { .. } => "invalid_client",
            ProviderError::Config { .. } => "config",
            ref other => panic!("{body}: {other:?}"),
        };
        assert_eq!(kind, expect, "{body}");
    }
}

#[tokio::test]
async fn github_classic_tokens_never_expire_and_scopes_are_comma_separated() {
    let (http, seen) = canned(
        200,
        r#"{"access_token":"gho_16C7e42F292c6912E7710c838347Ae178B4a","token_type":"bearer","scope":"repo,gist"}"#,
    );
    let p = plain(&github(), http);
    let exchange = CodeExchange::new(Secret::new("code"), Secret::new("v"), Secret::new("n"));
    let tokens = p.exchange_code(&exchange).await.unwrap();
    assert_eq!(tokens.expires_in, None);
    // The account comes from `/user`: its numeric id, not the login a user can rename.
    let account = tokens.account.clone().expect("the preset asks /user");
    assert_eq!(account.subject, "583231");
    assert_eq!(account.issuer.as_deref(), Some("https://api.github.com"));
    let set = TokenSet::from_response(tokens, time::OffsetDateTime::now_utc(), &Scopes::new());
    assert_eq!(set.expires_at(), None, "no invented expiry");
    assert_eq!(set.token_type(), "Bearer");
    assert_eq!(set.scopes(), &Scopes::parse("gist repo"));
    let far_future = time::OffsetDateTime::now_utc() + Duration::from_secs(10 * 365 * 86_400);
    assert!(set.is_fresh(far_future, Duration::from_secs(60)));
    let req = &seen.lock().unwrap()[0];
    assert_eq!(req.headers()["accept"], "application/json");
    assert_eq!(
        req.uri().to_string(),
        "https://github.com/login/oauth/access_token"
    );
    assert_eq!(form(req)["client_secret"], "gh-secret");
}

#[tokio::test]
async fn github_app_user_tokens_expire_and_their_refresh_tokens_are_single_use() {
    let (http, _) = canned(
        200,
        r#"{"access_token":"ghu_recorded","expires_in":28800,"refresh_token":"ghr_recorded","refresh_token_expires_in":15811200,"scope":"","token_type":"bearer"}"#,
    );
    let p = plain(&github(), http);
    assert_eq!(p.refresh_token_reuse(), RefreshTokenReuse::Rejected);
    let tokens = refresh(&p).await.unwrap();
    assert_eq!(tokens.expires_in, Some(Duration::from_secs(8 * 3600)));
    assert_eq!(
        tokens.refresh_expires_in,
        Some(Duration::from_secs(15_811_200))
    );
    assert!(matches!(
        p.revoke(&Secret::new("ghr"), TokenKind::RefreshToken).await,
        Err(ProviderError::Unsupported { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Generic OpenID Connect
// ---------------------------------------------------------------------------------------------

#[test]
fn oidc_offline_access_asks_for_consent_only_without_a_refresh_token() {
    let (http, _) = canned(200, "{}");
    let config = OidcConfig::new(
        OAuth2Config::new(
            ProviderId::new("corp").unwrap(),
            "c",
            "https://idp.example/auth".parse().unwrap(),
            "https://idp.example/token".parse().unwrap(),
            redirect(),
        )
        .with_scopes(Scopes::parse("offline_access")),
        IssuerPolicy::Exact("https://idp.example".into()),
        "https://idp.example/jwks".parse().unwrap(),
    );
    assert!(config.oauth2.scopes.contains("openid"));
    let p = plain(&config.oauth2, http);
    let first = query(
        &p.authorization_url(&request(config.oauth2.scopes.clone(), false))
            .unwrap(),
    );
    assert_eq!(first["prompt"], "consent");
    assert!(first.contains_key("nonce"));
    let later = query(
        &p.authorization_url(&request(config.oauth2.scopes.clone(), true))
            .unwrap(),
    );
    assert!(!later.contains_key("prompt"));
    // Without offline_access there is nothing to consent to.
    let online = query(
        &p.authorization_url(&request(Scopes::parse("openid"), false))
            .unwrap(),
    );
    assert!(!online.contains_key("prompt"));
}

#[tokio::test]
async fn odd_answers_from_any_provider_are_read_or_refused_cleanly() {
    for (body, ok) in [
        (r#"{"access_token":"a","expires_in":"3600"}"#, true),
        (
            r#"{"access_token":"a","token_type":"BEARER","unknown":{"nested":[1,2]}}"#,
            true,
        ),
        (r#"{"access_token":"a","scope":["a","b"]}"#, true),
        (r#"{"access_token":"a","expires_in":-5}"#, false),
        (r#"{"access_token":"a","expires_in":"soon"}"#, false),
        (r#"{"token_type":"bearer"}"#, false),
        ("<html>Bad gateway</html>", false),
    ] {
        let (http, _) = canned(200, body);
        let p = plain(&github(), http);
        let result = refresh(&p).await;
        assert_eq!(result.is_ok(), ok, "{body}: {result:?}");
        if let Err(e) = result {
            assert!(matches!(e, ProviderError::Protocol { .. }), "{body}: {e:?}");
        }
    }
}

#[test]
fn presets_can_be_pointed_at_a_test_double() {
    let base: url::Url = "http://127.0.0.1:4444/".parse().unwrap();
    let config = microsoft("common").with_base_url(&base);
    assert_eq!(
        config.oauth2.token_endpoint.as_str(),
        "http://127.0.0.1:4444/common/oauth2/v2.0/token"
    );
    assert_eq!(
        config.jwks_uri.as_str(),
        "http://127.0.0.1:4444/common/discovery/v2.0/keys"
    );
}

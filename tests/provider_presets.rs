//! The provider presets and their quirks, on answers recorded from (or shaped exactly like)
//! each provider's real responses. A closure stands in for the network and records requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenbroker::http::{HttpClient, HttpError, HttpRequest, HttpResponse};
use tokenbroker::provider::{
    AccountEndpoint, AuthorizationRequest, ClientAuth, CodeExchange, IssuerPolicy,
    MicrosoftAuthority, OAuth2Config, OAuth2Provider, OidcConfig, Provider, ProviderError,
    RESERVED_AUTHORIZATION_PARAMS, RefreshTokenReuse, TokenKind,
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
    .with_additional_scopes(Scopes::parse("User.Read"))
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

// ---------------------------------------------------------------------------------------------
// Authorities and endpoint overrides
// ---------------------------------------------------------------------------------------------

fn microsoft_at(authority: MicrosoftAuthority, tenant: &str) -> Result<OidcConfig, ProviderError> {
    OidcConfig::microsoft_with_authority(
        ProviderId::new("microsoft").unwrap(),
        authority,
        tenant,
        "00000000-0000-0000-0000-00000000c11e",
        Secret::new("ms~secret"),
        redirect(),
    )
}

fn template(config: &OidcConfig) -> &str {
    match &config.issuer {
        IssuerPolicy::TenantTemplate { template, .. } => template,
        other => panic!("not a tenant template: {other:?}"),
    }
}

#[test]
fn microsoft_national_clouds_derive_every_endpoint_from_the_authority() {
    for (authority, host, issuer_host, graph) in [
        (
            MicrosoftAuthority::Public,
            "login.microsoftonline.com",
            "login.microsoftonline.com",
            Some("https://graph.microsoft.com/oidc/userinfo"),
        ),
        (
            MicrosoftAuthority::UsGovernment,
            "login.microsoftonline.us",
            "login.microsoftonline.us",
            Some("https://graph.microsoft.us/oidc/userinfo"),
        ),
        (
            MicrosoftAuthority::China,
            "login.chinacloudapi.cn",
            // 21Vianet's tokens name its alias host as issuer.
            "login.partner.microsoftonline.cn",
            Some("https://microsoftgraph.chinacloudapi.cn/oidc/userinfo"),
        ),
        (
            MicrosoftAuthority::Custom("https://contoso.ciamlogin.com".parse().unwrap()),
            "contoso.ciamlogin.com",
            "contoso.ciamlogin.com",
            None,
        ),
    ] {
        let config = microsoft_at(authority.clone(), "organizations").unwrap();
        let at = |path: &str| format!("https://{host}/organizations/{path}");
        assert_eq!(
            config.oauth2.authorization_endpoint.as_str(),
            at("oauth2/v2.0/authorize")
        );
        assert_eq!(
            config.oauth2.token_endpoint.as_str(),
            at("oauth2/v2.0/token")
        );
        assert_eq!(config.jwks_uri.as_str(), at("discovery/v2.0/keys"));
        assert_eq!(
            config.end_session_endpoint.as_ref().map(|u| u.as_str()),
            Some(at("oauth2/v2.0/logout").as_str())
        );
        assert_eq!(
            template(&config),
            format!("https://{issuer_host}/{{tenantid}}/v2.0")
        );
        assert_eq!(config.userinfo_endpoint.as_ref().map(|u| u.as_str()), graph);
        // The quirks come with every authority.
        assert_eq!(
            config.oauth2.refresh_token_reuse,
            RefreshTokenReuse::Tolerated
        );
        assert!(format!("{:?}", config.oauth2.quirks).contains("MicrosoftQuirks"));
        assert!(config.oauth2.revocation_endpoint.is_none());
        // The tenant's tokens pass the issuer check; another cloud's do not.
        let tid = "9188040d-6c67-4c5b-b112-36a304b66dad";
        let iss = format!("https://{issuer_host}/{tid}/v2.0");
        assert!(
            config.issuer.check(&iss, Some(tid)).is_ok(),
            "{authority:?}"
        );
        if issuer_host != "login.microsoftonline.com" {
            let public = format!("https://login.microsoftonline.com/{tid}/v2.0");
            assert!(
                config.issuer.check(&public, Some(tid)).is_err(),
                "{authority:?}"
            );
        }
    }
}

#[test]
fn the_public_cloud_preset_is_the_public_authority() {
    let short = microsoft("common");
    let long = microsoft_at(MicrosoftAuthority::default(), "common").unwrap();
    assert_eq!(short.oauth2.token_endpoint, long.oauth2.token_endpoint);
    assert_eq!(
        short.oauth2.authorization_endpoint,
        long.oauth2.authorization_endpoint
    );
    assert_eq!(short.jwks_uri, long.jwks_uri);
    assert_eq!(short.issuer, long.issuer);
    assert_eq!(short.userinfo_endpoint, long.userinfo_endpoint);
    assert_eq!(short.end_session_endpoint, long.end_session_endpoint);
}

#[test]
fn a_custom_authority_keeps_its_path_prefix_and_pins_a_tenant_id() {
    let tid = "9188040d-6c67-4c5b-b112-36a304b66dad";
    let proxy = MicrosoftAuthority::Custom("http://127.0.0.1:4444/entra/".parse().unwrap());
    let config = microsoft_at(proxy, tid).unwrap();
    assert_eq!(
        config.oauth2.token_endpoint.as_str(),
        format!("http://127.0.0.1:4444/entra/{tid}/oauth2/v2.0/token")
    );
    assert_eq!(
        config.issuer,
        IssuerPolicy::TenantTemplate {
            template: "http://127.0.0.1:4444/entra/{tenantid}/v2.0".into(),
            tenants: Some(vec![tid.into()]),
        }
    );
}

#[test]
fn a_bad_custom_authority_or_tenant_is_a_configuration_error() {
    let custom = |url: &str| MicrosoftAuthority::Custom(url.parse().unwrap());
    for authority in [
        custom("ftp://login.example"),
        custom("https://login.example/?tenant=x"),
        custom("https://login.example/#x"),
        custom("https://admin:hunter2@login.example"),
        custom("mailto:ops@login.example"),
    ] {
        match microsoft_at(authority.clone(), "common") {
            Err(ProviderError::Config { reason }) => {
                assert!(reason.contains("Microsoft authority"), "{reason}");
                assert!(!reason.contains("hunter2"), "credentials printed: {reason}");
            }
            other => panic!("{authority:?}: {other:?}"),
        }
    }
    for tenant in ["", "a/b", "common?x=1", "../keys", "contoso onmicrosoft"] {
        assert!(
            matches!(
                microsoft_at(MicrosoftAuthority::Public, tenant),
                Err(ProviderError::Config { .. })
            ),
            "{tenant:?}"
        );
    }
    for tenant in [
        "common",
        "contoso.onmicrosoft.com",
        "9188040d-6c67-4c5b-b112-36a304b66dad",
    ] {
        assert!(
            microsoft_at(MicrosoftAuthority::China, tenant).is_ok(),
            "{tenant}"
        );
    }
}

#[tokio::test]
async fn google_endpoints_can_be_moved_and_keep_the_quirks() {
    let proxy = |path: &str| -> url::Url {
        format!("https://egress.corp.example/google/{path}")
            .parse()
            .unwrap()
    };
    let config = google()
        .with_authorization_endpoint(proxy("auth"))
        .with_token_endpoint(proxy("token"))
        .with_revocation_endpoint(proxy("revoke"))
        .with_jwks_uri(proxy("certs"))
        .with_userinfo_endpoint(proxy("userinfo"));
    assert_eq!(config.jwks_uri, proxy("certs"));
    assert_eq!(config.userinfo_endpoint, Some(proxy("userinfo")));
    // The issuer check stays Google's.
    assert!(config.issuer.check("accounts.google.com", None).is_ok());

    let (http, seen) = canned(200, GOOGLE_CODE_ANSWER);
    let p = plain(&config.oauth2, http);
    let url = p
        .authorization_url(&request(config.oauth2.scopes.clone(), false))
        .unwrap();
    assert!(url.as_str().starts_with(proxy("auth").as_str()), "{url}");
    let q = query(&url);
    assert_eq!(q["access_type"], "offline", "GoogleQuirks kept");
    assert_eq!(q["prompt"], "consent");

    let mut exchange = CodeExchange::new(
        Secret::new("4/0Ab-code"),
        Secret::new("verifier"),
        Secret::new("nonce-1"),
    );
    exchange.requested_scopes = config.oauth2.scopes.clone();
    let tokens = p.exchange_code(&exchange).await.unwrap();
    assert!(
        config
            .oauth2
            .scopes
            .is_subset(tokens.scopes.as_ref().unwrap()),
        "Google's long scope names mapped back"
    );
    assert_eq!(
        seen.lock().unwrap()[0].uri().to_string(),
        proxy("token").as_str()
    );
    p.revoke(&Secret::new("1//rt"), TokenKind::RefreshToken)
        .await
        .unwrap();
    assert_eq!(
        seen.lock().unwrap()[1].uri().to_string(),
        proxy("revoke").as_str()
    );
}

#[tokio::test]
async fn github_endpoints_can_be_moved_and_keep_the_quirks() {
    let base: url::Url = "https://egress.corp.example/github/".parse().unwrap();
    let config = github()
        .with_base_url(&base)
        .with_account_endpoint(AccountEndpoint::new(
            base.join("api/v3/user").unwrap(),
            "/id",
        ));
    assert_eq!(
        config.authorization_endpoint.as_str(),
        "https://egress.corp.example/github/login/oauth/authorize"
    );
    // GitHub's configuration errors arrive with HTTP 200 and are still read as such.
    let (http, seen) = canned(
        200,
        r#"{"error":"redirect_uri_mismatch","error_description":"The redirect_uri MUST match."}"#,
    );
    let err = refresh(&plain(&config, http)).await.unwrap_err();
    assert!(matches!(err, ProviderError::Config { .. }), "{err:?}");
    assert_eq!(
        seen.lock().unwrap()[0].uri().to_string(),
        "https://egress.corp.example/github/login/oauth/access_token"
    );
    // One endpoint alone moves too.
    let token_only = github().with_token_endpoint(base.join("token").unwrap());
    assert_eq!(token_only.token_endpoint, base.join("token").unwrap());
    assert_eq!(
        token_only.authorization_endpoint.as_str(),
        "https://github.com/login/oauth/authorize"
    );
}

#[test]
fn with_base_url_moves_every_endpoint_a_config_has() {
    let base: url::Url = "http://127.0.0.1:4444/".parse().unwrap();
    let config = google()
        .with_introspection_endpoint("https://oauth2.googleapis.com/tokeninfo".parse().unwrap())
        .with_pushed_authorization_request_endpoint(
            "https://accounts.google.com/par".parse().unwrap(),
        )
        .with_end_session_endpoint("https://accounts.google.com/logout".parse().unwrap())
        .with_base_url(&base);
    let o = &config.oauth2;
    for url in [
        Some(&o.authorization_endpoint),
        Some(&o.token_endpoint),
        o.revocation_endpoint.as_ref(),
        o.introspection_endpoint.as_ref(),
        o.pushed_authorization_request_endpoint.as_ref(),
        Some(&config.jwks_uri),
        config.userinfo_endpoint.as_ref(),
        config.end_session_endpoint.as_ref(),
    ] {
        let url = url.expect("set");
        assert_eq!(url.host_str(), Some("127.0.0.1"), "{url}");
        assert_eq!(url.port(), Some(4444), "{url}");
    }
}

// ---------------------------------------------------------------------------------------------
// Builder methods instead of fields
// ---------------------------------------------------------------------------------------------

#[test]
fn oidc_config_builder_methods_set_every_option() {
    use openidconnect::core::CoreJwsSigningAlgorithm as Alg;
    let base = OidcConfig::new(
        OAuth2Config::new(
            ProviderId::new("corp").unwrap(),
            "client-1",
            "https://idp.example/authorize".parse().unwrap(),
            "https://idp.example/token".parse().unwrap(),
            redirect(),
        ),
        IssuerPolicy::Exact("https://idp.example".into()),
        "https://idp.example/jwks".parse().unwrap(),
    );
    let config = base
        .clone()
        .with_scopes(Scopes::parse("email"))
        .with_additional_scopes(Scopes::parse("offline_access"))
        .with_authorize_param("acr_values", "mfa")
        .with_authorize_params([("ui_locales", "de"), ("prompt", "login")])
        .with_client_secret(Secret::new("s3cr~t"))
        .with_client_auth(ClientAuth::Post)
        .with_refresh_token_reuse(RefreshTokenReuse::Tolerated)
        .with_userinfo_endpoint("https://idp.example/userinfo".parse().unwrap())
        .with_end_session_endpoint("https://idp.example/logout".parse().unwrap())
        .with_jwks_uri("https://keys.idp.example/jwks".parse().unwrap())
        .with_signing_algs([Alg::EcdsaP256Sha256, Alg::None]);
    assert_eq!(
        config.oauth2.scopes,
        Scopes::parse("openid email offline_access"),
        "openid is kept when the scopes are replaced"
    );
    assert_eq!(
        config.oauth2.authorize_params,
        vec![
            ("acr_values".to_owned(), "mfa".to_owned()),
            ("ui_locales".to_owned(), "de".to_owned()),
            ("prompt".to_owned(), "login".to_owned()),
        ]
    );
    assert!(config.oauth2.client_secret.is_some());
    assert_eq!(config.oauth2.client_auth, ClientAuth::Post);
    assert_eq!(
        config.oauth2.refresh_token_reuse,
        RefreshTokenReuse::Tolerated
    );
    assert_eq!(config.userinfo_endpoint.unwrap().path(), "/userinfo");
    assert_eq!(config.end_session_endpoint.unwrap().path(), "/logout");
    assert_eq!(config.jwks_uri.host_str(), Some("keys.idp.example"));
    assert_eq!(
        config.signing_algs,
        vec![Alg::EcdsaP256Sha256],
        "`none` is never accepted"
    );
    assert_eq!(
        base.with_signing_algs([Alg::None]).signing_algs,
        vec![Alg::RsaSsaPkcs1V15Sha256],
        "nothing left: RS256"
    );
}

// ---------------------------------------------------------------------------------------------
// Reserved authorization parameters
// ---------------------------------------------------------------------------------------------

#[test]
fn configured_extra_parameters_cannot_name_a_reserved_one() {
    for name in [
        "state",
        "nonce",
        "redirect_uri",
        "code_challenge",
        "code_challenge_method",
        "client_id",
        "response_type",
        "scope",
        "request",
        "request_uri",
    ] {
        assert!(RESERVED_AUTHORIZATION_PARAMS.contains(&name));
        let config = google().with_authorize_param(name, "attacker-chosen");
        match config.validate() {
            Err(ProviderError::ReservedParameter { name: n }) => assert_eq!(n, name),
            other => panic!("{name}: {other:?}"),
        }
        // The provider refuses it too, instead of sending it twice.
        let (http, _) = canned(200, "{}");
        let p = plain(&config.oauth2, http);
        let err = p
            .authorization_url(&request(config.oauth2.scopes.clone(), false))
            .unwrap_err();
        assert!(
            matches!(&err, ProviderError::ReservedParameter { name: n } if n == name),
            "{err:?}"
        );
        assert!(err.to_string().contains(name), "{err}");
        assert!(!err.to_string().contains("attacker-chosen"), "{err}");
    }
    // Parameter names are case-sensitive: only exact names are reserved.
    let config = github().with_authorize_params([("State", "x"), ("prompt", "consent")]);
    assert!(config.validate().is_ok());
}

#[test]
fn a_logins_own_extra_parameters_cannot_name_a_reserved_one() {
    let (http, _) = canned(200, "{}");
    let config = microsoft("common");
    let p = plain(&config.oauth2, http);
    let mut r = request(config.oauth2.scopes.clone(), false);
    r.extra_params
        .push(("code_challenge".into(), "attacker-chosen".into()));
    assert!(matches!(
        p.authorization_url(&r),
        Err(ProviderError::ReservedParameter { name }) if name == "code_challenge"
    ));
}

//! The generic OAuth 2.0 provider over the HTTP seam: what it sends, and how it reads answers.
//! A closure stands in for the network and records every request.

use std::sync::{Arc, Mutex};

use tokenbroker::http::{HttpClient, HttpError, HttpErrorKind, HttpRequest, HttpResponse};
use tokenbroker::provider::{
    AuthorizationRequest, ClientAuth, CodeExchange, OAuth2Config, OAuth2Provider, Provider,
    ProviderError, TokenKind,
};
use tokenbroker::{ProviderId, Scopes, Secret};

type Seen = Arc<Mutex<Vec<HttpRequest>>>;

fn canned(
    status: u16,
    body: &'static str,
    headers: &'static [(&'static str, &'static str)],
) -> (Arc<dyn HttpClient>, Seen) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let client = move |req: HttpRequest| {
        log.lock().unwrap().push(req);
        async move {
            let mut b = http::Response::builder().status(status);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            Ok::<HttpResponse, HttpError>(b.body(body.as_bytes().to_vec()).unwrap())
        }
    };
    (Arc::new(client), seen)
}

fn config(auth: ClientAuth) -> OAuth2Config {
    OAuth2Config::new(
        ProviderId::new("example").unwrap(),
        "client-1",
        "https://idp.example/authorize".parse().unwrap(),
        "https://idp.example/token".parse().unwrap(),
        "https://app.example/cb".parse().unwrap(),
    )
    .with_client_secret(Secret::new("s3cr~t/+"))
    .with_client_auth(auth)
    .with_scopes(Scopes::parse("read"))
    .with_revocation_endpoint("http://127.0.0.1:9/revoke".parse().unwrap())
}

fn form(req: &HttpRequest) -> std::collections::HashMap<String, String> {
    url::form_urlencoded::parse(req.body())
        .into_owned()
        .collect()
}

const OK: &str = r#"{"access_token":"at-1","token_type":"bearer","expires_in":"3599","refresh_token":"rt-2","scope":"read write"}"#;

#[tokio::test]
async fn code_exchange_sends_the_verifier_and_authenticates_with_basic() {
    let (http, seen) = canned(200, OK, &[("content-type", "application/json")]);
    let p = OAuth2Provider::new(config(ClientAuth::Basic), http);
    let tokens = p
        .exchange_code(&CodeExchange::new(
            Secret::new("the-code"),
            Secret::new("the-verifier"),
            Secret::new("n"),
        ))
        .await
        .unwrap();
    assert_eq!(tokens.access_token.expose_secret(), "at-1");
    assert_eq!(
        tokens.expires_in,
        Some(std::time::Duration::from_secs(3599))
    );
    let req = &seen.lock().unwrap()[0];
    let f = form(req);
    assert_eq!(f["grant_type"], "authorization_code");
    assert_eq!(f["code"], "the-code");
    assert_eq!(f["code_verifier"], "the-verifier");
    assert!(!f.contains_key("client_secret"));
    let basic = req.headers()["authorization"].to_str().unwrap();
    // RFC 6749 §2.3.1: form-encoded before Base64.
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.trim_start_matches("Basic "))
        .unwrap();
    assert_eq!(
        String::from_utf8(decoded).unwrap(),
        "client-1:s3cr%7Et%2F%2B"
    );
}

#[tokio::test]
async fn refresh_with_post_auth_and_narrower_scopes() {
    let (http, seen) = canned(200, OK, &[]);
    let p = OAuth2Provider::new(config(ClientAuth::Post), http);
    p.refresh(&Secret::new("rt-1"), Some(&Scopes::parse("read")))
        .await
        .unwrap();
    let req = &seen.lock().unwrap()[0];
    let f = form(req);
    assert_eq!(f["grant_type"], "refresh_token");
    assert_eq!(f["refresh_token"], "rt-1");
    assert_eq!(f["scope"], "read");
    assert_eq!(f["client_secret"], "s3cr~t/+");
    assert!(req.headers().get("authorization").is_none());
}

#[tokio::test]
async fn answers_are_classified_with_their_status() {
    type Case = (
        u16,
        &'static str,
        &'static [(&'static str, &'static str)],
        fn(&ProviderError) -> bool,
    );
    let cases: Vec<Case> = vec![
        (
            400,
            r#"{"error":"invalid_grant","error_description":"revoked"}"#,
            &[],
            |e| matches!(e, ProviderError::InvalidGrant { .. }),
        ),
        (
            503,
            "<html>maintenance</html>",
            &[("retry-after", "12")],
            |e| {
                matches!(
                    e,
                    ProviderError::Transient {
                        status: Some(503),
                        ..
                    }
                ) && e.retry_after() == Some(std::time::Duration::from_secs(12))
            },
        ),
        (429, "", &[], |e| {
            matches!(
                e,
                ProviderError::Transient {
                    status: Some(429),
                    ..
                }
            )
        }),
        (200, "not json at all", &[], |e| {
            matches!(e, ProviderError::Protocol { .. })
        }),
        (200, r#"{"access_token":"at","tok"#, &[], |e| {
            matches!(e, ProviderError::Protocol { .. })
        }),
        (200, r#"{"error":"bad_refresh_token"}"#, &[], |e| {
            matches!(e, ProviderError::InvalidGrant { .. })
        }),
        (401, r#"{"error":"invalid_client"}"#, &[], |e| {
            matches!(e, ProviderError::InvalidClient { .. })
        }),
        (
            302,
            "",
            &[("location", "https://elsewhere.example/")],
            |e| {
                matches!(
                    e,
                    ProviderError::Protocol {
                        status: Some(302),
                        ..
                    }
                )
            },
        ),
    ];
    for (status, body, headers, expect) in cases {
        let (http, _) = canned(status, body, headers);
        let p = OAuth2Provider::new(config(ClientAuth::Basic), http);
        let err = p.refresh(&Secret::new("rt"), None).await.unwrap_err();
        assert!(expect(&err), "HTTP {status} {body:?} gave {err:?}");
    }
}

#[tokio::test]
async fn transport_failures_are_transient_and_oversize_answers_are_protocol_errors() {
    let refused = |_req: HttpRequest| async {
        Err::<HttpResponse, _>(HttpError::new(HttpErrorKind::Connect, None))
    };
    let p = OAuth2Provider::new(config(ClientAuth::Basic), Arc::new(refused));
    assert!(
        p.refresh(&Secret::new("rt"), None)
            .await
            .unwrap_err()
            .is_transient()
    );
    let huge = |_req: HttpRequest| async {
        Err::<HttpResponse, _>(HttpError::new(HttpErrorKind::TooLarge, None))
    };
    let p = OAuth2Provider::new(config(ClientAuth::Basic), Arc::new(huge));
    assert!(matches!(
        p.refresh(&Secret::new("rt"), None).await,
        Err(ProviderError::Protocol { .. })
    ));
}

#[tokio::test]
async fn revocation_follows_rfc_7009_even_on_loopback_http() {
    let (http, seen) = canned(200, "", &[]);
    let p = OAuth2Provider::new(config(ClientAuth::Post), http);
    p.revoke(&Secret::new("rt-9"), TokenKind::RefreshToken)
        .await
        .unwrap();
    let f = form(&seen.lock().unwrap()[0]);
    assert_eq!(f["token"], "rt-9");
    assert_eq!(f["token_type_hint"], "refresh_token");
    assert_eq!(f["client_id"], "client-1");
    let (http, _) = canned(200, "", &[]);
    let mut no_endpoint = config(ClientAuth::Basic);
    no_endpoint.revocation_endpoint = None;
    let p = OAuth2Provider::new(no_endpoint, http);
    assert!(matches!(
        p.revoke(&Secret::new("x"), TokenKind::RefreshToken).await,
        Err(ProviderError::Unsupported { .. })
    ));
}

#[test]
fn the_authorization_url_has_pkce_state_scopes_and_nonce_for_openid() {
    let (http, _) = canned(200, OK, &[]);
    let p = OAuth2Provider::new(
        config(ClientAuth::Basic).with_authorize_param("access_type", "offline"),
        http,
    );
    let mut req = AuthorizationRequest::new(
        Secret::new("st"),
        "challenge".into(),
        Secret::new("nn"),
        Scopes::parse("openid read"),
    );
    req.login_hint = Some("alice@example.com".into());
    let url = p.authorization_url(&req).unwrap();
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], "client-1");
    assert_eq!(q["state"], "st");
    assert_eq!(q["code_challenge"], "challenge");
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["nonce"], "nn");
    assert_eq!(q["scope"], "openid read");
    assert_eq!(q["access_type"], "offline");
    assert_eq!(q["login_hint"], "alice@example.com");
    assert_eq!(q["redirect_uri"], "https://app.example/cb");
}

//! Starts the certified `oidc-provider` (tests/idp/server.mjs) on a random loopback port and
//! drives its login without a browser ([`OidcProvider::start`]), or serves its real login and
//! consent pages to a browser ([`OidcProvider::start_with`] and [`Interactions::Pages`]).
//!
//! Include it from a test file of the root crate with
//! `#[path = "support/oidc_provider.rs"] mod oidc_provider;`, or from a member crate's with
//! `#[path = "../../tests/support/oidc_provider.rs"] mod oidc_provider;`.
//! The Node packages must be installed (`scripts/setup-idp.sh`, which `scripts/test.sh` runs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use url::Url;

/// How the provider behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Rotation on every refresh; reuse of a consumed refresh token revokes the grant;
    /// `offline_access` only with `prompt=consent` (OpenID Connect Core §11).
    Oidc,
    /// A refresh token only with `access_type=offline` on first consent or `prompt=consent`;
    /// no rotation, and refresh answers carry no refresh token.
    GoogleLike,
    /// `offline_access` without `prompt=consent`; rotation; `ext_expires_in` in token answers.
    MicrosoftLike,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Profile::Oidc => "oidc",
            Profile::GoogleLike => "google-like",
            Profile::MicrosoftLike => "microsoft-like",
        }
    }
}

/// How the provider's login and consent happen (`INTERACTIONS` of tests/idp/server.mjs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interactions {
    /// No pages: the `login_hint` user (else `alice`) is signed in and consent granted as
    /// soon as the browser (or [`OidcProvider::login`]) arrives.
    #[default]
    Scripted,
    /// oidc-provider's built-in development pages: a login form (`input[name=login]`,
    /// `input[name=password]`, `button.login-submit` "Sign-in"; any login and non-empty
    /// password) and a consent form (`button.login-submit` "Continue"). For a real browser;
    /// [`OidcProvider::login`] cannot get through them.
    Pages,
}

impl Interactions {
    fn name(self) -> &'static str {
        match self {
            Interactions::Scripted => "scripted",
            Interactions::Pages => "pages",
        }
    }
}

/// The redirect URI registered for both clients unless a test gives its own.
pub const DEFAULT_REDIRECT_URI: &str = "http://127.0.0.1:9/callback";

/// How to start a provider: [`ProviderOptions::new`], then the builder methods.
#[derive(Debug, Clone)]
pub struct ProviderOptions {
    pub profile: Profile,
    /// Access-token lifetime, seconds.
    pub access_ttl: u64,
    /// The redirect URI registered for both clients (`tb-basic`, `tb-post`).
    pub redirect_uri: Url,
    pub interactions: Interactions,
    /// The public JWK Set (JSON) registered for the `private_key_jwt` client `tb-pkjwt`
    /// (`CLIENT_JWKS`); without it that client is not registered.
    pub client_jwks: Option<String>,
    /// The provider requires pushed authorization requests of every client (`REQUIRE_PAR`).
    pub require_par: bool,
}

impl ProviderOptions {
    /// `profile` and `access_ttl` (seconds), the default redirect URI, scripted interactions.
    pub fn new(profile: Profile, access_ttl: u64) -> ProviderOptions {
        ProviderOptions {
            profile,
            access_ttl,
            redirect_uri: DEFAULT_REDIRECT_URI.parse().unwrap(),
            interactions: Interactions::Scripted,
            client_jwks: None,
            require_par: false,
        }
    }
    /// Makes the provider require pushed authorization requests (RFC 9126) of every client.
    pub fn require_par(mut self, on: bool) -> ProviderOptions {
        self.require_par = on;
        self
    }
    pub fn redirect_uri(mut self, redirect_uri: Url) -> ProviderOptions {
        self.redirect_uri = redirect_uri;
        self
    }
    pub fn interactions(mut self, interactions: Interactions) -> ProviderOptions {
        self.interactions = interactions;
        self
    }
    /// Registers `tb-pkjwt` (`private_key_jwt`) with this public JWK Set, e.g.
    /// `{"keys":[{"kty":"EC",...}]}` made from a key the test generated.
    pub fn client_jwks(mut self, jwks: impl Into<String>) -> ProviderOptions {
        self.client_jwks = Some(jwks.into());
        self
    }
}

impl Default for ProviderOptions {
    fn default() -> ProviderOptions {
        ProviderOptions::new(Profile::Oidc, 5)
    }
}

/// tests/idp of the workspace: found by walking up from the including crate's manifest
/// directory, so the root crate and member crates find the same one.
pub fn idp_dir() -> PathBuf {
    let start = Path::new(env!("CARGO_MANIFEST_DIR"));
    start
        .ancestors()
        .map(|dir| dir.join("tests/idp"))
        .find(|dir| dir.join("server.mjs").is_file())
        .unwrap_or_else(|| {
            panic!(
                "tests/idp/server.mjs not found in {} or any folder above it",
                start.display()
            )
        })
}

/// Counters kept by the provider.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
pub struct Counters {
    pub refresh_requests: u64,
    pub refresh_successes: u64,
    pub refresh_errors: u64,
    pub reuse_detected: u64,
    pub code_exchanges: u64,
    pub revocation_requests: u64,
    pub grants_revoked: u64,
}

/// A running provider; killed on drop.
pub struct OidcProvider {
    child: Child,
    issuer: Url,
    redirect_uri: Url,
    interactions: Interactions,
    http: reqwest::Client,
    stderr: Arc<Mutex<String>>,
}

pub const CLIENT_SECRET: &str = "tb-secret~+/=";

/// The secret of the `client_secret_jwt` client `tb-secretjwt` (HS256 wants 32 bytes or more).
pub const JWT_CLIENT_SECRET: &str = "tb-secretjwt-secret~+/=-0123456789abcdefghijklmnopqrstuvwxyz";

impl OidcProvider {
    /// Starts a provider with the given profile and access-token lifetime (seconds), the
    /// default redirect URI and scripted interactions.
    pub async fn start(profile: Profile, access_ttl: u64) -> OidcProvider {
        OidcProvider::start_with(ProviderOptions::new(profile, access_ttl)).await
    }

    /// Starts a provider as `options` say.
    pub async fn start_with(options: ProviderOptions) -> OidcProvider {
        let ProviderOptions {
            profile,
            access_ttl,
            redirect_uri,
            interactions,
            client_jwks,
            require_par,
        } = options;
        let dir = idp_dir();
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "{}/node_modules is missing: run scripts/setup-idp.sh (scripts/test.sh does it)",
            dir.display()
        );
        let mut command = Command::new("node");
        if let Some(jwks) = &client_jwks {
            command.env("CLIENT_JWKS", jwks);
        }
        let mut child = command
            .arg("server.mjs")
            .current_dir(&dir)
            .env("PROFILE", profile.name())
            .env("ACCESS_TTL", access_ttl.to_string())
            .env("REDIRECT_URI", redirect_uri.as_str())
            .env("INTERACTIONS", interactions.name())
            .env("REQUIRE_PAR", if require_par { "1" } else { "0" })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `node` (is Node.js installed? scripts/setup-idp.sh checks): {e}"
                )
            });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        let issuer = match first {
            Ok(Ok(Some(line))) if line.starts_with("LISTENING ") => {
                line["LISTENING ".len()..].trim().parse().unwrap()
            }
            other => panic!(
                "oidc-provider did not start ({other:?}); its stderr:\n{}",
                stderr.lock().unwrap()
            ),
        };
        // Keep reading stdout: oidc-provider prints notices there, and a closed pipe kills it.
        let sink = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .cookie_store(true)
            // A fresh connection per request: no race with Node closing idle keep-alive sockets.
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        OidcProvider {
            child,
            issuer,
            redirect_uri,
            interactions,
            http,
            stderr,
        }
    }

    pub fn issuer(&self) -> Url {
        self.issuer.clone()
    }
    pub fn authorization_endpoint(&self) -> Url {
        self.issuer.join("/auth").unwrap()
    }
    pub fn token_endpoint(&self) -> Url {
        self.issuer.join("/token").unwrap()
    }
    pub fn revocation_endpoint(&self) -> Url {
        self.issuer.join("/token/revocation").unwrap()
    }
    pub fn introspection_endpoint(&self) -> Url {
        self.issuer.join("/token/introspection").unwrap()
    }
    pub fn redirect_uri(&self) -> Url {
        self.redirect_uri.clone()
    }
    pub fn interactions(&self) -> Interactions {
        self.interactions
    }

    /// Plays the browser: follows the authorization URL through the provider's (scripted)
    /// login and consent, carrying cookies, until it redirects to the redirect URI, which it
    /// does not request. Returns that final URL (`?code=...&state=...` or `?error=...`).
    pub async fn login(&self, authorization_url: &Url) -> Url {
        assert_eq!(
            self.interactions,
            Interactions::Scripted,
            "OidcProvider::login needs scripted interactions; with the login pages a browser signs in"
        );
        let mut url = authorization_url.clone();
        let mut form: Option<(Url, Vec<(String, String)>)> = None;
        for _ in 0..12 {
            let request = match form.take() {
                // The page a browser would submit by script (oidc-provider ends the current
                // session this way before another account signs in).
                Some((action, fields)) => self.http.post(action).form(&fields),
                None => self.http.get(url.clone()),
            };
            let response = request.send().await.expect("provider reachable");
            let status = response.status();
            if status == 200 {
                let body = response.text().await.unwrap_or_default();
                if let Some(submit) = auto_submitted_form(&url, &body) {
                    form = Some(submit);
                    continue;
                }
                panic!("expected a redirect from {url}, got {status}: {body}");
            }
            assert!(
                status.is_redirection(),
                "expected a redirect from {url}, got {status}: {}",
                response.text().await.unwrap_or_default()
            );
            let location = response.headers()["location"].to_str().unwrap().to_owned();
            let next = url.join(&location).unwrap();
            if next.as_str().starts_with(self.redirect_uri.as_str()) {
                return next;
            }
            url = next;
        }
        panic!(
            "too many redirects during login; provider stderr:\n{}",
            self.stderr.lock().unwrap()
        );
    }

    /// Revokes every grant of `user` at the provider.
    pub async fn revoke_user(&self, user: &str) {
        let url = self
            .issuer
            .join(&format!("/__test/revoke-user?user={user}"))
            .unwrap();
        let r = self.http.post(url).send().await.unwrap();
        assert!(r.status().is_success());
    }

    /// The provider's counters.
    pub async fn counters(&self) -> Counters {
        let url = self.issuer.join("/__test/counters").unwrap();
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Whether the provider says `token` is active (RFC 7662 introspection). oidc-provider
    /// answers only for the client a token was issued to, so both test clients ask.
    pub async fn is_active(&self, token: &str) -> bool {
        for request in [
            self.http
                .post(self.introspection_endpoint())
                .basic_auth("tb-basic", Some(form_encoded(CLIENT_SECRET)))
                .form(&[("token", token)]),
            self.http.post(self.introspection_endpoint()).form(&[
                ("token", token),
                ("client_id", "tb-post"),
                ("client_secret", CLIENT_SECRET),
            ]),
        ] {
            let response = match request.send().await {
                Ok(r) => r,
                Err(e) => panic!(
                    "introspection request failed: {e:?}; provider stderr:\n{}",
                    self.stderr()
                ),
            };
            assert!(
                response.status().is_success(),
                "introspection failed: {}",
                response.status()
            );
            let body: serde_json::Value = response.json().await.unwrap();
            if body["active"].as_bool() == Some(true) {
                return true;
            }
        }
        false
    }

    /// Presents a refresh token directly at the token endpoint as `client_id` (`tb-basic` or
    /// `tb-post`), as a client that lost track of rotation would. Returns the HTTP status and
    /// the JSON answer.
    pub async fn raw_refresh(
        &self,
        client_id: &str,
        refresh_token: &str,
    ) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(self.token_endpoint())
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
                ("client_id", client_id),
                ("client_secret", CLIENT_SECRET),
            ])
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or_default())
    }

    /// The provider's stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

/// RFC 6749 §2.3.1: Basic credentials are form-encoded before Base64 (and oidc-provider decodes
/// them, so a raw `+` would arrive as a space).
fn form_encoded(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The form of a page that submits itself on load (`document.forms[0].submit()`): its action
/// and hidden fields, as a browser would post them.
fn auto_submitted_form(base: &Url, body: &str) -> Option<(Url, Vec<(String, String)>)> {
    if !body.contains("forms[0].submit()") {
        return None;
    }
    let attr = |tag: &str, name: &str| -> Option<String> {
        let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
        let end = tag[start..].find('"')? + start;
        Some(tag[start..end].to_owned())
    };
    let form_start = body.find("<form")?;
    let form_tag = &body[form_start..form_start + body[form_start..].find('>')?];
    let action = base.join(&attr(form_tag, "action")?).ok()?;
    let mut fields = Vec::new();
    let mut rest = &body[form_start..];
    while let Some(i) = rest.find("<input") {
        let tag = &rest[i..i + rest[i..].find('>')?];
        if let (Some(name), Some(value)) = (attr(tag, "name"), attr(tag, "value")) {
            fields.push((name, value));
        }
        rest = &rest[i + 6..];
    }
    Some((action, fields))
}

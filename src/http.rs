//! The HTTP seam: how providers reach the network.
//!
//! Providers send plain [`http::Request`]s through an [`HttpClient`]. The default feature
//! `reqwest` gives [`ReqwestClient`]; hosts can plug in their own client, and tests can use a
//! closure:
//!
//! ```
//! use tokenbroker::http::{HttpClient, HttpError, HttpRequest, HttpResponse};
//!
//! let canned = |_req: HttpRequest| async {
//!     Ok::<_, HttpError>(
//!         http::Response::builder()
//!             .status(200)
//!             .header("content-type", "application/json")
//!             .body(br#"{"access_token":"at","token_type":"Bearer"}"#.to_vec())
//!             .unwrap(),
//!     )
//! };
//! let client: std::sync::Arc<dyn HttpClient> = std::sync::Arc::new(canned);
//! ```
//!
//! Unlike `oauth2`'s own client seam, the broker keeps the HTTP status of every answer, so a
//! 503 or 429 is classified as a transient failure and never mistaken for a revoked grant.
//!
//! # The `http` crate
//!
//! Requests and answers are the [`http`] crate's types (version 1). This module has the
//! crate's name, so the crate itself is re-exported here as [`types`]: a host needs no `http`
//! dependency of its own, and cannot end up with a second, incompatible version of it.
//!
//! ```
//! use tokenbroker::http::types as http;
//! use tokenbroker::http::{HttpClient, HttpError, HttpRequest, HttpResponse};
//!
//! let unauthorized = |_req: HttpRequest| async {
//!     Ok::<HttpResponse, HttpError>(
//!         http::Response::builder()
//!             .status(http::StatusCode::UNAUTHORIZED)
//!             .body(Vec::new())
//!             .unwrap(),
//!     )
//! };
//! let client: std::sync::Arc<dyn HttpClient> = std::sync::Arc::new(unauthorized);
//! # let _ = client;
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::BoxError;

/// The [`http`] crate (version 1) that [`HttpRequest`], [`HttpResponse`] and the rest
/// of the public API speak, re-exported under another name because this module is already
/// called `http` (see [the module docs](self#the-http-crate)).
#[doc(no_inline)]
pub use ::http as types;

/// An outgoing request.
pub type HttpRequest = http::Request<Vec<u8>>;
/// An answer, with its body read completely.
pub type HttpResponse = http::Response<Vec<u8>>;

/// The largest response body the broker reads from a provider (1 MiB). Token responses are a
/// few kilobytes; anything bigger is a misbehaving endpoint.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Sends HTTP requests for providers.
///
/// # Contract
/// - Must **not follow redirects**: a token endpoint that redirects is a misconfiguration, and
///   following it could post credentials elsewhere.
/// - Should apply a time-out. The broker applies its own refresh time-out as well.
/// - Any status is an `Ok` answer; `Err` is for answers that did not arrive.
#[async_trait]
pub trait HttpClient: Send + Sync + 'static {
    /// Sends one request and reads the whole answer.
    async fn execute(&self, request: HttpRequest) -> Result<HttpResponse, HttpError>;
}

#[async_trait]
impl<F, Fut> HttpClient for F
where
    F: Fn(HttpRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<HttpResponse, HttpError>> + Send + 'static,
{
    async fn execute(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        self(request).await
    }
}

/// A shared HTTP client handle.
pub type SharedHttpClient = Arc<dyn HttpClient>;

/// What kind of failure kept an answer from arriving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpErrorKind {
    /// Could not connect (refused, DNS, TLS).
    Connect,
    /// No answer in time.
    Timeout,
    /// The answer was cut off or could not be read.
    Body,
    /// The answer was larger than [`MAX_RESPONSE_BYTES`].
    TooLarge,
    /// Anything else (e.g. a malformed request).
    Other,
}

/// An HTTP exchange failed before an answer arrived.
#[derive(Debug, Clone, thiserror::Error)]
#[error("http request failed ({kind:?})")]
pub struct HttpError {
    kind: HttpErrorKind,
    #[source]
    source: Option<BoxError>,
}

impl HttpError {
    /// An error of `kind`, with an optional cause.
    pub fn new(kind: HttpErrorKind, source: Option<BoxError>) -> Self {
        HttpError { kind, source }
    }

    /// An error of `kind` caused by `source`.
    pub fn with_source(
        kind: HttpErrorKind,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        HttpError {
            kind,
            source: Some(Arc::new(source)),
        }
    }

    /// What kind of failure it was.
    pub fn kind(&self) -> HttpErrorKind {
        self.kind
    }
}

/// The default [`HttpClient`], on `reqwest` with rustls: no redirects, a 10 s request time-out,
/// a 5 s connect time-out and a 1 MiB answer limit.
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
#[derive(Clone)]
pub struct ReqwestClient {
    client: reqwest::Client,
    timeout: std::time::Duration,
}

#[cfg(feature = "reqwest")]
impl fmt::Debug for ReqwestClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReqwestClient")
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[cfg(feature = "reqwest")]
impl ReqwestClient {
    /// The default request time-out.
    pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

    /// A client with the default time-out.
    pub fn new() -> Result<Self, HttpError> {
        Self::with_timeout(Self::DEFAULT_TIMEOUT)
    }

    /// A client whose requests give up after `timeout`. Keep it below the broker's refresh
    /// time-out.
    pub fn with_timeout(timeout: std::time::Duration) -> Result<Self, HttpError> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(std::time::Duration::from_secs(5)))
            .user_agent(concat!("tokenbroker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HttpError::with_source(HttpErrorKind::Other, e))?;
        Ok(ReqwestClient { client, timeout })
    }

    /// Wraps a `reqwest::Client` the host built. It must not follow redirects.
    pub fn from_client(client: reqwest::Client) -> Self {
        ReqwestClient {
            client,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}

#[cfg(feature = "reqwest")]
fn classify_reqwest(e: reqwest::Error) -> HttpError {
    let kind = if e.is_timeout() {
        HttpErrorKind::Timeout
    } else if e.is_connect() {
        HttpErrorKind::Connect
    } else if e.is_body() || e.is_decode() {
        HttpErrorKind::Body
    } else {
        HttpErrorKind::Other
    };
    // reqwest's message names the URL; provider endpoint URLs carry no secrets (tokens travel in
    // form bodies), so keeping the source is safe.
    HttpError::with_source(kind, e)
}

#[cfg(feature = "reqwest")]
#[async_trait]
impl HttpClient for ReqwestClient {
    async fn execute(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let request = reqwest::Request::try_from(request).map_err(classify_reqwest)?;
        let mut response = self
            .client
            .execute(request)
            .await
            .map_err(classify_reqwest)?;
        let mut builder = http::Response::builder()
            .status(response.status())
            .version(response.version());
        if let Some(headers) = builder.headers_mut() {
            *headers = std::mem::take(response.headers_mut());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify_reqwest)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(HttpError::new(HttpErrorKind::TooLarge, None));
            }
            body.extend_from_slice(&chunk);
        }
        builder
            .body(body)
            .map_err(|e| HttpError::with_source(HttpErrorKind::Other, e))
    }
}

/// The default client of the build: [`ReqwestClient`] when the `reqwest` feature is on.
pub(crate) fn default_client() -> Option<SharedHttpClient> {
    #[cfg(feature = "reqwest")]
    {
        ReqwestClient::new()
            .ok()
            .map(|c| Arc::new(c) as SharedHttpClient)
    }
    #[cfg(not(feature = "reqwest"))]
    {
        None
    }
}

/// A debug placeholder for structs that hold a client.
pub(crate) struct ClientDebug;

impl fmt::Debug for ClientDebug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HttpClient")
    }
}

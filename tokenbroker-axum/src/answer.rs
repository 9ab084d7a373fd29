//! Sending the core's [`BrokerResponse`] through axum.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use tokenbroker::BrokerResponse;

/// A [`BrokerResponse`] as an axum response: status, headers (`Cache-Control: no-store` and
/// the rest) and body exactly as the core rendered them.
///
/// ```
/// use axum::response::IntoResponse;
/// use tokenbroker_axum::Answer;
///
/// let response = Answer(tokenbroker::BrokerResponse::unauthenticated()).into_response();
/// assert_eq!(response.status(), 401);
/// assert_eq!(response.headers()["cache-control"], "no-store");
/// ```
#[derive(Debug)]
pub struct Answer(pub BrokerResponse);

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        self.0.into_http().map(Body::from)
    }
}

impl From<BrokerResponse> for Answer {
    fn from(response: BrokerResponse) -> Self {
        Answer(response)
    }
}

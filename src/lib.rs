//! tokenbroker (crate docs are written in the broker commit)
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub)]
#![deny(rustdoc::broken_intra_doc_links)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod access;
mod broker;
mod clock;
pub mod error;
pub mod events;
pub mod http;
mod ids;
pub mod provider;
mod secret;
pub mod store;
mod token;

pub use access::{
    AccessError, Caller, Decision, DenyReason, KeycloakRoles, ProviderPolicy, RoleChecker,
    RoleGrantHook,
};
pub use broker::{
    BrokerResponse, Callback, LEASE_MARGIN, LinkOutcome, LoginOptions, LoginStart, PendingLogin,
    RetrievedTokens, TokenBroker, TokenBrokerBuilder, UnlinkOutcome,
};
pub use clock::{Clock, SharedClock, SystemClock};
pub use error::{Error, Result};
pub use events::{BrokerEvent, EventSink, RevocationStatus};
pub use ids::{InvalidId, ProviderId, Realm, Scopes, Subject, TokenKey};
pub use provider::{Provider, ProviderError};
pub use secret::Secret;
pub use store::{MemoryStore, StoreError, TokenStore};
pub use token::{DecodeError, Payload, ProviderTokens, TokenSet};

#[cfg(any(test, feature = "testing"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

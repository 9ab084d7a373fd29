//! Every provider's reading of a token-endpoint answer: the generic parser with any status and
//! body, then each quirk preset's `fix_tokens`/`classify_error`, then the conversion into a
//! stored `TokenSet` (lifetimes turned into instants) and its payload round trip.
#![no_main]

use http::{HeaderMap, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use tokenbroker::provider::{
    GitHubQuirks, GoogleQuirks, MicrosoftQuirks, Quirks, StandardQuirks, parse_token_response,
};
use tokenbroker::{Scopes, TokenSet};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    // Two bytes of status (100..=599), one byte of Retry-After, then the body.
    let status = 100 + u16::from_be_bytes([data[0], data[1]]) % 500;
    let Ok(status) = StatusCode::from_u16(status) else {
        return;
    };
    let mut headers = HeaderMap::new();
    if data[2] != 0 {
        headers.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(u16::from(data[2])),
        );
    }
    let body = &data[3..];
    let quirks: [&dyn Quirks; 4] = [
        &StandardQuirks,
        &GoogleQuirks,
        &MicrosoftQuirks,
        &GitHubQuirks,
    ];
    let requested = Scopes::parse("openid email profile offline_access User.Read");
    let now = time::OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap();
    for q in quirks {
        match parse_token_response(status, &headers, body) {
            Ok(mut tokens) => {
                q.fix_tokens(&mut tokens, Some(&requested));
                let set = TokenSet::from_response(tokens, now, &requested);
                let back = TokenSet::from_payload(&set.to_payload())
                    .expect("a stored token set always decodes");
                assert_eq!(back.expires_at(), set.expires_at());
                assert_eq!(back.scopes(), set.scopes(), "scopes survive the payload");
                let _ = set.is_fresh(now, std::time::Duration::from_secs(60));
            }
            Err(e) => {
                let e = q.classify_error(e);
                let _ = (e.to_string(), e.is_transient(), e.retry_after());
            }
        }
    }
});

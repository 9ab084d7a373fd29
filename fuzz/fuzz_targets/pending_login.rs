//! The pending login a host keeps in its session and hands back: any JSON must either be
//! rejected or give a value that serializes back to something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenbroker::PendingLogin;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = serde_json::from_slice::<PendingLogin>(data) {
        let _ = format!("{p:?}");
        let text = serde_json::to_string(&p).expect("a pending login serializes");
        let back: PendingLogin = serde_json::from_str(&text).expect("round trip decodes");
        assert_eq!(back.key(), p.key());
        assert_eq!(back.scopes(), p.scopes());
        assert_eq!(back.created_at(), p.created_at());
    }
});

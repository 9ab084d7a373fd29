//! The keys that sign ID tokens, and `GET /jwks`.

use std::sync::{Arc, OnceLock};

use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::response::Response;
use openidconnect::core::CoreRsaPrivateSigningKey;
use openidconnect::{JsonWebKeyId, PrivateSigningKey};
use serde_json::{Value, json};

#[cfg(doc)]
use super::FakeIdp;
use super::protocol::json_response;
use super::state::Shared;

pub(super) async fn jwks_handler(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    let keys: Vec<usize> = {
        let mut st = shared.lock();
        st.counters.jwks_calls += 1;
        if st.knobs.publish_retired_keys {
            st.used_keys.clone()
        } else {
            vec![st.signing_key]
        }
    };
    let keys: Vec<Value> = keys.into_iter().map(public_jwk).collect();
    json_response(StatusCode::OK, &json!({ "keys": keys }))
}

/// The public half of embedded test key `key` as a JWK, with `kid`, `use` and `alg`.
fn public_jwk(key: usize) -> Value {
    let mut jwk =
        serde_json::to_value(test_keys()[key].as_verification_key()).unwrap_or_else(|_| json!({}));
    if let Some(fields) = jwk.as_object_mut() {
        fields.retain(|_, v| !v.is_null());
        fields.insert("alg".into(), "RS256".into());
        fields.insert("use".into(), "sig".into());
    }
    jwk
}

// TEST-ONLY KEYS. These RSA private keys are PUBLIC: they are published in this source file so
// that ID tokens of the fake IdP can be verified by anyone. Never use them for anything else.
// Generated with `openssl genrsa -traditional 2048` (PKCS #1 PEM, which is what
// `CoreRsaPrivateSigningKey::from_pem` reads).

/// The `kid`s of [`TEST_KEY_PEMS`], in the same order.
pub(super) const KEY_IDS: [&str; 2] = ["fake-idp-test-key-1", "fake-idp-test-key-2"];

/// Test-only, public RSA keys (see above). Key 1 signs first; [`FakeIdp::rotate_signing_key`]
/// switches to key 2.
const TEST_KEY_PEMS: [&str; 2] = [
    "-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAtDIEhFD/KR5XVdm1Tm5ppl380ytEjBzs01lGJNrnoS2n+3tn
xdPRR1klvMN44BCX1U0AFVPhiHtDlRQ7N35tqndV+ftiWFGRFl3+5H1ekUuOPvFd
+A4QkUr2cTZfv6AzOplcm7lM/GYzrlyrzMghRmNEo20+9y7qwKbUoLQ9+Uaow3UL
DTiD2xaNKxkcju514Q9oKeDbiy+q5QyQ1MHr1tb585OxbCfrhOrsFfITCzjvhL6B
URmtSGIcay0X8k6O8KlxjQMPR55/LlwMtAbPhI7WAS8x5Y9O/CFxUf14hO6Nk6kf
Z9/OLwUme+pxplGQwJGqjhkmFV0EtNSuENbdVwIDAQABAoIBADv4RX6Pwku5+FDv
EqMWpfyjXQgeZ0LGQZ8ZH/oWDG6c1kIg0OmK1CSNq7yFxY20mAN6C+QNNYsJkvVj
dU3DutW3v5phqlpAUywBflomyzlJzv5tr9tlOuhP7XLCKN2KgGIpNiPxaIi7rsmB
t/+AP2rAkNBfBEyZhbE2FJ+jPNjftz6x3s+shKna4jCsQA/Ji1PpF83M6gSc8Bnw
wZah703sW3Y3isVnh1Qo56AUNfU6zepqYeYWgKnFIE0H/llmzOmusvzSMOZowj4E
MuilOIa6zHZGpLA35sC7fQubC2zZglCNh3voYT7//+TknWVCLncvXqc01cXw3pOo
CNspbMECgYEA21inMKlYl+6Sf1YwcApZtpuAYutKs7DAV8DtBzSBw2m9KmxhmgCV
fMf61kmRbVta8+Af4C9diHE5+3j9Gwv9fao5KQt4tjTIUr5MIRjKWjO+KJpotl4q
II3itCRFyWUZSm5cFkxqekN625QJipbhRaE3mxYhiP3drRmaW2kIErcCgYEA0k6K
IqBOP0zxNZ0+9QekqVRdt0OH/bLkjCluGaYH6fxne5+28eij2ow/y4OJ1SWkFOkg
TFw3eDTheE3c/V1Rf4FXJWHZD5R3WlUzykNJrx84v7LpzNiHDiVasBcrV5Dr9cj9
XPDgmp7YssT9VqK10OwV7YqWpCMBCzzsi9M4amECgYBNvfIj8SGRV+FceHPaghCi
BCNQ7Awh+/dwItTfxOBpHkUJkDhXmPVisI5a/OAqXkKyRTGHB8Ki5V6jnpI2z90c
eQShY4t5KOQHT6Mz59Fwfv5a7b9HQ8CyoRdEucZyRv7bvpms3ZCvnNMimCl5kVhu
kWFf+kwQfcnf3D81Pti5qQKBgQC6krzPnUHtvHfdZaQ9w0scgeEmPX3+318MzZCE
ppwsxCSWMwodMJN0xqmuBgMYmm0ns+5YcBMxzFAe54zfJZOwt3E1k8n6nW8JL79j
eDB9cQhqYPI0LgAa157Ny7BC3inHgkjr1DKeWb/LUSGjY3RDZb7KXwHnmbpKWwFL
xtYs4QKBgDXWH/K8PuGuWoGDsyOe/lcx6OLXaLZv27CPkcDCp6IGUVmIm6JkfGkK
wbYx76xrHxDS1dmnMl1EhCGacyC1FDFxe065wfpgueqhxMGFyRLxl+i0HfO3oD/g
ExsLDJLhtSdzYKN2dzW84edWmMlYEE+2cVegLddnBT786LupgDy8
-----END RSA PRIVATE KEY-----
",
    "-----BEGIN RSA PRIVATE KEY-----
MIIEogIBAAKCAQEAj+QMXopCXSwZVCunjeFAxFVYZ8VfWweSA8Cnc9Iu/2lyNypI
ARuVcAYnox7TUZQg+TSgmWYvPSCvHA9MLePLmlZOGqJFUVNaGhOl5eXyrE08KJTq
EH/S6SLxNx9iLRBKzBigcWmwkApzXLtIn0+HwxcGmhY+Lo5/695Pf6TK9adcXIbh
GL/+t9MQST4dCeoit30YHw6IxKOqj+FWpXWtc11Vl5ltb97QXE3XiNNnFLb5/u74
sd2NC1L5YuUQChJliduhM+JtFN4BMitUP8TvhPg+NTrCNmhpwTb82UDYAnw/iDLZ
pjxk83NQICC7rulyIhgcfnNkcWnMtNV3sESXwwIDAQABAoIBAACpvlzZKkEfqOY4
ZUdEGHZPJl8kC7JxsHyP8LWZ7FmE9N/INBi9Nc0UWi5oP/UKR7SeR3ctf146vlPU
xjcX66JEb4uz37nmNm4UVRlgG+QrXvGY7hMxY5lrbc0hOeSXRKD4JBUhtYyUX7+3
pTgGt8twWblwDM1OHszJc3hVHBJRt1hLu1lwXphKxfAi+bao/ZuY7b6MBXIf6PmT
Zh2jjIEjR07/QXx+EFgte9vb14j1zQjP70Wg1e0MJpklYxO/AtGgo9OvxilCelTr
+Gk5rX7cKLrhnPukVVRVMRU+MuYb9svCt2P+Eqp5DCo+ACSl9uNPVgEF2zGE8e5j
U637R7ECgYEAxFjoDlo3nW++9QVbvm/MYjaua+YF+XVXqv53SNiz/3PhcqoapdC0
wjiVHTq3bfzgVNbdDe1jnkY7FVmsPeWB7SxFpomU38IjWQeJEkbQCACLK9xK2pfW
XK3A3ns2xumy8RDyTTi+eNMW+hm7RwlP7cjGkniZ6uumfzQ4CgzUH68CgYEAu5tK
WxOKC/PYkt1jWCEmAG20Gt2uti3vhD4GSfQIw3Sl5GOxOx6yq5qK7AcoWr6MDb/U
0AMdEMa5QC6IUFWnufGKkvigwQDPWP5MXBWz3pWsJc9SWdcY21iHkUibv3VMxxHx
lf+/e8UNzv95eS7VP3RBKsc9UVz07yCbrPQA2i0CgYAx0fFHuwKDkxgb6bkmsA1n
GkLVo+7+JhURkTHJLRs3BTs+MgVC75r98Qd8/CoQ4Wo2fLJoV0TAo0dYmoFGz1ZR
TLt7j0tUH1mCvJO+LHOapDCr92CS6JX+vCPFD/SNMj0yR7+DcpN56u3YlfDcDHPY
fOpNvgYoApUjj6dsfWbRhwKBgExD+tw/ezUUsgwyN7qR7zLpZfgt+mJRFjd6R3A0
5oMennnUFS5lcljUgHknB76sC59jRo4xVdWGE7UFtaCC0aaDjMPmkuMjAye4aS5e
HDr2OX89Ysrm6FHzEVl8XOReORIMN1u1FhCosM5fiPA8m7AqAHv1dvXmhiPX67FJ
mDcZAoGATTTY+3lj7tKygXgg77+9un8liAdrlTjjGHRnDIf6lIuYZ1qeSIKUAK7m
C5yZHTvrxkGq26c9NmnQ7iqdNYmEu8gD3g3w2Dyg9T9CXlLn/llckCDPSHTFxcAO
/Z2QK2Z7wcvLWl7d6CkDT3IIaUPhlKZKoM4HVC3OpKe/aKOFFow=
-----END RSA PRIVATE KEY-----
",
];

/// The parsed keys, shared by every fake in the process (parsing RSA keys is not free).
pub(super) fn test_keys() -> &'static [CoreRsaPrivateSigningKey] {
    static KEYS: OnceLock<Vec<CoreRsaPrivateSigningKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        TEST_KEY_PEMS
            .iter()
            .zip(KEY_IDS)
            .map(|(pem, kid)| {
                CoreRsaPrivateSigningKey::from_pem(pem, Some(JsonWebKeyId::new(kid.to_owned())))
                    // A constant of this file: failing here is a bug of the fake, not of a test.
                    .expect("embedded test key is a valid PKCS #1 PEM")
            })
            .collect()
    })
}

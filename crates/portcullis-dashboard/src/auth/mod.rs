//! HTTP Basic authentication for the operator routes (RFC 7617).
//!
//! [`BasicAuthLayer`] checks the `Authorization: Basic ...` header of every request against
//! one configured user name and password. Both are compared in constant time
//! ([`subtle::ConstantTimeEq`]; only the lengths can leak), and both comparisons always run,
//! so the response time does not say which half was wrong. A missing or wrong header gets
//! `401` with `WWW-Authenticate: Basic realm="portcullis", charset="UTF-8"` (the browser
//! shows its login prompt) and the JSON rejection body `{"error":"unauthorized",...}`.
//! The credentials are never logged: [`Credentials`]'s `Debug` redacts them.

mod future;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::BasicAuthLayer;
pub use service::BasicAuth;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::HeaderMap;
use portcullis_core::{codes, Rejection};
use std::fmt;
use subtle::ConstantTimeEq;

/// The realm sent in `WWW-Authenticate`.
pub const REALM: &str = "portcullis";

/// The `WWW-Authenticate` challenge.
pub(crate) const CHALLENGE: &str = "Basic realm=\"portcullis\", charset=\"UTF-8\"";

/// The expected user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: Box<[u8]>,
    password: Box<[u8]>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

impl Credentials {
    /// The credentials a request must present.
    pub fn new(username: impl AsRef<str>, password: impl AsRef<str>) -> Self {
        Self {
            username: username.as_ref().as_bytes().into(),
            password: password.as_ref().as_bytes().into(),
        }
    }

    /// `true` when `headers` carry `Authorization: Basic` with these credentials.
    pub fn verify(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return false;
        };
        let Some(encoded) = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .map(|(_, rest)| rest.trim())
        else {
            return false;
        };
        let Ok(decoded) = STANDARD.decode(encoded) else {
            return false;
        };
        let (user, pass) = match decoded.iter().position(|&b| b == b':') {
            Some(i) => (&decoded[..i], &decoded[i + 1..]),
            None => (&decoded[..], &[][..]),
        };
        // Both comparisons always run; `&` on `Choice` does not short-circuit.
        let ok = user.ct_eq(&self.username) & pass.ct_eq(&self.password);
        bool::from(ok)
    }
}

/// The 401 rejection (`unauthorized`).
pub fn unauthorized() -> Rejection {
    Rejection::new(
        http::StatusCode::UNAUTHORIZED,
        codes::UNAUTHORIZED,
        "this route requires HTTP Basic credentials",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(v).unwrap(),
        );
        h
    }

    #[test]
    fn verifies_only_the_exact_pair() {
        let c = Credentials::new("admin", "pa:ss");
        let good = format!("Basic {}", STANDARD.encode("admin:pa:ss"));
        assert!(c.verify(&headers(&good)));
        assert!(c.verify(&headers(&good.replace("Basic", "basic"))));
        for bad in [
            "admin:pa",
            "admin:pa:ss ",
            "Admin:pa:ss",
            "admin",
            ":",
            "adminpa:ss",
        ] {
            assert!(
                !c.verify(&headers(&format!("Basic {}", STANDARD.encode(bad)))),
                "{bad}"
            );
        }
        assert!(!c.verify(&headers("Bearer abc")));
        assert!(!c.verify(&headers("Basic !!!notbase64")));
        assert!(!c.verify(&HeaderMap::new()));
        assert_eq!(format!("{c:?}"), "Credentials(<redacted>)");
    }
}

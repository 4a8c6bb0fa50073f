//! HS256 JWT verification: the one algorithm changegate accepts, checked strictly.
//!
//! A general JWT crate would pull RSA and elliptic-curve stacks into the build for a single
//! HMAC; this module verifies exactly what the contract allows — `alg: HS256`, a `tenant`
//! claim, a required `exp` and an optional `nbf` — with the well-kept `hmac`/`sha2` crates and a
//! constant-time signature check.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use changegate_core::TenantId;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

/// Why a token was refused. Messages are static: they never echo the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts of JSON.
    #[error("malformed JWT")]
    Malformed,
    /// `alg` is not `HS256` (this also refuses `none`).
    #[error("unsupported JWT algorithm; only HS256 is accepted")]
    Algorithm,
    /// The signature does not match the configured secret.
    #[error("JWT signature does not verify")]
    Signature,
    /// `exp` is missing or not a number.
    #[error("JWT has no numeric `exp` claim")]
    MissingExpiry,
    /// `exp` has passed.
    #[error("JWT has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("JWT is not valid yet (`nbf`)")]
    NotYetValid,
    /// `tenant` is missing or not a valid tenant id.
    #[error("JWT has no valid `tenant` claim")]
    Tenant,
    /// No secret is configured, so no JWT can be accepted.
    #[error("JWT authentication is not configured on this gateway (CHANGEGATE_JWT_SECRET)")]
    NotConfigured,
}

/// Verifies tokens signed with one shared secret.
#[derive(Clone)]
pub struct JwtVerifier {
    secret: Vec<u8>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtVerifier(..)")
    }
}

impl JwtVerifier {
    /// A verifier for tokens signed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        Self { secret: secret.to_vec() }
    }

    /// The tenant of a valid token at Unix time `now` (seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<TenantId, JwtError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: Value = decode_json(header)?;
        if header.get("alg").and_then(Value::as_str) != Some("HS256") {
            return Err(JwtError::Algorithm);
        }
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| JwtError::Malformed)?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).map_err(|_| JwtError::Signature)?;
        mac.update(&token.as_bytes()[..header_and_payload_len(token)]);
        mac.verify_slice(&signature).map_err(|_| JwtError::Signature)?;

        let claims: Value = decode_json(payload)?;
        let exp = claims.get("exp").and_then(Value::as_f64).ok_or(JwtError::MissingExpiry)?;
        // `now` is a whole second; a token whose `exp` is this second has expired (RFC 7519 4.1.4).
        if exp <= now as f64 {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf.as_f64().ok_or(JwtError::Malformed)?;
            if nbf > now as f64 {
                return Err(JwtError::NotYetValid);
            }
        }
        let tenant = claims.get("tenant").and_then(Value::as_str).ok_or(JwtError::Tenant)?;
        TenantId::parse(tenant).map_err(|_| JwtError::Tenant)
    }
}

fn header_and_payload_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(token.len())
}

fn decode_json(part: &str) -> Result<Value, JwtError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| JwtError::Malformed)?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    if value.is_object() { Ok(value) } else { Err(JwtError::Malformed) }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sign(header: &Value, claims: &Value, secret: &[u8]) -> String {
        let h = URL_SAFE_NO_PAD.encode(header.to_string());
        let c = URL_SAFE_NO_PAD.encode(claims.to_string());
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{h}.{c}").as_bytes());
        let s = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{h}.{c}.{s}")
    }

    const NOW: u64 = 1_800_000_000;

    fn hs256() -> Value {
        json!({"alg": "HS256", "typ": "JWT"})
    }

    #[test]
    fn a_valid_token_yields_its_tenant() {
        let v = JwtVerifier::new(b"secret");
        let token = sign(&hs256(), &json!({"tenant": "acme", "exp": NOW + 60}), b"secret");
        assert_eq!(v.verify(&token, NOW), Ok(TenantId::parse("acme").unwrap()));
    }

    #[test]
    fn every_broken_token_is_refused_with_its_reason() {
        let v = JwtVerifier::new(b"secret");
        let ok = json!({"tenant": "acme", "exp": NOW + 60});
        let cases = [
            (sign(&hs256(), &ok, b"other"), JwtError::Signature),
            (sign(&json!({"alg": "none"}), &ok, b"secret"), JwtError::Algorithm),
            (sign(&json!({"alg": "HS512"}), &ok, b"secret"), JwtError::Algorithm),
            (sign(&hs256(), &json!({"tenant": "acme", "exp": NOW}), b"secret"), JwtError::Expired),
            (sign(&hs256(), &json!({"tenant": "acme"}), b"secret"), JwtError::MissingExpiry),
            (
                sign(&hs256(), &json!({"tenant": "acme", "exp": NOW + 60, "nbf": NOW + 10}), b"secret"),
                JwtError::NotYetValid,
            ),
            (sign(&hs256(), &json!({"exp": NOW + 60}), b"secret"), JwtError::Tenant),
            (sign(&hs256(), &json!({"tenant": "a b", "exp": NOW + 60}), b"secret"), JwtError::Tenant),
            ("a.b".to_owned(), JwtError::Malformed),
            ("a.b.c.d".to_owned(), JwtError::Malformed),
            ("!!.??.**".to_owned(), JwtError::Malformed),
        ];
        for (token, expected) in cases {
            assert_eq!(v.verify(&token, NOW), Err(expected), "{token}");
        }
    }

    #[test]
    fn a_tampered_payload_breaks_the_signature() {
        let v = JwtVerifier::new(b"secret");
        let token = sign(&hs256(), &json!({"tenant": "acme", "exp": NOW + 60}), b"secret");
        let forged = URL_SAFE_NO_PAD.encode(json!({"tenant": "evil", "exp": NOW + 60}).to_string());
        let parts: Vec<_> = token.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], forged, parts[2]);
        assert_eq!(v.verify(&tampered, NOW), Err(JwtError::Signature));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_text_is_refused_without_panicking(token in "\\PC{0,300}") {
            prop_assert!(JwtVerifier::new(b"secret").verify(&token, 1_800_000_000).is_err());
        }

        #[test]
        fn three_base64_parts_of_anything_are_refused_without_panicking(
            a in "[A-Za-z0-9_-]{0,60}", b in "[A-Za-z0-9_-]{0,60}", c in "[A-Za-z0-9_-]{0,60}"
        ) {
            let token = format!("{a}.{b}.{c}");
            prop_assert!(JwtVerifier::new(b"secret").verify(&token, 1_800_000_000).is_err());
        }
    }
}

//! Concertim's tokens: JWT signed with HS256 and the shared secret, carrying `exp` (Rails signs
//! `{"exp": now + 60}`). The signature is checked, unlike the Python service, which read only
//! `exp`: a token is accepted only when this secret signed it and it has not expired.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// Clock skew tolerated between Concertim's host and this one, in seconds.
pub const LEEWAY_S: i64 = 30;

/// Why a token is refused (said to the caller: none of it is secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `Authorization: Bearer …` header.
    #[error("no bearer token: send Authorization: Bearer <JWT signed with the shared secret>")]
    Missing,
    /// Not three base64url parts with JSON header and claims.
    #[error("the token is not a JWT")]
    Malformed,
    /// A header naming another algorithm (`none`, RS256 …).
    #[error("the token is signed with {0:?}; only HS256 is accepted")]
    Algorithm(String),
    /// The signature is not this secret's.
    #[error("the token's signature does not match the shared secret")]
    Signature,
    /// No numeric `exp` claim.
    #[error("the token has no exp claim")]
    NoExpiry,
    /// `exp` has passed.
    #[error("the token expired")]
    Expired,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    exp: Option<f64>,
}

/// Checks `token` against `secret` at `now` (unix seconds).
///
/// # Errors
/// As [`TokenError`], the first check that fails in this order: form, algorithm, signature,
/// expiry (so nothing of an unsigned token's claims is believed).
pub fn verify(token: &str, secret: &[u8], now: i64) -> Result<(), TokenError> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header: Header =
        b64.decode(header).ok().and_then(|h| serde_json::from_slice(&h).ok()).ok_or(TokenError::Malformed)?;
    if header.alg != "HS256" {
        return Err(TokenError::Algorithm(header.alg.chars().take(16).collect()));
    }
    let signature = b64.decode(signature).map_err(|_| TokenError::Malformed)?;
    let signed_len = token.len() - signature_text_len(token);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| TokenError::Signature)?;
    mac.update(&token.as_bytes()[..signed_len]);
    // Constant time: the comparison says nothing of how much of a forgery was right.
    mac.verify_slice(&signature).map_err(|_| TokenError::Signature)?;
    let claims: Claims =
        b64.decode(claims).ok().and_then(|c| serde_json::from_slice(&c).ok()).ok_or(TokenError::Malformed)?;
    let exp = claims.exp.filter(|e| e.is_finite()).ok_or(TokenError::NoExpiry)?;
    #[allow(clippy::cast_precision_loss)]
    if exp + LEEWAY_S as f64 <= now as f64 {
        return Err(TokenError::Expired);
    }
    Ok(())
}

/// The length of the signature part with its dot: what follows the signed text.
fn signature_text_len(token: &str) -> usize {
    token.rsplit('.').next().map_or(0, |s| s.len() + 1)
}

/// A token signed with `secret` carrying `claims` (tests, and `api token` for operators).
pub fn sign(claims: &serde_json::Value, secret: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = b64.encode(claims.to_string());
    let signed = format!("{header}.{claims}");
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key");
    mac.update(signed.as_bytes());
    format!("{signed}.{}", b64.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"a-shared-secret-of-concertim-0123456789";
    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_token_signed_with_the_secret_and_not_expired_is_accepted() {
        assert_eq!(verify(&sign(&json!({"exp": NOW + 60}), SECRET), SECRET, NOW), Ok(()));
    }

    #[test]
    fn a_token_signed_with_another_secret_is_refused() {
        let forged = sign(&json!({"exp": NOW + 60}), b"another-secret-entirely-0000000");
        assert_eq!(verify(&forged, SECRET, NOW), Err(TokenError::Signature));
    }

    #[test]
    fn an_expired_token_is_refused_past_the_leeway_only() {
        let token = sign(&json!({"exp": NOW - 10}), SECRET);
        assert_eq!(verify(&token, SECRET, NOW), Ok(()));
        let token = sign(&json!({"exp": NOW - LEEWAY_S - 1}), SECRET);
        assert_eq!(verify(&token, SECRET, NOW), Err(TokenError::Expired));
    }

    #[test]
    fn claims_changed_after_signing_break_the_signature() {
        let token = sign(&json!({"exp": NOW - 600}), SECRET);
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json!({"exp": NOW + 600}).to_string());
        assert_eq!(verify(&parts.join("."), SECRET, NOW), Err(TokenError::Signature));
    }

    #[test]
    fn an_unsigned_token_or_one_without_expiry_is_refused() {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!("{}.{}.", b64.encode(r#"{"alg":"none"}"#), b64.encode(json!({"exp": NOW + 60}).to_string()));
        assert_eq!(verify(&none, SECRET, NOW), Err(TokenError::Algorithm("none".into())));
        assert_eq!(verify(&sign(&json!({"sub": "x"}), SECRET), SECRET, NOW), Err(TokenError::NoExpiry));
        for junk in ["", "a.b", "a.b.c.d", "!!.??.**"] {
            assert_eq!(verify(junk, SECRET, NOW), Err(TokenError::Malformed), "{junk}");
        }
    }
}

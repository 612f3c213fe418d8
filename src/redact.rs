//! Credential redaction for the operator tools (`capture`, `dlq show`, `dlq export`).
//!
//! oslo.messaging before 14.4.0 flattened the whole request context into each message, so old
//! captures carry `_context_auth_token`, and Heat's even `_context_password`. Those values are
//! replaced by `***` in the oslo message (inside the 2.0 envelope or bare). A body without such a
//! field is returned byte for byte.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// What a redacted value becomes.
pub const REDACTED: &str = "***";

/// Whether a message key holds a credential.
pub fn is_credential(key: &str) -> bool {
    let key = key.trim_start_matches("_context_").to_ascii_lowercase();
    ["auth_token", "password", "secret", "aws_creds", "token_info", "api_key"].iter().any(|c| key.contains(c))
}

fn redact_map(map: &mut Map<String, Value>) -> bool {
    let mut changed = false;
    for (key, value) in map.iter_mut() {
        if is_credential(key) && !value.is_null() && value != REDACTED {
            *value = Value::String(REDACTED.to_owned());
            changed = true;
        }
    }
    changed
}

/// The body with credential fields replaced, or the body itself when it has none (or is not
/// an oslo message at all).
pub fn redact(body: &[u8]) -> Cow<'_, [u8]> {
    let Ok(Value::Object(mut outer)) = serde_json::from_slice::<Value>(body) else { return Cow::Borrowed(body) };
    let changed = match outer.get("oslo.message").and_then(Value::as_str) {
        Some(inner) => match serde_json::from_str::<Value>(inner) {
            Ok(Value::Object(mut message)) => {
                let changed = redact_map(&mut message);
                if changed {
                    outer.insert("oslo.message".to_owned(), Value::String(Value::Object(message).to_string()));
                }
                changed
            }
            _ => false,
        },
        None => redact_map(&mut outer),
    };
    if changed {
        Cow::Owned(Value::Object(outer).to_string().into_bytes())
    } else {
        Cow::Borrowed(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_passwords_are_replaced_inside_the_envelope() {
        let inner =
            r#"{"_context_auth_token":"abc123","_context_password":"pw","_context_user_id":"u","event_type":"x"}"#;
        let body = serde_json::json!({"oslo.version": "2.0", "oslo.message": inner}).to_string();
        let out = String::from_utf8(redact(body.as_bytes()).into_owned()).unwrap();
        assert!(!out.contains("abc123") && !out.contains("\\\"pw\\\""), "{out}");
        assert!(out.contains("_context_user_id"));
    }

    #[test]
    fn a_body_without_credentials_is_returned_byte_for_byte() {
        let body = br#"{"message_id": "m",  "event_type":"x", "_context_auth_token": null}"#;
        assert!(matches!(redact(body), Cow::Borrowed(b) if b == body));
        assert!(matches!(redact(b"not json"), Cow::Borrowed(_)));
    }

    #[test]
    fn bare_messages_are_redacted_too() {
        let out = redact(br#"{"_context_auth_token":"t0k3n","event_type":"x"}"#).into_owned();
        assert!(!String::from_utf8(out).unwrap().contains("t0k3n"));
    }
}

//! Credential redaction and safe printing for the operator tools (`capture`, `dlq show`,
//! `dlq export`) and the text log.
//!
//! oslo.messaging before 14.4.0 flattened the whole request context into each message, so old
//! captures carry `_context_auth_token`, Heat's even `_context_password`, and instance metadata
//! can hold anything (`admin_pass`, an `auth_token`). The bodies worth redacting are often the
//! ones that do not parse (Python writes `NaN`), so redaction does not parse: it scans the raw
//! bytes for `"key": value` pairs at every depth and at every level of JSON-in-a-string (the oslo
//! 2.0 envelope carries the message as an escaped string), and replaces the value of every
//! credential key — every occurrence, duplicates included — by `"***"` written at the same
//! escape level. A body without such a pair is returned byte for byte.

use std::borrow::Cow;

/// What a redacted value becomes.
pub const REDACTED: &str = "***";

/// Whether a message key holds a credential (case-insensitive, `_context_` prefix ignored):
/// tokens of every kind (`auth_token`, `service_token`, `keystone_token`, `token_info`),
/// passwords (`password`, `admin_pass`, `passwd`), secrets, credentials and keys (`api_key`,
/// `private_key`).
pub fn is_credential(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    let key = key.trim_start_matches("_context_");
    ["token", "password", "passwd", "_pass", "secret", "cred", "api_key", "private_key", "access_key"]
        .iter()
        .any(|c| key.contains(c))
        || key == "pass"
}

/// The number of backslashes that precede a quote at nesting level `level` (JSON inside a
/// string inside JSON …): 0, 1, 3, 7, …
fn quote_escapes(level: u32) -> usize {
    (1usize << level) - 1
}

/// The escape level of a quote preceded by `run` backslashes, when it opens or closes a
/// string at some level (and is not an escaped quote inside one).
fn level_of(run: usize) -> Option<u32> {
    (0..6).find(|&l| quote_escapes(l) == run)
}

/// Whether a quote preceded by `run` backslashes closes a string of level `level`: an even
/// number of escaped backslashes (at that level) before the level's own escape.
fn closes(run: usize, level: u32) -> bool {
    let base = quote_escapes(level);
    run >= base && (run - base).is_multiple_of(1usize << (level + 1))
}

fn backslashes_before(body: &[u8], at: usize) -> usize {
    body[..at].iter().rev().take_while(|&&b| b == b'\\').count()
}

/// The end (exclusive) of the string at `level` whose opening quote is at `open`, or the end
/// of the body when it is cut short.
fn string_end(body: &[u8], open: usize, level: u32) -> usize {
    string_end_within(body, open, level, usize::MAX).unwrap_or(body.len())
}

/// The end of that string when it closes within `max` bytes. Key candidates are looked for
/// only that far, so scanning stays linear however the quotes of a hostile body are spread.
fn string_end_within(body: &[u8], open: usize, level: u32, max: usize) -> Option<usize> {
    let last = body.len().min(open.saturating_add(max));
    (open + 1..last).find(|&i| body[i] == b'"' && closes(backslashes_before(body, i), level)).map(|i| i + 1)
}

/// Keys longer than this are not looked at (no credential key is).
const MAX_KEY: usize = 256;

/// The key text of a candidate key string, decoding escapes loosely (a `\u0061` spelling must
/// not hide `auth_token`), or `None` when the string has quotes of another level inside it.
fn key_text(raw: &[u8]) -> Option<String> {
    let mut key = String::new();
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'"' => return None,
            b'\\' => {
                while i < raw.len() && raw[i] == b'\\' {
                    i += 1;
                }
                match raw.get(i) {
                    Some(b'u') => {
                        let hex = raw.get(i + 1..i + 5).and_then(|h| std::str::from_utf8(h).ok());
                        let c = hex.and_then(|h| u32::from_str_radix(h, 16).ok()).and_then(char::from_u32);
                        key.push(c.unwrap_or('?'));
                        i += 5;
                    }
                    Some(b'"') => return None,
                    Some(&c) => {
                        key.push(char::from(c));
                        i += 1;
                    }
                    None => {}
                }
            }
            c => {
                key.push(char::from(c));
                i += 1;
            }
        }
    }
    Some(key)
}

/// Skips JSON whitespace, also when it is escaped inside a string (`\n` at any level).
fn skip_space(body: &[u8], mut i: usize) -> usize {
    loop {
        match body.get(i) {
            Some(b' ' | b'\t' | b'\r' | b'\n') => i += 1,
            Some(b'\\') => {
                let run = body[i..].iter().take_while(|&&b| b == b'\\').count();
                match body.get(i + run) {
                    Some(b'n' | b't' | b'r') => i += run + 1,
                    _ => return i,
                }
            }
            _ => return i,
        }
    }
}

/// The end (exclusive) of the value starting at `start` (after its escape backslashes, if any)
/// at `level`, for a value that is not `null`: a string, an object or array (brackets matched,
/// strings of that level skipped), or a bare word (number, `true`, garbage such as `NaN`).
fn value_end(body: &[u8], start: usize, level: u32) -> usize {
    let first = body[start];
    if first == b'"' {
        return string_end(body, start, level);
    }
    if first == b'{' || first == b'[' {
        let mut depth = 0usize;
        let mut i = start;
        while i < body.len() {
            match body[i] {
                b'"' if backslashes_before(body, i) == quote_escapes(level) => i = string_end(body, i, level) - 1,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        return body.len();
    }
    let word = body[start..]
        .iter()
        .position(|b| matches!(b, b',' | b'}' | b']' | b'"' | b'\\' | b' ' | b'\n' | b'\r' | b'\t'));
    word.map_or(body.len(), |n| start + n)
}

/// The body with every credential value replaced by `"***"`, or the body itself when it has
/// none. Works on any bytes: JSON or not, complete or cut short, valid UTF-8 or not.
pub fn redact(body: &[u8]) -> Cow<'_, [u8]> {
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < body.len() {
        if body[i] != b'"' {
            i += 1;
            continue;
        }
        let Some(level) = level_of(backslashes_before(body, i)) else {
            i += 1;
            continue;
        };
        let Some(end) = string_end_within(body, i, level, MAX_KEY) else {
            i += 1;
            continue;
        };
        let close = end - 1 - quote_escapes(level);
        let key = (close > i).then(|| key_text(&body[i + 1..close])).flatten();
        if !key.is_some_and(|k| is_credential(&k)) {
            i += 1;
            continue;
        };
        let colon = skip_space(body, end);
        if body.get(colon) != Some(&b':') {
            i += 1;
            continue;
        }
        let mut value = skip_space(body, colon + 1);
        let escapes = quote_escapes(level);
        if body.get(value + escapes) == Some(&b'"') && body[value..value + escapes].iter().all(|&b| b == b'\\') {
            value += escapes;
        }
        if value >= body.len() || body[value..].starts_with(b"null") {
            i = end;
            continue;
        }
        let value_start = if body[value] == b'"' { value - escapes } else { value };
        let value_end = value_end(body, value, level);
        let already = {
            let escaped = format!("{0}\"{REDACTED}{0}\"", "\\".repeat(escapes));
            &body[value_start..value_end] == escaped.as_bytes()
        };
        if !already {
            let out = out.get_or_insert_with(|| Vec::with_capacity(body.len()));
            out.extend_from_slice(&body[copied..value_start]);
            out.extend_from_slice("\\".repeat(escapes).as_bytes());
            out.push(b'"');
            out.extend_from_slice(REDACTED.as_bytes());
            out.extend_from_slice("\\".repeat(escapes).as_bytes());
            out.push(b'"');
            copied = value_end;
        }
        i = value_end.max(i + 1);
    }
    match out {
        Some(mut out) => {
            out.extend_from_slice(&body[copied..]);
            Cow::Owned(out)
        }
        None => Cow::Borrowed(body),
    }
}

/// Text safe to print on a terminal or in a log line: control characters (escape sequences,
/// carriage returns, newlines), line and paragraph separators and bidirectional overrides are
/// written as `\u{…}`-style escapes, so a message cannot move the cursor, retitle the terminal
/// or start a forged log line.
pub fn printable(text: &str) -> Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Creates (or truncates) a file only its owner can read (`0600`): captures and exports hold
/// message bodies, and those hold user data even when credentials are redacted.
///
/// # Errors
/// When the file cannot be created or its mode cannot be set.
pub fn create_private(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path)?;
    // An existing file keeps its mode on open: narrow it too.
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redacted(body: &str) -> String {
        String::from_utf8(redact(body.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn tokens_and_passwords_are_replaced_inside_the_envelope() {
        let inner =
            r#"{"_context_auth_token":"abc123","_context_password":"pw","_context_user_id":"u","event_type":"x"}"#;
        let body = serde_json::json!({"oslo.version": "2.0", "oslo.message": inner}).to_string();
        let out = redacted(&body);
        assert!(!out.contains("abc123") && !out.contains("\\\"pw\\\""), "{out}");
        assert!(out.contains("_context_user_id"));
        let outer: serde_json::Value = serde_json::from_str(&out).unwrap();
        let message: serde_json::Value = serde_json::from_str(outer["oslo.message"].as_str().unwrap()).unwrap();
        assert_eq!(message["_context_auth_token"], "***");
        assert_eq!(message["_context_user_id"], "u");
    }

    #[test]
    fn a_body_without_credentials_is_returned_byte_for_byte() {
        let body = br#"{"message_id": "m",  "event_type":"x", "_context_auth_token": null}"#;
        assert!(matches!(redact(body), Cow::Borrowed(b) if b == body));
        assert!(matches!(redact(b"not json"), Cow::Borrowed(_)));
    }

    #[test]
    fn bare_messages_are_redacted_too() {
        assert!(!redacted(r#"{"_context_auth_token":"t0k3n","event_type":"x"}"#).contains("t0k3n"));
    }

    #[test]
    fn service_and_keystone_tokens_and_nested_credentials_are_replaced_at_any_depth() {
        let inner = r#"{"_context_service_token":"SvcToken","_context_keystone_token":"KsTok","payload":{"metadata":{"auth_token":"MetaToken","admin_pass":"AdminPass","nested":[{"ctxt":{"auth_token":"NestedCtx"}}]}}}"#;
        let body = serde_json::json!({"oslo.version": "2.0", "oslo.message": inner}).to_string();
        let out = redacted(&body);
        for secret in ["SvcToken", "KsTok", "MetaToken", "AdminPass", "NestedCtx"] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        serde_json::from_str::<serde_json::Value>(&out).expect("still JSON");
    }

    #[test]
    fn bodies_that_do_not_parse_are_redacted_all_the_same() {
        let out = redacted(r#"{"_context_auth_token": "NanToken", "payload": {"volume": NaN}}"#);
        assert!(!out.contains("NanToken") && out.contains("NaN"), "{out}");
        let cut = redacted(r#"{"event_type":"x","_context_password":"CutShort"#);
        assert!(!cut.contains("CutShort"), "{cut}");
        let bytes = [br#"{"a":"#.as_slice(), &[0xff, 0xfe], br#"","password":"Bin4ry"}"#].concat();
        assert!(!String::from_utf8_lossy(&redact(&bytes)).contains("Bin4ry"));
    }

    #[test]
    fn every_duplicate_key_is_replaced_not_only_the_last() {
        let out = redacted(r#"{"_context_auth_token":"DupToken","_context_auth_token":null}"#);
        assert!(!out.contains("DupToken"), "{out}");
    }

    #[test]
    fn numbers_objects_and_escaped_spellings_of_credential_keys_are_replaced() {
        let out = redacted(
            r#"{"password": 83750291, "aws_creds": {"access": "AKIA", "x": ["}"]}, "\u0061uth_token": "Spelled", "after": 1}"#,
        );
        assert!(!out.contains("83750291") && !out.contains("AKIA") && !out.contains("Spelled"), "{out}");
        let value: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
        assert_eq!(value["after"], 1);
    }

    #[test]
    fn deeply_nested_bodies_are_redacted_without_recursion() {
        let body = format!("{}{{\"auth_token\":\"Deep\"}}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(!redacted(&body).contains("Deep"));
    }

    #[test]
    fn hostile_runs_of_quotes_and_backslashes_are_scanned_in_linear_time() {
        let body = "\\\\\\\"x".repeat(200_000);
        assert!(matches!(redact(body.as_bytes()), Cow::Borrowed(_)));
    }

    #[test]
    fn a_value_that_mentions_a_credential_is_not_taken_for_a_key() {
        let body = r#"{"reason":"password","x":"token"}"#;
        assert_eq!(redacted(body), body);
    }

    #[cfg(unix)]
    #[test]
    fn private_files_are_created_and_narrowed_to_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.jsonl");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(create_private(&path).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    #[test]
    fn control_characters_are_printed_escaped() {
        let shown = printable("not json \u{1b}]0;PWNED\u{7}\u{1b}[2J\r\nfake\u{2028}{x=\"1\"}");
        assert!(!shown.chars().any(|c| c.is_control() || c == '\u{2028}'), "{shown}");
        assert!(shown.contains("\\u{1b}]0;PWNED"), "{shown}");
        assert!(matches!(printable("plain ünïcode"), Cow::Borrowed(_)));
    }
}

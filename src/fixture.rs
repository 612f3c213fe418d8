//! Fixture files: captured deliveries, one per line (`.jsonl`), or one `.json` file holding a
//! delivery, an oslo envelope, or a bare notification.
//!
//! A delivery line is `{"exchange", "routing_key", "properties", "redelivered", "body"}`. The
//! body is the message as it was on the bus: a JSON string holds a body that was text (an oslo
//! 2.0 envelope is a JSON object, so it is usually written as that object), and any other JSON
//! value is the body's exact JSON text. Properties are kept byte for byte for tools that
//! publish fixtures back to a broker.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

/// One captured delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixtureDelivery {
    /// The exchange it was published to, when known.
    pub exchange: Option<String>,
    /// Its routing key, when known.
    pub routing_key: Option<String>,
    /// Its AMQP properties as captured (JSON text), when known.
    pub properties: Option<String>,
    /// Whether the broker flagged it as redelivered.
    pub redelivered: bool,
    /// The body, byte for byte.
    pub body: Vec<u8>,
}

/// Where a fixture came from: file and line (1-based; 0 for a whole `.json` file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The file.
    pub file: PathBuf,
    /// The line, or 0 for a whole-file fixture.
    pub line: usize,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{}:{}", self.file.display(), self.line)
        }
    }
}

/// Why a fixture could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// A path given on the command line does not exist or cannot be listed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A `.jsonl` line is not a delivery object.
    #[error(
        "not a captured delivery ({{\"exchange\", \"routing_key\", \"properties\", \"redelivered\", \"body\"}}): {0}"
    )]
    Line(String),
}

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(default)]
    exchange: Option<String>,
    #[serde(default)]
    routing_key: Option<String>,
    #[serde(default, borrow)]
    properties: Option<&'a RawValue>,
    #[serde(default)]
    redelivered: bool,
    #[serde(default, borrow)]
    body: Option<&'a RawValue>,
    /// A body that is not UTF-8 text, base64-encoded (standard alphabet, padded).
    #[serde(default)]
    body_base64: Option<String>,
}

impl Line<'_> {
    fn into_delivery(self) -> Result<FixtureDelivery, String> {
        use base64::Engine as _;
        let body = match (self.body, self.body_base64) {
            (Some(raw), None) if raw.get().starts_with('"') => {
                serde_json::from_str::<String>(raw.get()).map_err(|e| e.to_string())?.into_bytes()
            }
            (Some(raw), None) => raw.get().as_bytes().to_vec(),
            (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| format!("body_base64 is not base64: {e}"))?,
            (Some(_), Some(_)) => return Err("both body and body_base64: give one".into()),
            (None, None) => return Err("missing field `body`".into()),
        };
        Ok(FixtureDelivery {
            exchange: self.exchange,
            routing_key: self.routing_key,
            properties: self.properties.map(|p| p.get().to_owned()),
            redelivered: self.redelivered,
            body,
        })
    }
}

/// One fixture line (JSON Lines) for a delivery: a body that is single-line JSON is embedded as
/// JSON, other UTF-8 text as a string, anything else as `body_base64`, so that reading the line
/// back gives the same bytes.
pub fn to_line(delivery: &FixtureDelivery) -> String {
    use base64::Engine as _;
    #[derive(serde::Serialize)]
    struct Out<'a> {
        exchange: &'a Option<String>,
        routing_key: &'a Option<String>,
        properties: Option<&'a RawValue>,
        redelivered: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        body: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        body_base64: Option<String>,
    }
    let properties: Option<Box<RawValue>> =
        delivery.properties.as_ref().and_then(|p| RawValue::from_string(p.clone()).ok());
    let text = std::str::from_utf8(&delivery.body).ok();
    let raw_json: Option<Box<RawValue>> = text
        .filter(|t| !t.contains('\n') && !t.contains('\r') && !t.trim().is_empty())
        .filter(|t| t.trim_start().starts_with(['{', '[']) && serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok())
        .and_then(|t| RawValue::from_string(t.to_owned()).ok());
    let as_string: Option<Box<RawValue>> = match (&raw_json, text) {
        (None, Some(t)) => serde_json::to_string(t).ok().and_then(|s| RawValue::from_string(s).ok()),
        _ => None,
    };
    let body = raw_json.as_deref().or(as_string.as_deref());
    let body_base64 = body.is_none().then(|| base64::engine::general_purpose::STANDARD.encode(&delivery.body));
    let out = Out {
        exchange: &delivery.exchange,
        routing_key: &delivery.routing_key,
        properties: properties.as_deref(),
        redelivered: delivery.redelivered,
        body,
        body_base64,
    };
    // Strings, a bool and raw JSON that was valid when made: serialising cannot fail.
    serde_json::to_string(&out).expect("a fixture line serialises")
}

/// Parses one `.jsonl` line.
///
/// # Errors
/// [`FixtureError::Line`] when the line is not a delivery object.
pub fn parse_line(line: &str) -> Result<FixtureDelivery, FixtureError> {
    let parsed: Line<'_> = serde_json::from_str(line).map_err(|e| FixtureError::Line(e.to_string()))?;
    parsed.into_delivery().map_err(FixtureError::Line)
}

/// Reads a whole `.json` file: a delivery object when it has a `body` and an `exchange` or
/// `routing_key`, otherwise the file itself is the body (an envelope or a bare notification,
/// or anything else, which decoding will call invalid).
pub fn parse_whole(bytes: &[u8]) -> FixtureDelivery {
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(default, borrow)]
        body: Option<&'a RawValue>,
        #[serde(default, borrow)]
        exchange: Option<&'a RawValue>,
        #[serde(default, borrow)]
        routing_key: Option<&'a RawValue>,
    }
    let looks_like_delivery = serde_json::from_slice::<Probe<'_>>(bytes)
        .is_ok_and(|p| p.body.is_some() && (p.exchange.is_some() || p.routing_key.is_some()));
    if looks_like_delivery {
        if let Ok(delivery) = std::str::from_utf8(bytes).map_err(|_| ()).and_then(|t| parse_line(t).map_err(|_| ())) {
            return delivery;
        }
    }
    FixtureDelivery { exchange: None, routing_key: None, properties: None, redelivered: false, body: bytes.to_vec() }
}

/// Expands the command line's paths into fixture files: files as given, folders recursively
/// (`.json` and `.jsonl` files only), each folder in name order so replays are repeatable.
///
/// # Errors
/// When a path does not exist or a folder cannot be listed.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, FixtureError> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|source| FixtureError::Io { path: path.clone(), source })?;
        if meta.is_dir() {
            walk(path, &mut files)?;
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), FixtureError> {
    let io = |source| FixtureError::Io { path: dir.to_owned(), source };
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(io)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>().map_err(io)?;
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            walk(&entry, files)?;
        } else if matches!(entry.extension().and_then(|e| e.to_str()), Some("json" | "jsonl")) {
            files.push(entry);
        }
    }
    Ok(())
}

/// Every fixture of `files`, in order, with its position. A file that cannot be read is one
/// [`FixtureError::Io`] at line 0; a `.jsonl` line that is not a delivery is a
/// [`FixtureError::Line`] at its line; blank lines are skipped.
pub fn read_all(files: &[PathBuf]) -> Vec<(Position, Result<FixtureDelivery, FixtureError>)> {
    let mut out = Vec::new();
    for file in files {
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(source) => {
                out.push((
                    Position { file: file.clone(), line: 0 },
                    Err(FixtureError::Io { path: file.clone(), source }),
                ));
                continue;
            }
        };
        if is_whole_file(file) {
            out.push((Position { file: file.clone(), line: 0 }, Ok(parse_whole(&bytes))));
            continue;
        }
        for (index, line) in String::from_utf8_lossy(&bytes).lines().enumerate() {
            if !line.trim().is_empty() {
                out.push((Position { file: file.clone(), line: index + 1 }, parse_line(line)));
            }
        }
    }
    out
}

/// Whether a file holds one fixture (`.json`) rather than one per line.
pub fn is_whole_file(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_body_is_the_text_and_an_object_body_is_its_exact_json() {
        let d = parse_line(r#"{"exchange":"nova","routing_key":"notifications.info","body":"{\"a\": 1}"}"#).unwrap();
        assert_eq!(d.body, br#"{"a": 1}"#);
        let d = parse_line(r#"{"exchange":"nova","body":{"a":  1.50}}"#).unwrap();
        assert_eq!(d.body, br#"{"a":  1.50}"#);
        assert_eq!(d.exchange.as_deref(), Some("nova"));
    }

    #[test]
    fn every_body_survives_a_round_trip_through_a_line() {
        let bodies: [&[u8]; 5] =
            [br#"{"a":  1.50}"#, b"plain text", b"{\n  \"pretty\": true\n}", b"\xff\xfe binary", b""];
        for body in bodies {
            let d = FixtureDelivery {
                exchange: Some("nova".into()),
                routing_key: Some("notifications.info".into()),
                properties: Some(r#"{"content_type":"application/json"}"#.into()),
                redelivered: true,
                body: body.to_vec(),
            };
            let line = to_line(&d);
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(parse_line(&line).unwrap(), d, "{line}");
        }
    }

    #[test]
    fn a_line_without_a_body_is_not_a_delivery() {
        let err = parse_line(r#"{"exchange":"nova"}"#).unwrap_err().to_string();
        assert!(err.contains("missing field `body`"), "{err}");
        assert!(parse_line("not json").is_err());
    }

    #[test]
    fn a_whole_file_is_a_delivery_only_when_it_looks_like_one() {
        let d = parse_whole(br#"{"routing_key":"metering.sample","redelivered":true,"body":{"x":1}}"#);
        assert_eq!(d.body, br#"{"x":1}"#);
        assert!(d.redelivered);
        let envelope = br#"{"oslo.version":"2.0","oslo.message":"{}"}"#;
        assert_eq!(parse_whole(envelope).body, envelope);
        assert_eq!(parse_whole(b"\xff garbage").body, b"\xff garbage");
    }
}

//! Decoding: bytes off the bus → [`Notification`] (envelope facts + typed [`Event`]).
//!
//! Owns every OpenStack wire format: the oslo.messaging 2.0 envelope (`oslo.message` is a JSON
//! string inside JSON) and bare 1.0 messages, and the payloads of Keystone, Nova, Ceilometer,
//! Heat, Cinder, Neutron (floating IPs) and Glance. Pure: no I/O, no clock. Everything it cannot interpret is a [`DecodeError`], whose class
//! is always *invalid*; event types nobody handles decode to [`Event::Ignored`], not an error.
//! Nothing outside this module sees `serde_json::Value`.

mod ceilometer;
mod envelope;
mod heat;
mod keystone;
mod nova;
mod one_pass;
mod resources;

use envelope::usual_envelope;
use one_pass::OnePass;

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

pub use crate::config::{DecodeLimits, DEFAULT_MAX_BODY_BYTES};
use crate::event::{Event, MessageId, Meta, Notification, Timestamp, TimestampError, ValueError};

/// Why a body could not be decoded. Every variant is of class *invalid*: retrying cannot help,
/// so the message is dead-lettered with this text as its reason.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The body is larger than the configured limit.
    #[error("body is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Body size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// Some JSON layer could not be parsed (or had the wrong type in a field).
    #[error("{layer} is not valid: {source}")]
    Json {
        /// Which layer: `body`, `oslo.message`, or `payload of <event type>`.
        layer: String,
        /// The parser's error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The envelope names an oslo version this decoder does not know.
    #[error("oslo.version {0:?} is not supported (only 2.x envelopes and bare 1.0 messages)")]
    UnsupportedVersion(String),
    /// A field every notification must carry is absent.
    #[error("missing {0}")]
    Missing(&'static str),
    /// An id or name failed validation.
    #[error("{field}: {source}")]
    Value {
        /// The field that held it.
        field: &'static str,
        /// What was wrong.
        #[source]
        source: ValueError,
    },
    /// A payload that is valid JSON but not of the shape its service sends.
    #[error("{layer} is not {expected}")]
    Shape {
        /// Which layer, e.g. `payload of compute.instance.create.end`.
        layer: String,
        /// What it should have been.
        expected: &'static str,
    },
    /// A timestamp field held something that is not a timestamp.
    #[error("{field}: {source}")]
    Timestamp {
        /// The field that held it.
        field: &'static str,
        /// What was wrong.
        #[source]
        source: TimestampError,
    },
}

impl DecodeError {
    fn json(layer: impl Into<String>, source: serde_json::Error) -> Self {
        DecodeError::Json { layer: layer.into(), source }
    }
}

/// The oslo message dict, as found either inside `oslo.message` or as the whole body (1.0).
/// Unknown keys (`_unique_id`, most `_context_*`) are skipped without being parsed into values;
/// the caller's project id and name are kept (a project's name, for `projects.include_names`).
#[derive(Deserialize, Default)]
struct Wire<'a> {
    #[serde(rename = "oslo.version", default, borrow)]
    oslo_version: Option<Cow<'a, str>>,
    #[serde(rename = "oslo.message", default, borrow)]
    oslo_message: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    event_type: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    publisher_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    priority: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    payload: Option<&'a RawValue>,
    #[serde(rename = "_context_project_id", default, borrow)]
    context_project_id: Option<Cow<'a, str>>,
    #[serde(rename = "_context_project_name", default, borrow)]
    context_project_name: Option<Cow<'a, str>>,
}

/// Decodes one message body into a notification.
///
/// Accepts the oslo.messaging 2.0 envelope (`{"oslo.version": "2.0", "oslo.message": "<json>"}`)
/// and bare 1.0 messages (the message dict itself), as oslo's own consumer does.
///
/// # Errors
/// [`DecodeError`] when the body is over the size limit, is not JSON, has no `message_id`,
/// `event_type` or `timestamp`, or a handled event's payload is not of the shape its service
/// sends.
pub fn decode(body: &[u8], limits: DecodeLimits) -> Result<Notification, DecodeError> {
    if body.len() > limits.max_body_bytes {
        return Err(DecodeError::TooLarge { size: body.len(), limit: limits.max_body_bytes });
    }
    if let Some((version, message)) = usual_envelope(body) {
        return decode_envelope(&version, &message);
    }
    let outer: Wire<'_> = serde_json::from_slice(body).map_err(|e| DecodeError::json("body", e))?;
    match (&outer.oslo_version, &outer.oslo_message) {
        (Some(version), Some(message)) => decode_envelope(version, message),
        (None, Some(_)) => Err(DecodeError::Missing("oslo.version")),
        (Some(_), None) => Err(DecodeError::Missing("oslo.message")),
        (None, None) => decode_message(outer),
    }
}

/// The inner message of a 2.x envelope.
fn decode_envelope(version: &str, message: &str) -> Result<Notification, DecodeError> {
    if !(version == "2.0" || version.starts_with("2.")) {
        return Err(DecodeError::UnsupportedVersion(version.chars().take(32).collect()));
    }
    if let Ok(OnePass { wire, event }) = serde_json::from_str::<OnePass<'_>>(message) {
        return decode_message_with(wire, event);
    }
    let inner: Wire<'_> = serde_json::from_str(message).map_err(|e| DecodeError::json("oslo.message", e))?;
    if inner.oslo_message.is_some() {
        return Err(DecodeError::Missing("event_type (oslo.message holds another envelope)"));
    }
    decode_message(inner)
}

/// Where a service decoder reads its payload from.
pub(crate) trait Source<'de> {
    /// The payload as `T`; it must be a JSON object.
    fn object<T: Deserialize<'de>>(self) -> Result<T, PayloadError>;
    /// The payload as `T`, whatever its JSON type.
    fn any<T: Deserialize<'de>>(self) -> Result<T, PayloadError>;
}

/// A payload already delimited: parsed from its text.
impl<'de> Source<'de> for &'de RawValue {
    fn object<T: Deserialize<'de>>(self) -> Result<T, PayloadError> {
        object(self)
    }
    fn any<T: Deserialize<'de>>(self) -> Result<T, PayloadError> {
        Ok(serde_json::from_str(self.get())?)
    }
}

fn decode_message(wire: Wire<'_>) -> Result<Notification, DecodeError> {
    decode_message_with(wire, None)
}

/// Checks the envelope fields and decodes the payload, unless its event was decoded already.
fn decode_message_with(wire: Wire<'_>, event: Option<Event>) -> Result<Notification, DecodeError> {
    let event_type = wire.event_type.ok_or(DecodeError::Missing("event_type"))?;
    if event_type.is_empty() {
        return Err(DecodeError::Missing("event_type"));
    }
    let message_id = wire.message_id.ok_or(DecodeError::Missing("message_id"))?;
    let message_id = MessageId::parse(message_id.into_owned())
        .map_err(|source| DecodeError::Value { field: "message_id", source })?;
    let timestamp = wire.timestamp.ok_or(DecodeError::Missing("timestamp"))?;
    let timestamp =
        Timestamp::parse(&timestamp).map_err(|source| DecodeError::Timestamp { field: "timestamp", source })?;
    let event = match event {
        Some(event) => event,
        None => decode_event(&event_type, wire.payload)?,
    };
    // The caller's project name is the event's project's only when the caller acted in it.
    let project_name = match (&wire.context_project_id, &wire.context_project_name, event.project()) {
        (Some(id), Some(name), Some(project)) if id.as_ref() == project.as_str() && !name.is_empty() => {
            Some(bounded(name, 255))
        }
        _ => None,
    };
    Ok(Notification {
        meta: Meta {
            message_id,
            event_type: bounded(&event_type, 255),
            publisher_id: bounded(wire.publisher_id.as_deref().unwrap_or_default(), 255),
            priority: bounded(wire.priority.as_deref().unwrap_or_default(), 16).to_ascii_uppercase(),
            timestamp,
            project_name,
        },
        event,
    })
}

/// Routes by event type to the service decoders. The payload is parsed only for handled types,
/// so ignored traffic costs one envelope parse.
fn decode_event(event_type: &str, payload: Option<&RawValue>) -> Result<Event, DecodeError> {
    let Some(service) = service_of(event_type) else {
        return Ok(Event::Ignored { reason: "unhandled event type" });
    };
    let Some(payload) = payload else {
        return Err(DecodeError::Missing("payload"));
    };
    decode_service(service, event_type, payload).map_err(|e| e.into_decode(event_type))
}

/// The service whose decoder reads this event type, if any.
fn service_of(event_type: &str) -> Option<Service<'_>> {
    Some(if let Some(rest) = event_type.strip_prefix("identity.") {
        Service::Keystone(rest)
    } else if let Some(rest) = event_type.strip_prefix("compute.instance.") {
        Service::NovaLegacy(rest)
    } else if let Some(rest) = event_type.strip_prefix("instance.") {
        Service::NovaVersioned(rest)
    } else if event_type == "metering" || event_type == "telemetry.polling" {
        Service::Ceilometer
    } else if let Some(rest) = event_type.strip_prefix("orchestration.stack.") {
        Service::Heat(rest)
    } else if resources::step_of(event_type).is_some() {
        Service::Resources
    } else {
        return None;
    })
}

/// Runs the service's decoder on the payload.
fn decode_service<'de>(
    service: Service<'_>,
    event_type: &str,
    payload: impl Source<'de>,
) -> Result<Event, PayloadError> {
    match service {
        Service::Keystone(rest) => keystone::decode_from(rest, payload),
        Service::NovaLegacy(rest) => nova::decode_legacy_from(rest, payload),
        Service::NovaVersioned(rest) => nova::decode_versioned_from(rest, payload),
        Service::Ceilometer => ceilometer::decode_from(event_type, payload),
        Service::Heat(rest) => heat::decode_from(rest, payload),
        Service::Resources => resources::decode_from(event_type, payload),
    }
}

enum Service<'a> {
    Keystone(&'a str),
    NovaLegacy(&'a str),
    NovaVersioned(&'a str),
    Ceilometer,
    Heat(&'a str),
    /// Cinder, Neutron floating IP and Glance steps.
    Resources,
}

/// What a service decoder can fail with; the JSON variant gets its layer name from the caller.
pub(crate) enum PayloadError {
    Json(serde_json::Error),
    Shape(&'static str),
    Other(DecodeError),
}

impl PayloadError {
    fn into_decode(self, event_type: &str) -> DecodeError {
        let layer = || format!("payload of {}", bounded(event_type, 80));
        match self {
            PayloadError::Json(source) => DecodeError::Json { layer: layer(), source },
            PayloadError::Shape(expected) => DecodeError::Shape { layer: layer(), expected },
            PayloadError::Other(e) => e,
        }
    }
}

impl From<serde_json::Error> for PayloadError {
    fn from(e: serde_json::Error) -> Self {
        PayloadError::Json(e)
    }
}

impl From<DecodeError> for PayloadError {
    fn from(e: DecodeError) -> Self {
        PayloadError::Other(e)
    }
}

/// Parses a payload that must be a JSON object. serde's derived structs would also accept a
/// JSON array (field by position), which no OpenStack service sends.
pub(crate) fn object<'de, T: Deserialize<'de>>(raw: &'de RawValue) -> Result<T, PayloadError> {
    if !raw.get().trim_start().starts_with('{') {
        return Err(PayloadError::Shape("a JSON object"));
    }
    Ok(serde_json::from_str(raw.get())?)
}

/// Builds a validated id, naming the field on failure.
pub(crate) fn id<T>(
    field: &'static str,
    value: Option<String>,
    parse: fn(String) -> Result<T, ValueError>,
) -> Result<T, PayloadError> {
    let value = value.ok_or(DecodeError::Missing(field))?;
    parse(value).map_err(|source| PayloadError::Other(DecodeError::Value { field, source }))
}

/// Parses an optional timestamp field (`""`, `"None"` and absent mean unset).
pub(crate) fn opt_time(field: &'static str, value: Option<&str>) -> Result<Option<Timestamp>, PayloadError> {
    match value {
        None => Ok(None),
        Some(text) => Timestamp::parse_optional(text)
            .map_err(|source| PayloadError::Other(DecodeError::Timestamp { field, source })),
    }
}

/// Text copied into the domain is bounded, so a hostile message cannot inflate logs or headers.
pub(crate) fn bounded(text: &str, max_chars: usize) -> String {
    // A text of at most `max_chars` bytes has at most that many characters: copied whole.
    if text.len() <= max_chars {
        return text.to_owned();
    }
    text.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::{envelope::first_special, *};

    fn envelope(message: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"oslo.version": "2.0", "oslo.message": message})).unwrap()
    }

    const BARE: &str = r#"{"message_id":"m-1","event_type":"identity.project.created","priority":"INFO",
        "publisher_id":"identity.host","timestamp":"2025-08-18 10:38:07.168945",
        "payload":{"resource_info":"148f2f86b96440a1ba0934f837b2c77b"}}"#;

    #[test]
    fn envelope_and_bare_message_decode_to_the_same_notification() {
        let bare = decode(BARE.as_bytes(), DecodeLimits::default()).unwrap();
        let wrapped = decode(&envelope(BARE), DecodeLimits::default()).unwrap();
        assert_eq!(bare, wrapped);
        assert_eq!(bare.meta.message_id.as_str(), "m-1");
    }

    #[test]
    fn unknown_event_types_are_ignored_without_reading_the_payload() {
        let body = br#"{"message_id":"m","event_type":"port.create.end","timestamp":"2016-03-07T16:23:08+00:00","payload":"not even an object"}"#;
        let n = decode(body, DecodeLimits::default()).unwrap();
        assert!(matches!(n.event, Event::Ignored { .. }));
    }

    /// What serde reads of an envelope: its version and message, when it reads both.
    fn serde_envelope(body: &[u8]) -> Option<(String, String)> {
        let wire: Wire<'_> = serde_json::from_slice(body).ok()?;
        Some((wire.oslo_version?.into_owned(), wire.oslo_message?.into_owned()))
    }

    #[test]
    fn the_one_pass_envelope_reader_reads_what_serde_reads_or_leaves_it_to_serde() {
        let cases: [&[u8]; 14] = [
            br#"{"oslo.version": "2.0", "oslo.message": "{\"a\": \"b\\n\\\"c\"}"}"#,
            br#"{"oslo.message":"x\/y\b\f\n\r\t\\","oslo.version":"2.0"}"#,
            b" \r\n{ \"oslo.version\" :\t\"2.0\" , \"oslo.message\" : \"\xc3\xa9t\xc3\xa9\" } \n",
            br#"{"oslo.version": "2.0", "oslo.message": "\u00e9"}"#,
            br#"{"oslo.version": "2.0", "oslo.message": "\ud800"}"#,
            br#"{"oslo.version": "2.0", "oslo.message": "a\qb"}"#,
            b"{\"oslo.version\": \"2.0\", \"oslo.message\": \"a\x01b\"}",
            b"{\"oslo.version\": \"2.0\", \"oslo.message\": \"\xff\"}",
            br#"{"oslo.version": "2.0", "oslo.message": "x", "oslo.message": "y"}"#,
            br#"{"oslo.version": "2.0", "oslo.message": "x"} trailing"#,
            br#"{"oslo.version": "2.0", "oslo.message": "x", "other": 1}"#,
            br#"{"oslo.version": "2.0", "oslo.message": "x""#,
            br#"{"oslo.version": "2.0"}"#,
            br#"{"oslo.version": "2.0", "oslo.message": "unterminated}"#,
        ];
        let mut read = 0;
        for body in cases {
            if let Some(fast) = usual_envelope(body) {
                read += 1;
                assert_eq!(Some(fast), serde_envelope(body), "{:?}", String::from_utf8_lossy(body));
            }
        }
        assert_eq!(read, 3, "the usual shapes are read in one pass");
    }

    proptest::proptest! {
        #[test]
        fn any_message_comes_out_of_the_one_pass_reader_as_serde_reads_it(message in ".*", pretty: bool) {
            let value = serde_json::json!({"oslo.version": "2.0", "oslo.message": message});
            let body = if pretty { serde_json::to_vec_pretty(&value) } else { serde_json::to_vec(&value) }.unwrap();
            if let Some(fast) = usual_envelope(&body) {
                proptest::prop_assert_eq!(Some(fast), serde_envelope(&body));
            }
        }

        #[test]
        fn the_eight_byte_scan_finds_the_first_quote_backslash_or_control_character(bytes: [u8; 8]) {
            let naive = bytes.iter().position(|b| matches!(b, b'"' | b'\\' | 0..=0x1f));
            proptest::prop_assert_eq!(first_special(u64::from_le_bytes(bytes)), naive);
        }

        #[test]
        fn any_bytes_the_one_pass_reader_accepts_serde_reads_the_same(
            tail in proptest::collection::vec(
                proptest::sample::select(b"\"\\}, u0nx/\x01\xc3\xa9\xff".to_vec()),
                0..16,
            ),
        ) {
            let mut body = br#"{"oslo.version": "2.0", "oslo.message": "a"#.to_vec();
            body.extend_from_slice(&tail);
            if let Some(fast) = usual_envelope(&body) {
                proptest::prop_assert_eq!(Some(fast), serde_envelope(&body));
            }
        }
    }

    /// Decoding as it was before the one-pass readers: serde for the envelope, the inner message
    /// with its payload delimited, then the payload parsed by its service's decoder.
    fn two_pass(body: &[u8]) -> Result<Notification, DecodeError> {
        let outer: Wire<'_> = serde_json::from_slice(body).map_err(|e| DecodeError::json("body", e))?;
        match (&outer.oslo_version, &outer.oslo_message) {
            (Some(version), Some(message)) => {
                if !(version == "2.0" || version.starts_with("2.")) {
                    return Err(DecodeError::UnsupportedVersion(version.chars().take(32).collect()));
                }
                let inner: Wire<'_> =
                    serde_json::from_str(message).map_err(|e| DecodeError::json("oslo.message", e))?;
                if inner.oslo_message.is_some() {
                    return Err(DecodeError::Missing("event_type (oslo.message holds another envelope)"));
                }
                decode_message(inner)
            }
            (None, Some(_)) => Err(DecodeError::Missing("oslo.version")),
            (Some(_), None) => Err(DecodeError::Missing("oslo.message")),
            (None, None) => decode_message(outer),
        }
    }

    fn same_as_two_pass(body: &[u8]) {
        let text = String::from_utf8_lossy(body);
        match (decode(body, DecodeLimits::default()), two_pass(body)) {
            (Ok(fast), Ok(slow)) => assert_eq!(fast, slow, "{text}"),
            (Err(fast), Err(slow)) => assert_eq!(fast.to_string(), slow.to_string(), "{text}"),
            (fast, slow) => panic!("{text}: {fast:?} but two passes give {slow:?}"),
        }
    }

    #[test]
    fn every_fixture_decodes_in_one_pass_as_in_two() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let files = crate::fixture::collect_files(&[root]).unwrap();
        let mut bodies = 0;
        for (_, delivery) in crate::fixture::read_all(&files) {
            if let Ok(delivery) = delivery {
                same_as_two_pass(&delivery.body);
                bodies += 1;
            }
        }
        assert!(bodies > 40, "{bodies}");
    }

    #[test]
    fn odd_inner_messages_decode_in_one_pass_as_in_two() {
        let payload =
            r#"{"tenant_id":"p1","instance_id":"i1","instance_type":"m1.small","created_at":"2025-01-01 00:00:00"}"#;
        let messages = [
            format!(r#"{{"message_id":"m","event_type":"compute.instance.create.end","timestamp":"2025-01-01 00:00:00","payload":{payload}}}"#),
            format!(r#"{{"payload":{payload},"message_id":"m","event_type":"compute.instance.create.end","timestamp":"2025-01-01 00:00:00"}}"#),
            format!(r#"{{"message_id":"m","event_type":"compute.instance.create.end","payload":{payload},"payload":{payload},"timestamp":"2025-01-01 00:00:00"}}"#),
            format!(r#"{{"message_id":"m","event_type":"compute.instance.create.end","event_type":"x","timestamp":"2025-01-01 00:00:00","payload":{payload}}}"#),
            r#"{"message_id":"m","event_type":"compute.instance.create.end","timestamp":"2025-01-01 00:00:00","payload":[1]}"#.to_owned(),
            r#"{"message_id":"m","event_type":"compute.instance.create.end","timestamp":"2025-01-01 00:00:00","payload":null}"#.to_owned(),
            r#"{"message_id":"m","event_type":"compute.instance.create.end","timestamp":"2025-01-01 00:00:00","payload":{"tenant_id":"p1"}}"#.to_owned(),
            r#"{"message_id":"m","event_type":"compute.instance.create.end","timestamp":"2025-01-01 00:00:00","payload":{"tenant_id":}}"#.to_owned(),
            r#"{"message_id":"m","event_type":"identity.thing.created","timestamp":"2025-01-01 00:00:00","payload":{"x":[}}"#.to_owned(),
            r#"{"message_id":"m","event_type":"identity.thing.created","timestamp":"2025-01-01 00:00:00","payload":{"x":[]}}"#.to_owned(),
            r#"{"message_id":"m","event_type":"image.update","timestamp":"2025-01-01 00:00:00","payload":"text"}"#.to_owned(),
            r#"{"message_id":"m","event_type":"metering","timestamp":"2025-01-01 00:00:00","payload":{"not":"a list"}}"#.to_owned(),
            r#"{"message_id":"m","event_type":"telemetry.polling","timestamp":"2025-01-01 00:00:00","payload":[]}"#.to_owned(),
            r#"{"message_id":"m b","event_type":"identity.project.created","timestamp":"2025-01-01 00:00:00","payload":{"resource_info":"p"}}"#.to_owned(),
            r#"{"event_type":"identity.project.created","timestamp":"2025-01-01 00:00:00","payload":{"resource_info":"p"}}"#.to_owned(),
            r#"{"message_id":"m","event_type":"","timestamp":"2025-01-01 00:00:00","payload":{"resource_info":"p"}}"#.to_owned(),
            r#"{"message_id":"m","event_type":"identity.project.created","timestamp":"2025-01-01 00:00:00","payload":{"resource_info":"p"},"oslo.message":"{}"}"#.to_owned(),
            r#"{"message_id":"m","event_type":"identity.project.created","timestamp":"2025-01-01 00:00:00","payload":{"resource_info":"p"}} x"#.to_owned(),
        ];
        for message in messages {
            same_as_two_pass(message.as_bytes());
            same_as_two_pass(&envelope(&message));
        }
    }

    #[test]
    fn bodies_over_the_limit_are_rejected_before_parsing() {
        let err = decode(BARE.as_bytes(), DecodeLimits { max_body_bytes: 10 }).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { limit: 10, .. }), "{err}");
    }

    #[test]
    fn malformed_layers_are_named_in_the_error() {
        let cases: [(&[u8], &str); 6] = [
            (b"not json", "body is not valid"),
            (br#"{"oslo.version":"2.0","oslo.message":"{nope"}"#, "oslo.message is not valid"),
            (br#"{"oslo.version":"1.0","oslo.message":"{}"}"#, "oslo.version \"1.0\" is not supported"),
            (br#"{"oslo.message":"{}"}"#, "missing oslo.version"),
            (br#"{"message_id":"m","timestamp":"2025-01-01 00:00:00"}"#, "missing event_type"),
            (
                br#"{"message_id":"m","event_type":"identity.project.created","timestamp":"2025-01-01 00:00:00"}"#,
                "missing payload",
            ),
        ];
        for (body, expected) in cases {
            let err = decode(body, DecodeLimits::default()).unwrap_err().to_string();
            assert!(err.contains(expected), "{:?}: got {err:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn wrong_types_in_envelope_fields_are_invalid_not_panics() {
        let body = br#"{"message_id":42,"event_type":"identity.project.created","timestamp":"2025-01-01 00:00:00","payload":{}}"#;
        assert!(decode(body, DecodeLimits::default()).is_err());
        let body = br#"{"message_id":"m","event_type":["x"],"timestamp":"2025-01-01 00:00:00","payload":{}}"#;
        assert!(decode(body, DecodeLimits::default()).is_err());
    }

    #[test]
    fn deeply_nested_json_is_rejected_not_a_stack_overflow() {
        for event_type in ["identity.project.created", "metering", "unhandled.event"] {
            let mut body = format!(
                r#"{{"message_id":"m","event_type":"{event_type}","timestamp":"2025-01-01 00:00:00","payload":"#
            );
            body.push_str(&"[".repeat(100_000));
            body.push_str(&"]".repeat(100_000));
            body.push('}');
            let decoded = decode(body.as_bytes(), DecodeLimits { max_body_bytes: usize::MAX });
            if event_type != "unhandled.event" {
                assert!(decoded.is_err(), "{event_type}");
            }
        }
    }

    #[test]
    fn the_callers_project_name_is_the_events_only_when_the_caller_acted_in_that_project() {
        let message = |context_project: &str| {
            format!(
                r#"{{"message_id":"m-2","event_type":"identity.project.created","priority":"INFO",
                "_context_project_id":"{context_project}","_context_project_name":"CM_physics",
                "_context_user_name":"concertim","timestamp":"2025-08-18 10:38:07.168945",
                "payload":{{"resource_info":"148f2f86b96440a1ba0934f837b2c77b"}}}}"#
            )
        };
        let own = message("148f2f86b96440a1ba0934f837b2c77b");
        for body in [own.clone().into_bytes(), envelope(&own)] {
            let n = decode(&body, DecodeLimits::default()).unwrap();
            assert_eq!(n.meta.project_name.as_deref(), Some("CM_physics"));
        }
        // An admin acting from another project names that project, not the event's.
        let admin = message("0000000000000000000000000000admin");
        assert_eq!(decode(&envelope(&admin), DecodeLimits::default()).unwrap().meta.project_name, None);
        assert_eq!(decode(&envelope(BARE), DecodeLimits::default()).unwrap().meta.project_name, None);
    }
}

//! The one-pass reader of an inner message: its payload decoded straight from the parser when
//! `event_type` comes first, as oslo writes it.

use std::borrow::Cow;

use serde::Deserialize;

use super::*;

/// An inner message read in one pass: when `event_type` comes before `payload`, as oslo writes
/// them, the payload is decoded straight from the parser instead of being delimited first and
/// parsed again. Any failure (of the JSON, of the payload, a repeated or unexpected key) leaves
/// the message to the two-pass reader, which accepts and rejects exactly what it always did,
/// with its own error text: so what this returns, the two-pass reader would have returned.
pub(super) struct OnePass<'a> {
    pub(super) wire: Wire<'a>,
    /// The payload's event, when it was decoded in the pass.
    pub(super) event: Option<Event>,
}

impl<'de> Deserialize<'de> for OnePass<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OnePass<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an oslo message")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<OnePass<'de>, A::Error> {
                use serde::de::{Error, IgnoredAny};
                let mut wire = Wire::default();
                let mut event = None;
                let mut seen = [false; 8];
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let (slot, n) = match &*key {
                        "message_id" => (&mut wire.message_id, 0),
                        "event_type" => (&mut wire.event_type, 1),
                        "publisher_id" => (&mut wire.publisher_id, 2),
                        "priority" => (&mut wire.priority, 3),
                        "timestamp" => (&mut wire.timestamp, 4),
                        "_context_project_id" => (&mut wire.context_project_id, 6),
                        "_context_project_name" => (&mut wire.context_project_name, 7),
                        "payload" => {
                            if std::mem::replace(&mut seen[5], true) {
                                return Err(A::Error::custom("a second payload"));
                            }
                            match wire.event_type.as_deref() {
                                Some(event_type) => event = Some(map.next_value_seed(EventOf { event_type })?),
                                None => wire.payload = map.next_value()?,
                            }
                            continue;
                        }
                        "oslo.version" | "oslo.message" => return Err(A::Error::custom("an envelope field")),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    if std::mem::replace(&mut seen[n], true) {
                        return Err(A::Error::custom("a repeated field"));
                    }
                    *slot = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0);
                }
                Ok(OnePass { wire, event })
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// A string field, borrowed from the message when it has no escapes (as the derived `Wire`
/// reads it).
#[derive(Deserialize)]
pub(super) struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// Decodes the payload of `event_type` from wherever the parser stands.
pub(super) struct EventOf<'e> {
    event_type: &'e str,
}

impl<'de> serde::de::DeserializeSeed<'de> for EventOf<'_> {
    type Value = Event;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Event, D::Error> {
        use serde::de::{Error, IgnoredAny};
        let Some(service) = service_of(self.event_type) else {
            IgnoredAny::deserialize(d)?;
            return Ok(Event::Ignored { reason: "unhandled event type" });
        };
        let mut parser = Some(d);
        let event = decode_service(service, self.event_type, Stream { parser: &mut parser });
        // A decoder that ignores the event leaves its payload unread; it must still be valid JSON.
        if let Some(d) = parser.take() {
            IgnoredAny::deserialize(d)?;
        }
        event.map_err(|_| D::Error::custom("left to the two-pass reader"))
    }
}

/// The parser standing at the payload, read at most once. Its errors are not kept: the
/// two-pass reader reports them.
pub(super) struct Stream<'p, D> {
    parser: &'p mut Option<D>,
}

impl<'de, D: serde::Deserializer<'de>> Source<'de> for Stream<'_, D> {
    fn object<T: Deserialize<'de>>(self) -> Result<T, PayloadError> {
        struct ObjectOf<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectOf<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        let parser = self.parser.take().ok_or(PayloadError::Shape("a payload read once"))?;
        parser.deserialize_map(ObjectOf(std::marker::PhantomData)).map_err(|_| PayloadError::Shape("a JSON object"))
    }
    fn any<T: Deserialize<'de>>(self) -> Result<T, PayloadError> {
        let parser = self.parser.take().ok_or(PayloadError::Shape("a payload read once"))?;
        T::deserialize(parser).map_err(|_| PayloadError::Shape("a payload of its service's shape"))
    }
}

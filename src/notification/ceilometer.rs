//! Ceilometer samples: `metering` (the `notifier://` publisher; the payload is a list of samples)
//! and `telemetry.polling` (the polling agent; the payload is `{"samples": [...]}`).
//!
//! Samples are read with Ceilometer's `meter_message_from_counter` names (`counter_name`,
//! `counter_volume`, …) and, as aliases, the `Sample.as_dict()` names (`name`, `volume`, …).
//! A sample without a project or a resource (SNMP hardware meters, for example) cannot be billed
//! to anyone: it is counted in `unattributed`, not an error. A sample of the right shape whose
//! volume or timestamp is unreadable makes the whole message invalid, since dropping it would
//! silently lose usage.

use serde::Deserialize;
#[cfg(test)]
use serde_json::value::RawValue;

use super::{bounded, opt_time, DecodeError, PayloadError, Source};
use crate::event::{Event, InstanceId, ProjectId, Sample, Timestamp};
use crate::fields;

#[derive(Deserialize)]
struct WireSample {
    #[serde(alias = "name", default, deserialize_with = "fields::opt_text")]
    counter_name: Option<String>,
    #[serde(alias = "unit", default, deserialize_with = "fields::opt_text")]
    counter_unit: Option<String>,
    #[serde(alias = "type", default, deserialize_with = "fields::opt_text")]
    counter_type: Option<String>,
    #[serde(alias = "volume", default, deserialize_with = "fields::volume")]
    counter_volume: Option<rust_decimal::Decimal>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    project_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    resource_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    timestamp: Option<String>,
    #[serde(default)]
    resource_metadata: Option<Metadata>,
}

#[derive(Deserialize, Default)]
struct Metadata {
    #[serde(default, deserialize_with = "fields::opt_text")]
    flavor_name: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    instance_type: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    display_name: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    launched_at: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    created_at: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    deleted_at: Option<String>,
}

#[derive(Deserialize)]
struct Polling {
    samples: Vec<WireSample>,
}

/// As [`decode_from`], from a payload already read as raw JSON.
#[cfg(test)]
pub(super) fn decode(event_type: &str, raw: &RawValue) -> Result<Event, PayloadError> {
    decode_from(event_type, raw)
}

/// Decodes a `metering` or `telemetry.polling` payload.
pub(super) fn decode_from<'de>(event_type: &str, payload: impl Source<'de>) -> Result<Event, PayloadError> {
    let wire: Vec<WireSample> =
        if event_type == "metering" { payload.any()? } else { payload.object::<Polling>()?.samples };
    let mut samples = Vec::with_capacity(wire.len());
    let mut unattributed = 0;
    for w in wire {
        // Non-instance resources carry ids of every shape (`host/dev`, URLs): such a sample
        // has no key a subscription could have, so it is unattributed rather than invalid.
        let ids = w.project_id.zip(w.resource_id).map(|(p, r)| (ProjectId::parse(p), InstanceId::parse(r)));
        let Some((Ok(project), Ok(resource))) = ids else {
            unattributed += 1;
            continue;
        };
        let meta = w.resource_metadata.unwrap_or_default();
        let timestamp = w.timestamp.ok_or(DecodeError::Missing("sample timestamp"))?;
        samples.push(Sample {
            meter: bounded(&w.counter_name.ok_or(DecodeError::Missing("sample counter_name"))?, 255),
            volume: w.counter_volume.ok_or(DecodeError::Missing("sample counter_volume"))?,
            unit: bounded(w.counter_unit.as_deref().unwrap_or_default(), 64),
            timestamp: Timestamp::parse(&timestamp)
                .map_err(|source| DecodeError::Timestamp { field: "sample timestamp", source })?,
            project,
            resource,
            flavor_name: meta.flavor_name.or(meta.instance_type).filter(|f| !f.is_empty()).map(|f| bounded(&f, 255)),
            display_name: meta.display_name.map(|d| bounded(&d, 255)),
            launched_at: opt_time("sample resource_metadata.launched_at", meta.launched_at.as_deref())?,
            created_at: opt_time("sample resource_metadata.created_at", meta.created_at.as_deref())?,
            deleted_at: opt_time("sample resource_metadata.deleted_at", meta.deleted_at.as_deref())?,
            counter: bounded(w.counter_type.as_deref().unwrap_or_default(), 16),
        });
    }
    Ok(Event::Usage { samples, unattributed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_whose_resource_id_cannot_be_a_key_is_unattributed_not_invalid() {
        let payload = SAMPLE.replace(r#""resource_id":"r1""#, r#""resource_id":"compute-0/sda""#);
        let Event::Usage { samples, unattributed } = decode("metering", &raw(&format!("[{payload}]"))).ok().unwrap()
        else {
            panic!()
        };
        assert!(samples.is_empty());
        assert_eq!(unattributed, 1);
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    const SAMPLE: &str = r#"{"counter_name":"vcpus","counter_type":"gauge","counter_unit":"vcpu","counter_volume":2,
        "project_id":"p1","resource_id":"r1","timestamp":"2020-09-14T16:12:49.939250+00:00",
        "resource_metadata":{"flavor_name":"m1.tiny","display_name":"vm","launched_at":"2020-09-14T16:12:49.839122"}}"#;

    #[test]
    fn metering_lists_and_polling_objects_give_the_same_samples() {
        let metering = decode("metering", &raw(&format!("[{SAMPLE}]"))).ok().unwrap();
        let polling = decode("telemetry.polling", &raw(&format!(r#"{{"samples":[{SAMPLE}]}}"#))).ok().unwrap();
        assert_eq!(metering, polling);
        let Event::Usage { samples, unattributed } = metering else { panic!() };
        assert_eq!(unattributed, 0);
        assert_eq!(samples[0].meter, "vcpus");
        assert_eq!(samples[0].flavor_name.as_deref(), Some("m1.tiny"));
    }

    #[test]
    fn as_dict_field_names_are_accepted() {
        let body = r#"{"samples":[{"name":"memory","unit":"MB","volume":512,"project_id":"p","resource_id":"r","timestamp":"2020-09-14T16:12:49Z"}]}"#;
        let Event::Usage { samples, .. } = decode("telemetry.polling", &raw(body)).ok().unwrap() else { panic!() };
        assert_eq!(samples[0].volume, rust_decimal::Decimal::from(512));
    }

    #[test]
    fn samples_without_project_are_counted_not_billed() {
        let body = r#"[{"counter_name":"hardware.cpu","counter_volume":1,"project_id":null,"resource_id":"h","timestamp":"2020-09-14T16:12:49Z"}]"#;
        let Event::Usage { samples, unattributed } = decode("metering", &raw(body)).ok().unwrap() else { panic!() };
        assert!(samples.is_empty());
        assert_eq!(unattributed, 1);
    }

    #[test]
    fn an_unreadable_volume_or_timestamp_is_an_error() {
        assert!(decode("metering", &raw(r#"[{"counter_name":"x","counter_volume":"lots","project_id":"p","resource_id":"r","timestamp":"2020-09-14T16:12:49Z"}]"#)).is_err());
        assert!(decode(
            "metering",
            &raw(r#"[{"counter_name":"x","counter_volume":1,"project_id":"p","resource_id":"r","timestamp":"later"}]"#)
        )
        .is_err());
        assert!(decode("metering", &raw(r#"{"samples":[]}"#)).is_err());
    }
}

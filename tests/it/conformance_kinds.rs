//! Each resource kind's conformance over the upstream corpus: the real Cinder and Neutron
//! lifecycles decode, plan and build the timeline whose held time is checked here by hand,
//! from the samples' own timestamps. Pure: decode → plan → facts → timeline, no broker.
//!
//! The corpus has no Glance samples and no Ceilometer traffic sample: images are covered by
//! the fixtures and the unit tests; traffic by the corpus's real Ceilometer metering message
//! with its sample turned into a cumulative `network.outgoing.bytes` (the envelope and sample
//! layout stay upstream's).

use std::collections::BTreeMap;

use concertim_billing::{
    config::{FloatingIpBilled, Settings},
    event::{Event, ResourceKind},
    notification::{decode, DecodeLimits},
    plan::{plan, Action},
    timeline::{self, Fact, Held4, TimeUnit, Timeline},
};
use serde_json::{json, Value};

use super::conformance::cases;
use crate::support::upstream_corpus;

/// What the messages of one corpus file plan for each resource: its kind, its project (the
/// first one named) and its facts.
#[derive(Default)]
struct Planned {
    kind: Option<ResourceKind>,
    project: Option<String>,
    facts: Vec<Fact>,
}

fn planned(file: &str, settings: &Settings) -> Option<BTreeMap<String, Planned>> {
    let corpus = upstream_corpus()?;
    let path = corpus.join(file);
    let mut out: BTreeMap<String, Planned> = BTreeMap::new();
    for case in cases(&corpus, &path, file) {
        let n = decode(&case.body, DecodeLimits::default()).unwrap_or_else(|e| panic!("{}: {e}", case.label));
        for action in plan(&n, settings).unwrap_or_else(|e| panic!("{}: {e}", case.label)) {
            if let Action::RecordFacts { instance, kind, project, facts } = action {
                let entry = out.entry(instance.to_string()).or_default();
                entry.kind = Some(kind);
                if entry.project.is_none() {
                    entry.project = project.map(|p| p.to_string());
                }
                entry.facts.extend(facts);
            }
        }
    }
    Some(out)
}

/// Seconds since the epoch of an RFC 3339 time.
fn at(text: &str) -> i64 {
    concertim_billing::event::Timestamp::parse(text).unwrap().unix()
}

/// What a resource held from its first fact to `cut`, under the settings' policy of its kind.
fn held(p: &Planned, cut: &str, settings: &Settings) -> Held4 {
    let kind = p.kind.unwrap();
    Timeline::of(&p.facts, None).held(i64::MIN, at(cut), &settings.billing.policy_of(kind))
}

fn amount(p: &Planned, cut: &str, settings: &Settings) -> Vec<(String, String)> {
    let kind = p.kind.unwrap();
    timeline::amounts(&held(p, cut, settings), TimeUnit::Seconds, kind)
        .unwrap()
        .into_iter()
        .map(|(k, a)| (k.unit_name(TimeUnit::Seconds), a.to_string()))
        .collect()
}

#[test]
fn cinders_volume_lifecycle_bills_its_gib_from_launched_at_and_a_retype_changes_its_plan() {
    let settings = Settings::embedded();
    let Some(volumes) = planned("cinder/searchlight/volumes.json", &settings) else { return };
    let v = &volumes["f54b1d2f-4514-4688-8da7-4bc66767b6be"];
    assert_eq!((v.kind, v.project.as_deref()), (Some(ResourceKind::Volume), Some("1816a16093df465dbc609cf638422a05")));
    // launched_at 16:23:09.145721 → whole second 16:23:09; 1 GiB until the cut at 16:30:00.
    assert_eq!(amount(v, "2016-03-07T16:30:00Z", &settings), [("openstack-volume-gib-seconds".into(), "411".into())]);
    // volume.retype at 16:24:45.157255 puts it on its new type from then on.
    let tl = Timeline::of(&v.facts, None);
    assert_eq!(tl.flavor_changes(), [(at("2016-03-07T16:24:45Z"), "a16c8514-616f-4d40-baf7-eb8c8fb18677")]);
    // Attach, detach and update change nothing billable.
    assert_eq!(tl.segments.len(), 2);
}

#[test]
fn a_volume_whose_only_message_is_its_delete_bills_its_real_life_from_the_launched_at_the_delete_carries() {
    let settings = Settings::embedded();
    let Some(volumes) = planned("cinder/searchlight/volumes.json", &settings) else { return };
    // The corpus's volume.delete.end is of a volume whose create it does not hold.
    let v = &volumes["342b0875-2c7a-48b7-a391-f4d6ea8987c0"];
    // launched_at 16:23:09 → deleted at the notification, 16:24:45: 96 s of 1 GiB, and no more.
    assert_eq!(amount(v, "2016-03-08T00:00:00Z", &settings), [("openstack-volume-gib-seconds".into(), "96".into())]);
}

#[test]
fn cinders_snapshot_lifecycle_bills_its_volume_size_from_created_at_to_the_delete() {
    let settings = Settings::embedded();
    let Some(snapshots) = planned("cinder/searchlight/snapshots.json", &settings) else { return };
    let s = &snapshots["56f91625-2fc5-4e4a-8284-4bfd3b3a1914"];
    assert_eq!(s.kind, Some(ResourceKind::Snapshot));
    // created_at 17:24:49 → snapshot.delete.end at 17:25:44.014014: 55 s × 1 GiB.
    assert_eq!(amount(s, "2016-03-08T00:00:00Z", &settings), [("openstack-snapshot-gib-seconds".into(), "55".into())]);
}

#[test]
fn neutrons_floating_ip_lifecycle_bills_the_allocation_or_only_the_association_as_the_policy_says() {
    let mut settings = Settings::embedded();
    let Some(ips) = planned("neutron/searchlight/floatingips.json", &settings) else { return };
    let ip = &ips["1a124625-4c71-4d20-a65b-3cf34465dab2"];
    // The delete names only the id: the project is the create's.
    assert_eq!(
        (ip.kind, ip.project.as_deref()),
        (Some(ResourceKind::FloatingIp), Some("5fe7c4e4e492490393c674089a178e19"))
    );
    // Allocated: created 19:45:48.649772 → deleted 20:11:34.064247: 1546 s.
    assert_eq!(
        amount(ip, "2016-06-15T00:00:00Z", &settings),
        [("openstack-floating-ip-seconds".into(), "1546".into())]
    );
    // Associated only: 19:47:09.158589 → disassociated 20:00:49.073294: 820 s.
    settings.billing.resources.floating_ip_billed = FloatingIpBilled::Associated;
    assert_eq!(amount(ip, "2016-06-15T00:00:00Z", &settings), [("openstack-floating-ip-seconds".into(), "820".into())]);
}

#[test]
fn designates_floating_ip_updates_are_associations_of_the_floating_ip_they_name() {
    let settings = Settings::embedded();
    let Some(corpus) = upstream_corpus() else { return };
    for (file, associated) in
        [("floatingip.update.end_associate.json", true), ("floatingip.update.end_disassociate.json", false)]
    {
        let rel = format!("neutron/designate/{file}");
        let case = cases(&corpus, &corpus.join(&rel), &rel).pop().unwrap();
        let n = decode(&case.body, DecodeLimits::default()).unwrap();
        let Event::Resource(r) = &n.event else { panic!("{rel}: {:?}", n.event) };
        assert_eq!((r.kind, r.associated), (ResourceKind::FloatingIp, Some(associated)), "{rel}");
        assert_eq!(r.id.as_str(), case.message["payload"]["floatingip"]["id"].as_str().unwrap());
        assert!(plan(&n, &settings).unwrap().iter().any(|a| matches!(a, Action::RecordFacts { .. })), "{rel}");
    }
}

#[test]
fn ceilometers_metering_message_as_cumulative_egress_bills_the_increase_on_the_interface() {
    let settings = Settings::embedded();
    let Some(corpus) = upstream_corpus() else { return };
    let rel = "ceilometer/sg-core/metering.oslo-message-decoded.json";
    let case = cases(&corpus, &corpus.join(rel), rel).pop().unwrap();
    let interface = "instance-0000001-d8bd99b6-6fd8-4c02-a2e3-efbf596df636-tap5f5c1a4e-2b";
    let gib = 1u64 << 30;
    let mut facts = Vec::new();
    let mut kind = None;
    // Three readings of the running total, the last after a restart from zero.
    for (i, (time, total)) in [
        ("2020-09-14T16:12:49+00:00", 5 * gib),
        ("2020-09-14T16:22:49+00:00", 7 * gib),
        ("2020-09-14T16:32:49+00:00", gib),
    ]
    .into_iter()
    .enumerate()
    {
        let mut message = case.message.clone();
        let mut sample = message["payload"][0].clone();
        sample["counter_name"] = json!("network.outgoing.bytes");
        sample["counter_type"] = json!("cumulative");
        sample["counter_unit"] = json!("B");
        sample["counter_volume"] = json!(total);
        sample["resource_id"] = json!(interface);
        sample["timestamp"] = json!(time);
        message["payload"] = Value::Array(vec![sample]);
        message["message_id"] = json!(format!("egress-{i}"));
        message["timestamp"] = json!(time.replace('T', " ").replace("+00:00", ""));
        let n = decode(&serde_json::to_vec(&message).unwrap(), DecodeLimits::default()).unwrap();
        for action in plan(&n, &settings).unwrap() {
            if let Action::RecordFacts { instance, kind: k, facts: f, .. } = action {
                assert_eq!(instance.as_str(), interface);
                kind = Some(k);
                facts.extend(f);
            }
        }
    }
    assert_eq!(kind, Some(ResourceKind::NetworkInterface));
    // The first reading is the baseline; +2 GiB, then a restart counted from zero: +1 GiB.
    let increases = timeline::increases(&facts, at("2020-09-14T16:00:00Z"), at("2020-09-14T17:00:00Z"));
    let rule = &settings.billing.meters["network.outgoing.bytes"];
    let billed = rule.factor.apply(increases["network.outgoing.bytes"]).unwrap();
    assert_eq!((rule.unit.as_str(), billed.to_string().as_str()), ("openstack-network-egress-gib", "3"));
}

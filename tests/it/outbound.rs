//! What the billing applications and Concertim answer is believed only when it is their
//! protocol's answer: no redirect is followed (credentials stay with their server), a page
//! from something in front of KillBill is never taken for a recorded usage, and a certificate
//! is trusted only through the client's `ca_file` (or the system roots).

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use axum::{http::StatusCode, response::IntoResponse, Router};
use concertim_billing::{
    billing::{Applied, Billing, BillingError, HostBill, KillBill},
    class::ErrorClass,
    concertim::client::{Client as ConcertimClient, ConcertimError},
    config::{ConcertimSettings, HostBillSettings, KillBillSettings},
};

use crate::support::{certificates, concertim::FakeConcertim, hostbill::FakeHostBill, killbill::FakeKillBill, tls};

/// A server that answers everything with 307 to `target`, and one at `target` that records
/// what reaches it.
async fn redirect_to_a_recorder() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}", recorder.local_addr().unwrap());
    let log = Arc::clone(&seen);
    let app = Router::new().fallback(move |uri: axum::http::Uri, body: String| {
        let log = Arc::clone(&log);
        async move {
            log.lock().unwrap().push(format!("{uri} {body}"));
            StatusCode::CREATED
        }
    });
    tokio::spawn(async move { axum::serve(recorder, app).await.unwrap() });
    let redirector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", redirector.local_addr().unwrap());
    let to = target.clone();
    let app = Router::new().fallback(move |uri: axum::http::Uri| {
        let location = format!("{to}{uri}");
        async move { (StatusCode::TEMPORARY_REDIRECT, [("location", location)]).into_response() }
    });
    tokio::spawn(async move { axum::serve(redirector, app).await.unwrap() });
    (url, seen)
}

fn meta() -> concertim_billing::event::Meta {
    concertim_billing::event::Meta {
        message_id: concertim_billing::event::MessageId::parse("m-200").unwrap(),
        event_type: "metering".into(),
        publisher_id: "t".into(),
        priority: "INFO".into(),
        timestamp: concertim_billing::event::Timestamp::parse("2025-03-03T09:20:00Z").unwrap(),
        project_name: None,
    }
}

#[tokio::test]
async fn no_client_follows_a_redirect_and_the_error_names_its_target() {
    let (url, seen) = redirect_to_a_recorder().await;
    // KillBill: bootstrap sends the tenant's secret in its body and headers.
    let fake = FakeKillBill::start().await;
    let mut kb = fake.settings();
    kb.url = url.clone();
    let error = KillBill::new(kb).unwrap().bootstrap("<effectiveDate>2025-01-01T00:00:00Z</effectiveDate>", "t").await;
    let error = error.unwrap_err();
    assert!(matches!(error, BillingError::Redirected { status: 307, .. }), "{error}");
    assert!(
        error.to_string().contains("redirecting to http://127.0.0.1:") && error.to_string().contains("/1.0/kb/tenants")
    );
    assert_eq!(error.class(), ErrorClass::Permanent);
    // HostBill: its api_key is in the form body.
    let hostbill = FakeHostBill::start().await;
    let mut hb = hostbill.settings(&[("openstack-standard-monthly", "12")]);
    hb.url = Some(url.clone());
    let meta = meta();
    let ctx = concertim_billing::billing::Context { meta: &meta, redelivered: false };
    let project = concertim_billing::event::ProjectId::parse("e89cb74df0069d478e26645ca53ab73f").unwrap();
    let error = HostBill::new(hb).unwrap().ensure_account(&project, ctx).await;
    assert!(matches!(error, Err(BillingError::Redirected { .. })), "{error:?}");
    // Concertim: the login carries the password.
    let concertim = FakeConcertim::start().await;
    let mut cm = concertim.settings();
    cm.url = url;
    let error = ConcertimClient::new(cm).unwrap().teams().await;
    assert!(matches!(error, Err(ConcertimError::Redirected { status: 307, .. })), "{error:?}");
    assert!(seen.lock().unwrap().is_empty(), "the other host heard: {:?}", seen.lock().unwrap());
}

#[tokio::test]
async fn a_usage_call_answered_by_anything_but_killbills_201_is_not_recorded_and_is_tried_again() {
    use crate::support::{bus::test_usage_of, deliveries, metered_settings, run_with};
    let fake = FakeKillBill::start().await;
    // The legacy lifecycle's 09:10 sample, made one of the metered test meter.
    let usage = &test_usage_of(
        &deliveries("nova-legacy").into_iter().find(|d| d.routing_key.as_deref() == Some("metering.sample")).unwrap(),
    );
    // The first delivery creates the subscription and records; the client then knows it.
    let (executor, _) = run_with(metered_settings(), KillBill::new(fake.settings()).unwrap(), &[usage]).await;
    let rows = fake.usage_rows();
    assert_eq!(rows, 1, "the delivery's sample is recorded");
    let mut spec = concertim_billing::plan::UsageSpec {
        instance: fake.snapshot().subscriptions[0].instance_id.clone(),
        tracking_id: "another-notification".into(),
        records: vec![],
    };
    spec.records.push(concertim_billing::plan::UsageRecord {
        unit: concertim_billing::event::Unit::parse("openstack-billed-vcpus").unwrap(),
        date: concertim_billing::event::Timestamp::parse("2025-03-03T09:20:00Z").unwrap(),
        amount: 10.into(),
    });
    let meta = meta();
    let ctx = concertim_billing::billing::Context { meta: &meta, redelivered: false };
    // A proxy's 200 (a login page, a maintenance page): not recorded, retried.
    fake.fail_next(&[200]);
    let error = executor.billing().record_usage(&spec, ctx).await.unwrap_err();
    assert!(matches!(error, BillingError::Unexpected { status: 200, .. }), "{error}");
    assert_eq!(error.class(), ErrorClass::Transient);
    // A bare 400 for a subscription that has no end is not "after the end": retried too.
    fake.fail_next(&[400]);
    let error = executor.billing().record_usage(&spec, ctx).await.unwrap_err();
    assert!(matches!(error, BillingError::Unexpected { status: 400, .. }), "{error}");
    assert_eq!(fake.usage_rows(), rows, "nothing was recorded");
    // KillBill's own answer then records it.
    assert_eq!(executor.billing().record_usage(&spec, ctx).await.unwrap(), concertim_billing::billing::Applied::Done);
    assert_eq!(fake.usage_rows(), rows + 1);
}

/// A certificate for 127.0.0.1 from a CA the test makes, and another CA that did not sign it.
struct PrivateCa {
    _dirs: [tempfile::TempDir; 2],
    ca: String,
    other_ca: String,
    cert: String,
    key: String,
}

impl PrivateCa {
    fn new() -> Self {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let (ca, cert, key) = certificates(dirs[0].path());
        let (other_ca, _, _) = certificates(dirs[1].path());
        Self { _dirs: dirs, ca, other_ca, cert, key }
    }

    /// The plain fake at `url` behind a TLS front serving the certificate.
    async fn front(&self, url: &str) -> String {
        tls::https(Path::new(&self.cert), Path::new(&self.key), url).await
    }

    /// Each `ca_file` to try, and whether it trusts the front: the CA that signed its
    /// certificate does; none (the system roots) and the other CA do not.
    fn ca_files(&self) -> [(Option<String>, bool); 3] {
        [(Some(self.ca.clone()), true), (None, false), (Some(self.other_ca.clone()), false)]
    }
}

/// A call through a client whose `ca_file` is `trusted` or not: it succeeds, or it fails with
/// a permanent error saying that `server`'s certificate was not trusted, why, and which `key`
/// to set.
fn assert_trust<E: std::fmt::Display>(
    trusted: bool,
    result: Result<(), E>,
    class: fn(&E) -> ErrorClass,
    server: &str,
    key: &str,
) {
    match result {
        Ok(()) => assert!(trusted, "{key}: a certificate its CA did not sign was accepted"),
        Err(error) => {
            let text = error.to_string();
            assert!(!trusted, "{key}: the right CA was refused: {text}");
            assert!(text.contains(&format!("{server}'s TLS certificate was not trusted")), "{text}");
            assert!(text.contains(&format!("set {key} to the PEM bundle")), "{text}");
            assert!(text.contains("(invalid peer certificate: "), "the verifier's reason is shown: {text}");
            assert_eq!(class(&error), ErrorClass::Permanent, "{text}");
        }
    }
}

fn project() -> concertim_billing::event::ProjectId {
    concertim_billing::event::ProjectId::parse("e89cb74df0069d478e26645ca53ab73f").unwrap()
}

#[tokio::test]
async fn killbill_over_tls_is_trusted_through_killbill_ca_file_and_refused_otherwise_naming_it() {
    let pki = PrivateCa::new();
    let fake = FakeKillBill::start().await;
    let url = pki.front(&fake.url).await;
    let meta = meta();
    let ctx = concertim_billing::billing::Context { meta: &meta, redelivered: false };
    for (ca_file, trusted) in pki.ca_files() {
        let kb = KillBill::new(KillBillSettings { url: url.clone(), ca_file, ..fake.settings() }).unwrap();
        let result = kb.ensure_account(&project(), ctx).await.map(|applied| assert_eq!(applied, Applied::Done));
        assert_trust(trusted, result, BillingError::class, "KillBill", "killbill.ca_file");
    }
}

#[tokio::test]
async fn hostbill_over_tls_is_trusted_through_hostbill_ca_file_and_refused_otherwise_naming_it() {
    let pki = PrivateCa::new();
    let fake = FakeHostBill::start().await;
    let url = pki.front(&fake.url).await;
    let meta = meta();
    let ctx = concertim_billing::billing::Context { meta: &meta, redelivered: false };
    for (ca_file, trusted) in pki.ca_files() {
        let settings = HostBillSettings { url: Some(url.clone()), ca_file, ..fake.settings(&[]) };
        let result = HostBill::new(settings).unwrap().ensure_account(&project(), ctx).await;
        let result = result.map(|applied| assert_eq!(applied, Applied::Done));
        assert_trust(trusted, result, BillingError::class, "HostBill", "hostbill.ca_file");
    }
}

#[tokio::test]
async fn concertim_over_tls_is_trusted_through_concertim_ca_file_and_refused_otherwise_naming_it() {
    let pki = PrivateCa::new();
    let fake = FakeConcertim::start().await;
    fake.add_team("e89cb74df0069d478e26645ca53ab73f");
    let url = pki.front(&fake.url).await;
    for (ca_file, trusted) in pki.ca_files() {
        let settings = ConcertimSettings { url: url.clone(), ca_file, ..fake.settings() };
        let result = ConcertimClient::new(settings).unwrap().teams().await.map(|teams| assert_eq!(teams.len(), 1));
        assert_trust(trusted, result, ConcertimError::class, "Concertim", "concertim.ca_file");
    }
}

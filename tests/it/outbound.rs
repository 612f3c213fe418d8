//! What the billing applications and Concertim answer is believed only when it is their
//! protocol's answer: no redirect is followed (credentials stay with their server), and a page
//! from something in front of KillBill is never taken for a recorded usage.

use std::sync::{Arc, Mutex};

use axum::{http::StatusCode, response::IntoResponse, Router};
use concertim_billing::{
    billing::{Billing, BillingError, HostBill, KillBill},
    class::ErrorClass,
    concertim::client::{Client as ConcertimClient, ConcertimError},
};

use crate::support::{concertim::FakeConcertim, hostbill::FakeHostBill, killbill::FakeKillBill};

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

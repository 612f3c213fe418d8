//! A fake KillBill that answers as the real server does (KillBill 0.22.26, the one
//! `deploy/dev/killbill.sh` runs; the differential test `tests/it/killbill_differential.rs`
//! checks every scripted answer against it): basic auth and tenant headers (401),
//! `X-Killbill-CreatedBy` on writes (400), creates as 201 with an empty body and an absolute
//! `Location` (usage: no `Location`), 409/3000, 404/3003, 404/1083, 500/1031, 400/9000,
//! 400/50000, 400/1015 for a second subscription on an active bundle key, 400/2021 for an
//! unknown plan, 400 (no code) for a plan change with a date and a policy, 500/1021 for one dated
//! before the start, 400/1001 for a cancel or change before the last transition, 400/6000 for a
//! change of a cancelled subscription or on a closed account, 400/2080 for a catalog version
//! uploaded twice (and the catalog read back as KillBill renders it), Jetty's JSON 400 for usage
//! after a subscription's end, the half-open window of `GET /1.0/kb/usages`, accounts made
//! without an `externalKey` (keyed by their own id), and the custom-field search
//! (`GET /1.0/kb/customFields/search/{key}`: the key anywhere in a field's object id, object
//! type, name or value, paged, 200 `[]` for no hit). Dates may be days or date-times. Every
//! request body is checked against the definitions of `../shared/killbill/killbill-openapi.json`
//! (ignoring its known-wrong `required` lists); a body the spec would reject is answered 400 and
//! recorded as a violation.
//!
//! What it cannot reproduce: invoices (its dry run sums usage at the test's own prices, not
//! KillBill's invoice of the bill cycle), which catalog version bills a subscription (it bills
//! usage in any unit an uploaded version declares; KillBill bills by the version in effect for
//! the subscription, and keeps one that started under an older version on it unless the newer
//! plan has an `effectiveDateForExistingSubscriptions`), the test clock, usage amounts
//! truncated to whole numbers by 0.22, two concurrent usage calls with one trackingId both
//! being stored (its check and insert are atomic; KillBill's are not), column limits (field
//! sizes, 4-byte UTF-8), and the search's SQL `LIKE` wildcards (`%` and `_` in a key match
//! anything in KillBill, and only themselves here).

//!
//! `model.rs` holds the state and the billing arithmetic, `schema.rs` the check of request
//! bodies against the spec, `router.rs` the HTTP calls; latency, outages, lost answers and
//! failures come from the fault layer of `fake_server.rs`, which every fake shares.

mod model;
mod router;
mod schema;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use concertim_billing::{
    billing::ledger::Snapshot,
    config::{KillBillSettings, Secret},
};
pub use model::parse_time;
use rust_decimal::Decimal;

use super::fake_server::{self, Answers, Faults};
use model::Fake;

/// `admin:password`, base64: the docs' demo credentials.
const BASIC_AUTH: &str = "Basic YWRtaW46cGFzc3dvcmQ=";
const API_KEY: &str = "bob";
const API_SECRET: &str = "lazar";

/// The running fake.
#[derive(Clone)]
pub struct FakeKillBill {
    /// Its base URL.
    pub url: String,
    state: Arc<Mutex<Fake>>,
    faults: Faults,
}

impl FakeKillBill {
    /// Starts the fake on a free port, as `killbill bootstrap` leaves a server: the tenant
    /// exists and the bundled catalog is uploaded.
    pub async fn start() -> Self {
        let fake = Self::start_empty().await;
        {
            let mut s = fake.state.lock().unwrap();
            s.tenant = true;
            s.upload_catalog(concertim_billing::billing::killbill::CATALOG_XML);
            s.catalogs.clear();
        }
        fake
    }

    /// Starts the fake on a free port with no tenant and no catalog.
    pub async fn start_empty() -> Self {
        let state = Arc::new(Mutex::new(Fake::default()));
        // What the proxy in front of KillBill answers: empty bodies, a 504 for a lost answer.
        let faults = Faults::new(Answers::EMPTY);
        let url = fake_server::serve(router::app(Arc::clone(&state)), &faults).await;
        // Nobody knows the port before `serve` returns, so no request has needed the base yet.
        state.lock().unwrap().base = url.clone();
        Self { url, state, faults }
    }

    /// Settings for the backend to talk to this fake.
    pub fn settings(&self) -> KillBillSettings {
        KillBillSettings {
            url: self.url.clone(),
            username: "admin".into(),
            password: Secret::new("password"),
            api_key: API_KEY.into(),
            api_secret: Secret::new(API_SECRET),
            created_by: "concertim-billing-tests".into(),
            currency: "USD".into(),
            ca_file: None,
            timeout_ms: 5_000,
            connect_timeout_ms: 1_000,
            pool_max_idle: 4,
            server_version: Default::default(),
        }
    }

    /// Every answer takes `latency` (requests are still served concurrently).
    pub fn set_latency(&self, latency: Duration) {
        self.faults.set_latency(latency);
    }

    /// Dry-run invoices price each unit of `unit` at `price` (other units cost nothing): the
    /// fake does not compute KillBill invoices, it sums usage at the test's prices.
    pub fn set_price(&self, unit: &str, price: Decimal) {
        self.state.lock().unwrap().prices.insert(unit.to_owned(), price);
    }

    /// Credits the project's account, as `POST /1.0/kb/credits` would.
    pub fn add_credit(&self, project: &str, amount: Decimal) {
        let mut s = self.state.lock().unwrap();
        let id = s.account_by_key(project).expect("the account exists").id.clone();
        *s.credits.entry(id).or_default() += amount;
    }

    /// What a dry-run invoice of the project's account amounts to now.
    pub fn upcoming_amount(&self, project: &str) -> Decimal {
        let s = self.state.lock().unwrap();
        s.account_by_key(project).map_or(Decimal::ZERO, |a| s.upcoming(&a.id))
    }

    /// The account id of a project.
    pub fn account_id(&self, project: &str) -> Option<String> {
        self.state.lock().unwrap().account_by_key(project).map(|a| a.id.clone())
    }

    /// For `duration` from now, every request is answered 503 with an empty body (as the proxy
    /// in front of a KillBill that is down does) or, alternately, hangs for `hang` first: a
    /// client with a shorter timeout sees a timeout.
    pub fn set_outage(&self, duration: Duration, hang: Duration) {
        self.faults.down_for(duration, hang);
    }

    /// Every `every`-th write (POST, PUT, DELETE), `count` times, takes effect and then its
    /// answer is lost: the client gets the empty 504 of the gateway in front of KillBill, as when
    /// KillBill committed but answered too late. A retry then meets what KillBill answers to a
    /// repeated write: 409/3000, 500/1031, 400/50000, 400/9000.
    pub fn lose_answers(&self, every: usize, count: usize) {
        self.faults.lose_answers(every, count);
    }

    /// The first cancel of each subscription takes `hold` to commit, holding the subscription's
    /// row meanwhile, as a slow KillBill does: a client that times out and cancels again waits
    /// for the first cancel to commit, and then meets 500/1031.
    pub fn slow_cancels(&self, hold: Duration) {
        self.state.lock().unwrap().cancel_hold = Some(hold);
    }

    /// Answers still to be lost (0: all spent).
    pub fn lost_answers_left(&self) -> usize {
        self.faults.lost_answers_left()
    }

    /// How many answers carried this KillBill error code (1031, 50000 …).
    pub fn answered_code(&self, code: i64) -> usize {
        self.state.lock().unwrap().codes.get(&code).copied().unwrap_or(0)
    }

    /// Every usage row stored: (subscription external key, unit, trackingId, amount).
    pub fn usage_records(&self) -> Vec<(String, String, String, Decimal)> {
        self.state.lock().unwrap().usage_records()
    }

    /// The next requests are answered with these statuses (empty body), whatever they are.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.faults.fail_next(statuses);
    }

    /// The catalogs uploaded, in order.
    pub fn catalogs(&self) -> Vec<String> {
        self.state.lock().unwrap().catalogs.clone()
    }

    /// Bodies the OpenAPI spec would reject.
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }

    /// Requests served so far.
    pub fn requests(&self) -> usize {
        self.faults.requests()
    }

    /// Usage rows stored (each record of each call).
    pub fn usage_rows(&self) -> usize {
        self.state.lock().unwrap().usage.len()
    }

    /// Custom fields on the object with this id.
    pub fn fields_of(&self, object_id: &str) -> Vec<(String, String)> {
        let s = self.state.lock().unwrap();
        s.fields.iter().filter(|f| f.object_id == object_id).map(|f| (f.name.clone(), f.value.clone())).collect()
    }

    /// Removes every custom field of the object with this id.
    pub fn delete_fields(&self, object_id: &str) {
        self.state.lock().unwrap().fields.retain(|f| f.object_id != object_id);
    }

    /// The usage recorded for the subscription with this key, dated `day` or later.
    pub fn usage_since(&self, key: &str, day: &str) -> Decimal {
        let from = parse_time(Some(&day.to_owned())).unwrap();
        self.state.lock().unwrap().usage_since(key, from)
    }

    /// The id of the subscription with this key.
    pub fn subscription_id(&self, key: &str) -> Option<String> {
        self.state.lock().unwrap().subscription_by_key(key).map(|x| x.id.clone())
    }

    /// What KillBill would bill, in the ledger's terms: accounts by key, subscriptions by key,
    /// usage per unit counting records dated up to the subscription's end.
    pub fn snapshot(&self) -> Snapshot {
        self.state.lock().unwrap().snapshot()
    }
}

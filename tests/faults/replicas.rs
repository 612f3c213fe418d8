//! Two replicas sharing one PostgreSQL state store settle the same due periods at once, each
//! through a KillBill client of its own, into one fake KillBill: every period is sent once, by
//! one of them.
//!
//! PostgreSQL comes from `CONCERTIM_BILLING_TEST_POSTGRES_URL` (deploy/dev/test.sh starts a
//! server and sets it); the test gets a schema of its own, dropped when it passes. Without the
//! variable the test says it is skipped, except under `CI`, where it fails.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use concertim_billing::{
    billing::{
        hooks::{Call, Hooked, Hooks},
        Applied, BillingError, Context, KillBill,
    },
    config::Settings,
    executor::{Delivery, Executor},
    settle::{Horizon, Pass, Settler},
    store::Store,
};
use sqlx::{postgres::PgConnection, Connection, Executor as _};

use crate::{
    assert_exact, assert_settled,
    support::killbill::FakeKillBill,
    traffic::{seed, Rng, Shape, Traffic, SETTLED_AT},
    Row,
};

/// The variable naming the test PostgreSQL database.
const POSTGRES_ENV: &str = "CONCERTIM_BILLING_TEST_POSTGRES_URL";

/// A fresh schema in the test PostgreSQL database (as the store's own tests make one).
struct PgSchema {
    server: String,
    name: String,
    /// The URL of a store in the schema.
    url: String,
}

impl PgSchema {
    /// Creates the schema, or says the test is skipped and returns `None` when no test database
    /// is configured (outside CI).
    async fn create() -> Option<PgSchema> {
        let Ok(server) = std::env::var(POSTGRES_ENV) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{POSTGRES_ENV} is not set, and CI must not skip the PostgreSQL tests: run them through deploy/dev/test.sh"
            );
            eprintln!("skipped: {POSTGRES_ENV} is not set (deploy/dev/test.sh sets it)");
            return None;
        };
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let name = format!("cb_faults_{}_{nanos}", std::process::id());
        let mut admin = PgConnection::connect(&server).await.expect("the test PostgreSQL database answers");
        admin.execute(format!("CREATE SCHEMA {name}").as_str()).await.expect("a test schema is created");
        admin.close().await.ok();
        let separator = if server.contains('?') { '&' } else { '?' };
        let url = format!("{server}{separator}options[search_path]={name}");
        Some(PgSchema { server, name, url })
    }

    /// Drops the schema and everything in it.
    async fn drop(self) {
        let mut admin = PgConnection::connect(&self.server).await.expect("the test PostgreSQL database answers");
        admin.execute(format!("DROP SCHEMA {} CASCADE", self.name).as_str()).await.expect("the test schema is dropped");
        admin.close().await.ok();
    }
}

/// What one replica sent to KillBill: usage calls and cancels, recorded or found done.
#[derive(Default)]
struct Sent {
    usage: AtomicUsize,
    usage_found: AtomicUsize,
    cancels: AtomicUsize,
    cancels_found: AtomicUsize,
}

impl Hooks for Sent {
    fn after(&self, call: Call<'_>, _: Context<'_>, result: &Result<Applied, BillingError>) {
        let (done, found) = match call {
            Call::RecordUsage(_) => (&self.usage, &self.usage_found),
            Call::CancelSubscription(..) => (&self.cancels, &self.cancels_found),
            _ => return,
        };
        match result {
            Ok(Applied::AlreadyDone) => found.fetch_add(1, Ordering::SeqCst),
            Ok(_) => done.fetch_add(1, Ordering::SeqCst),
            Err(_) => 0,
        };
    }
}

type Replica = Settler<Hooked<KillBill, Sent>>;

/// Passes until nothing is due, the instances the other replica holds included; returns the
/// passes.
async fn settle_all(replica: &Replica) -> Vec<Pass> {
    let mut passes = Vec::new();
    loop {
        let pass = replica.pass(Horizon::Now(SETTLED_AT)).await.expect("the store answers");
        assert!(pass.failures.is_empty(), "{:?}", pass.failures);
        let done = pass.reviewed == 0;
        passes.push(pass);
        if done {
            return passes;
        }
        assert!(passes.len() < 10_000, "settlement never ends");
        // Instances the other replica holds stay due until it has reviewed them.
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_a_postgres_state_store_settle_every_period_exactly_once() {
    let Some(schema) = PgSchema::create().await else { return };
    let mut rng = Rng::new(seed("replicas"));
    // 40 instances, each ending 24 to 72 hours after its launch, a third of them resized in
    // their last hour: about 1,900 periods.
    let shape = Shape { hours: (24, 72), ended: 1, resized: 3 };
    let (messages, later, expected) = Traffic::new(0xf1).lifecycles(4, 40, &shape, &mut rng);
    let fake = FakeKillBill::start().await;
    let mut settings = Settings::embedded();
    settings.billing.time.grace_s = 0;

    // The facts, through the service's own path into the shared store, in order (one consumer).
    let shared = Arc::new(Store::open(&schema.url).await.expect("a PostgreSQL store opens"));
    let executor =
        Executor::new(settings.clone(), KillBill::new(fake.settings()).unwrap()).with_store(Arc::clone(&shared));
    for m in messages.iter().chain(&later.messages()) {
        let outcome = executor.handle(Delivery { body: &m.body, redelivered: false }).await;
        assert!(outcome.class().is_none(), "{outcome:?}");
    }

    // Two replicas: a connection pool and a KillBill client each, one schema, one KillBill.
    let (mut replicas, mut clients) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let store = Arc::new(Store::open(&schema.url).await.expect("a PostgreSQL store opens"));
        let billing =
            Arc::new(Hooked { inner: Arc::new(KillBill::new(fake.settings()).unwrap()), hooks: Sent::default() });
        replicas.push(Settler::new(settings.clone(), Arc::clone(&billing), store));
        clients.push(billing);
    }
    let started = std::time::Instant::now();
    let (a, b) = tokio::join!(settle_all(&replicas[0]), settle_all(&replicas[1]));
    let took = started.elapsed();

    let (lost, duplicated) = assert_exact("replicas", &fake, &expected);
    assert_settled("replicas", &shared, &expected).await;
    // KillBill's trackingId check would hide a period sent twice; the clients' counts do not.
    let sent: Vec<&Sent> = clients.iter().map(|c| &c.hooks).collect();
    let count = |f: fn(&Sent) -> &AtomicUsize| sent.iter().map(|s| f(s).load(Ordering::SeqCst)).collect::<Vec<_>>();
    let (usage, usage_found) = (count(|s| &s.usage), count(|s| &s.usage_found));
    let (cancels, cancels_found) = (count(|s| &s.cancels), count(|s| &s.cancels_found));
    eprintln!(
        "replicas: periods sent by each {usage:?} (found recorded {usage_found:?}), cancels {cancels:?} \
         (found done {cancels_found:?}); passes {}/{}, instances skipped as held by the other {}/{}; {took:?}",
        a.len(),
        b.len(),
        a.iter().map(|p| p.held).sum::<usize>(),
        b.iter().map(|p| p.held).sum::<usize>()
    );
    assert_eq!(usage.iter().sum::<usize>(), expected.periods(), "each period sent once, by one replica");
    assert_eq!(usage_found, [0, 0], "no period sent twice");
    assert_eq!((cancels.iter().sum::<usize>(), cancels_found), (40, vec![0, 0]), "each instance cancelled once");
    assert!(usage.iter().all(|n| *n > 0), "both replicas settled: {usage:?}");
    let posted: Vec<usize> = [&a, &b].iter().map(|passes| passes.iter().map(|p| p.posted).sum()).collect();
    assert_eq!(posted, usage, "each replica's passes count the periods it sent, not the other's");
    Row {
        scenario: "two replicas, one PostgreSQL state store",
        messages: messages.len() + later.len(),
        faults: format!("2 replicas settling {} periods of 40 instances at once (sent {usage:?})", expected.periods()),
        lost,
        duplicated,
        dead_lettered: 0,
        recovered: took,
    }
    .print();
    drop((replicas, executor, shared));
    schema.drop().await;
}

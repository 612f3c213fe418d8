//! The real binary, billing to the fake KillBill and settling every second, SIGKILLed at random
//! points and restarted: while it works off a backlog of messages, and in the middle of the
//! settlement of many instances' periods.

use std::{
    collections::BTreeMap,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use concertim_billing::store::Store;

use crate::{
    assert_exact, assert_settled, dead_letters, settle, soak,
    support::{
        bus::{cli_command, signal, TestBus},
        killbill::FakeKillBill,
        wait::eventually,
    },
    traffic::{grace_s, publish_all, seed, Rng, Shape, Traffic},
    Row, BROKER_LOCK,
};

/// `concertim-billing run` billing to `fake`, its state in the SQLite file `state`, settling
/// every second on the clock of the generated traffic and taking over a dead process's claims
/// after a second, configured through the environment as an operator would, its stderr kept in
/// `log`. Its acknowledgements wait for a batch of 256 or a second, so that a kill finds many
/// pending; `/metrics` is served on `metrics_port`.
pub(crate) fn service_command(
    bus: &TestBus,
    fake: &FakeKillBill,
    state: &Path,
    log: &Path,
    metrics_port: u16,
) -> Command {
    let kb = fake.settings();
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut command = cli_command(bus);
    crate::support::killbill_env(command.arg("run"), &kb)
        .env("CONCERTIM_BILLING_BILLING__TIME__SETTLE_EVERY_S", "1")
        .env("CONCERTIM_BILLING_BILLING__TIME__GRACE_S", grace_s().to_string())
        .env("CONCERTIM_BILLING_STATE__PATH", state)
        .env("CONCERTIM_BILLING_STATE__CLAIM_LEASE_S", "1")
        .env("CONCERTIM_BILLING_BUS__ACK_BATCH", "256")
        .env("CONCERTIM_BILLING_BUS__ACK_DELAY_MS", "1000")
        .env("CONCERTIM_BILLING_HTTP__LISTEN", format!("127.0.0.1:{metrics_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    command
}

/// [`service_command`], started.
fn service(bus: &TestBus, fake: &FakeKillBill, state: &Path, log: &Path, metrics_port: u16) -> Child {
    service_command(bus, fake, state, log, metrics_port).spawn().expect("the binary starts")
}

/// A port nothing listens on now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The service's `concertim_billing_acks_pending` gauge: messages billed whose acknowledgement
/// has not been sent yet.
async fn acks_pending(port: u16) -> Option<u64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.ok()?.text().await.ok()?;
    let line = text.lines().find(|l| l.starts_with("concertim_billing_acks_pending "))?;
    line.rsplit(' ').next()?.parse::<f64>().ok().map(|v| v as u64)
}

/// Kills `child` with SIGKILL and checks that it died of it.
fn kill(child: &mut Child) {
    signal(child, "KILL");
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the service died of our SIGKILL, not of itself: {status:?}");
}

/// The state store of the running service, opened once it consumes (it has created and
/// migrated the file by then).
pub(crate) async fn state_store(bus: &TestBus, state: &Path) -> Store {
    let queue = bus.names().queue;
    eventually("the service to consume", Duration::from_secs(60), || async {
        bus.consumers(&queue).await.filter(|n| *n > 0)
    })
    .await;
    Store::open(state.to_str().unwrap()).await.expect("the service's state store opens")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_sigkilled_five_times_and_restarted_bills_every_message_exactly_once() {
    let _shared = BROKER_LOCK.read().await;
    let (total, kills) = if soak() { (50_000, 20) } else { (5_000, 5) };
    let mut rng = Rng::new(seed("sigkill"));
    let (messages, later, expected) = Traffic::new(0xb1).valid(total, 10, 50, &mut rng);
    let fake = FakeKillBill::start().await;
    let bus = TestBus::new("faults-kill").await;
    let dir = tempfile::tempdir().unwrap();
    let (log, state): (PathBuf, PathBuf) = (dir.path().join("service.log"), dir.path().join("state.db"));
    // The topology first, as an operator declares it, so the backlog waits in our queue.
    let declared = cli_command(&bus).args(["topology", "declare"]).output().unwrap();
    assert!(declared.status.success(), "{}", String::from_utf8_lossy(&declared.stderr));
    publish_all(&bus, &messages).await;

    // Kill points: random numbers of usage rows (samples and periods) in KillBill, spread over
    // the run.
    let rows = expected.rows();
    let mut points: Vec<usize> = (0..kills).map(|_| 1 + rng.below(rows as u64 * 9 / 10) as usize).collect();
    points.sort_unstable();
    let port = free_port();
    let mut child = service(&bus, &fake, &state, &log, port);
    let store = state_store(&bus, &state).await;
    // The first kill while billed messages wait for their acknowledgement: the broker delivers
    // them again to the next process, which must not bill them twice.
    let pending = eventually("acknowledgements pending", Duration::from_secs(60), || async {
        acks_pending(port).await.filter(|n| *n > 0)
    })
    .await;
    kill(&mut child);
    eprintln!("sigkill: killed with {pending} billed messages' acknowledgements pending");
    let child = service(&bus, &fake, &state, &log, free_port());
    let killing = async {
        let (mut child, mut killed_at, mut last_restart) = (child, Vec::new(), Instant::now());
        for point in points {
            eventually("KillBill to reach the kill point", Duration::from_secs(300), || async {
                (fake.usage_rows() >= point).then_some(())
            })
            .await;
            kill(&mut child);
            killed_at.push(fake.usage_rows());
            child = service(&bus, &fake, &state, &log, free_port());
            last_restart = Instant::now();
        }
        (child, killed_at, last_restart)
    };
    let ((), (mut child, killed_at, last_restart)) = tokio::join!(later.publish(&bus, &store), killing);
    eprintln!("sigkill: killed at {killed_at:?} of {rows} usage rows");
    settle(&bus, &fake, &store, &expected, 0, Duration::from_secs(300)).await;
    let recovered = last_restart.elapsed();
    signal(&child, "TERM");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM ends the last run cleanly");

    let (lost, duplicated) = assert_exact("sigkill", &fake, &expected);
    assert_settled("sigkill", &store, &expected).await;
    let dead = dead_letters(&bus).await;
    assert!(dead.is_empty(), "nothing is dead-lettered: {:?}", dead.iter().map(|d| &d.reason).collect::<Vec<_>>());
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!stderr.contains("panicked"), "the service panicked:\n{stderr}");
    Row {
        scenario: "binary SIGKILLed and restarted",
        messages: messages.len() + later.len(),
        faults: format!(
            "a SIGKILL with {pending} acknowledgements pending, then {kills} at random points (usage rows \
             {killed_at:?})"
        ),
        lost,
        duplicated,
        dead_lettered: 0,
        recovered,
    }
    .print();
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_sigkilled_in_the_middle_of_settlement_and_restarted_posts_every_period_exactly_once() {
    let _shared = BROKER_LOCK.read().await;
    let (instances, kills) = if soak() { (200, 10) } else { (60, 3) };
    let mut rng = Rng::new(seed("settlement-kill"));
    // Every instance ends, 24 to 72 hours after its launch: about 48 periods each, whose
    // amounts were computed from the generated lives.
    let shape = Shape { hours: (24, 72), ended: 1, resized: 0 };
    let (messages, later, expected) = Traffic::new(0xb2).lifecycles(6, instances, &shape, &mut rng);
    assert_eq!(later.len(), 0, "nothing resized: no message waits for another");
    let fake = FakeKillBill::start().await;
    let bus = TestBus::new("faults-settlement-kill").await;
    let dir = tempfile::tempdir().unwrap();
    let (log, state): (PathBuf, PathBuf) = (dir.path().join("service.log"), dir.path().join("state.db"));
    let declared = cli_command(&bus).args(["topology", "declare"]).output().unwrap();
    assert!(declared.status.success(), "{}", String::from_utf8_lossy(&declared.stderr));
    publish_all(&bus, &messages).await;

    // Kill points: random numbers of period rows in KillBill, between a tenth and nine tenths.
    let rows = expected.rows();
    let mut points: Vec<usize> = (0..kills).map(|_| rows / 10 + rng.below(rows as u64 * 8 / 10) as usize).collect();
    points.sort_unstable();
    let mut child = service(&bus, &fake, &state, &log, free_port());
    let store = state_store(&bus, &state).await;
    let mut killed = Vec::new();
    let mut last_restart = Instant::now();
    for point in points {
        // At the point, and while the service holds a claim: between claiming a step and
        // recording it posted, the window a crash must not turn into a loss or a double post.
        eventually("KillBill to reach the kill point, a claim open", Duration::from_secs(300), || async {
            (fake.usage_rows() >= point && store.counts().await.unwrap().claimed > 0).then_some(())
        })
        .await;
        kill(&mut child);
        // What the dead process left: the periods KillBill holds, and the steps it had
        // claimed and not confirmed (posted or not), which the next process must take over.
        let at = fake.usage_rows();
        let claimed = store.counts().await.unwrap().claimed;
        assert!(at < rows, "killed in the middle of the settlement: {at} of {rows} rows posted");
        killed.push((at, claimed));
        child = service(&bus, &fake, &state, &log, free_port());
        last_restart = Instant::now();
    }
    eprintln!("settlement kill: killed at (rows posted of {rows}, claims left) {killed:?}");
    settle(&bus, &fake, &store, &expected, 0, Duration::from_secs(300)).await;
    let recovered = last_restart.elapsed();
    signal(&child, "TERM");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM ends the last run cleanly");

    let (lost, duplicated) = assert_exact("settlement kill", &fake, &expected);
    assert_settled("settlement kill", &store, &expected).await;
    // Who posted what: one owner per process; the ones after a kill finished the work.
    let mut by_owner: BTreeMap<String, usize> = BTreeMap::new();
    for instance in expected.instances() {
        for p in store.postings(instance, None).await.unwrap() {
            *by_owner.entry(p.owner).or_default() += 1;
        }
    }
    assert!(by_owner.len() >= 2, "the processes after a kill posted what was left: {by_owner:?}");
    let resent = fake.answered_code(50000);
    eprintln!(
        "settlement kill: steps posted per process {:?}; {resent} usage calls sent again after a kill \
         found KillBill had them (400/50000)",
        by_owner.values().collect::<Vec<_>>()
    );
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!stderr.contains("panicked"), "the service panicked:\n{stderr}");
    Row {
        scenario: "binary SIGKILLed in the middle of settlement and restarted",
        messages: messages.len(),
        faults: format!(
            "{kills} SIGKILLs while settling {} periods of {instances} instances (rows posted, claims left: \
             {killed:?}); claims taken over after 1 s; {resent} periods re-sent and found recorded",
            expected.periods()
        ),
        lost,
        duplicated,
        dead_lettered: 0,
        recovered,
    }
    .print();
    bus.cleanup().await;
}

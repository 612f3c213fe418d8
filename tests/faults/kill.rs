//! The real binary, billing to the fake KillBill, SIGKILLed at random points and restarted.

use std::{
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use crate::{
    assert_exact, dead_letters, settle, soak,
    support::{
        bus::{cli_command, signal, TestBus},
        killbill::FakeKillBill,
        wait::eventually,
    },
    traffic::{publish_all, seed, Rng, Traffic},
    Row, BROKER_LOCK,
};

/// `concertim-billing run` billing to `fake`, configured through the environment as an operator
/// would, its stderr kept in `log`.
fn service(bus: &TestBus, fake: &FakeKillBill, log: &Path) -> Child {
    let kb = fake.settings();
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut command = cli_command(bus);
    crate::support::killbill_env(command.arg("run"), &kb)
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("the binary starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_sigkilled_five_times_and_restarted_bills_every_message_exactly_once() {
    let _shared = BROKER_LOCK.read().await;
    let (total, kills) = if soak() { (50_000, 20) } else { (5_000, 5) };
    let mut rng = Rng::new(seed("sigkill"));
    let (messages, expected) = Traffic::new(0xb1).valid(total, 10, 50, &mut rng);
    let fake = FakeKillBill::start().await;
    let bus = TestBus::new("faults-kill").await;
    let dir = tempfile::tempdir().unwrap();
    let log: PathBuf = dir.path().join("service.log");
    // The topology first, as an operator declares it, so the backlog waits in our queue.
    let declared = cli_command(&bus).args(["topology", "declare"]).output().unwrap();
    assert!(declared.status.success(), "{}", String::from_utf8_lossy(&declared.stderr));
    publish_all(&bus, &messages).await;

    // Kill points: random numbers of usage rows in KillBill, spread over the run.
    let rows = expected.usage_messages() * 2;
    let mut points: Vec<usize> = (0..kills).map(|_| 1 + rng.below(rows as u64 * 9 / 10) as usize).collect();
    points.sort_unstable();
    let mut child = service(&bus, &fake, &log);
    let mut killed_at = Vec::new();
    let mut last_restart = Instant::now();
    for point in points {
        eventually("KillBill to reach the kill point", Duration::from_secs(300), || async {
            (fake.usage_rows() >= point).then_some(())
        })
        .await;
        signal(&child, "KILL");
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "the service died of our SIGKILL, not of itself: {status:?}");
        killed_at.push(fake.usage_rows());
        child = service(&bus, &fake, &log);
        last_restart = Instant::now();
    }
    eprintln!("sigkill: killed at {killed_at:?} of {rows} usage rows");
    settle(&bus, &fake, &expected, 0, Duration::from_secs(300)).await;
    let recovered = last_restart.elapsed();
    signal(&child, "TERM");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM ends the last run cleanly");

    let (lost, duplicated) = assert_exact("sigkill", &fake, &expected);
    let dead = dead_letters(&bus).await;
    assert!(dead.is_empty(), "nothing is dead-lettered: {:?}", dead.iter().map(|d| &d.reason).collect::<Vec<_>>());
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!stderr.contains("panicked"), "the service panicked:\n{stderr}");
    Row {
        scenario: "binary SIGKILLed and restarted",
        messages: messages.len(),
        faults: format!("{kills} SIGKILLs at random points (usage rows {killed_at:?})"),
        lost,
        duplicated,
        dead_lettered: 0,
        recovered,
    }
    .print();
    bus.cleanup().await;
}

//! `/healthz`, `/readyz` and `/metrics` of a running service.

use std::time::Duration;

use concertim_billing::{
    billing::Ledger,
    executor::{Delivery, Executor, Outcome},
    fixture::FixtureDelivery,
};

use crate::support::{
    bus::{billed_test_units, cli_command, signal, usage_batch, usage_fixture, Proxy, TestBus},
    deliveries,
    wait::eventually,
};

const LIMIT: Duration = Duration::from_secs(60);

async fn get(url: &str) -> Option<(u16, String)> {
    let response = reqwest::get(url).await.ok()?;
    Some((response.status().as_u16(), response.text().await.ok()?))
}

/// The sum of a counter's series with this label, from the Prometheus text.
fn counter(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_readiness_follows_the_broker() {
    let bus = TestBus::new("http").await;
    let proxy = Proxy::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.db");
    let mut service = cli_command(&bus)
        .args(["--amqp-url", &proxy.url, "run", "--ledger", ledger.to_str().unwrap()])
        .env("CONCERTIM_BILLING_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = format!("{base}/readyz");
    let (_, body) = eventually("ready", LIMIT, || async { get(&ready).await.filter(|(s, _)| *s == 200) }).await;
    assert!(body.contains("billing to embedded ledger in "), "/readyz names where billing goes: {body}");
    assert_eq!(get(&format!("{base}/healthz")).await.unwrap().0, 200);

    // What the fixtures should count, from an offline run.
    let fixtures: Vec<FixtureDelivery> = deliveries("").into_iter().filter(|d| bus.routes(d)).collect();
    let offline = Executor::new(bus.settings.clone(), Ledger::in_memory());
    let (mut processed, mut invalid) = (0, 0);
    for d in &fixtures {
        match offline.handle(Delivery { body: &d.body, redelivered: false }).await {
            Outcome::Processed { .. } => processed += 1,
            Outcome::Invalid(_) => invalid += 1,
            _ => {}
        }
    }
    for d in &fixtures {
        bus.publish(d).await;
    }
    let metrics = format!("{base}/metrics");
    let text = eventually("every message counted", LIMIT, || async {
        let (_, text) = get(&metrics).await?;
        (counter(&text, "concertim_billing_messages_total", "outcome=") as usize == fixtures.len()).then_some(text)
    })
    .await;
    assert_eq!(counter(&text, "concertim_billing_messages_total", "outcome=\"processed\""), processed);
    assert_eq!(counter(&text, "concertim_billing_messages_total", "outcome=\"invalid\""), invalid);
    assert_eq!(counter(&text, "concertim_billing_dead_lettered_total", "class=\"invalid\""), invalid);
    assert!(text.contains("concertim_billing_bus_to_effect_seconds"), "{text}");
    assert!(text.contains("concertim_billing_broker_connected 1"), "{text}");

    proxy.set_down(true);
    eventually("not ready while the broker is away", LIMIT, || async { get(&ready).await.filter(|(s, _)| *s == 503) })
        .await;
    proxy.set_down(false);
    eventually("ready again after reconnecting", LIMIT, || async { get(&ready).await.filter(|(s, _)| *s == 200) })
        .await;

    signal(&service, "TERM");
    assert!(service.wait().unwrap().success());
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_of_a_whole_run_never_contain_the_configured_passwords() {
    let bus = TestBus::new("logs").await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl");
        assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let (user, password) = (format!("{}user", bus.prefix), "Sup3r-Secret-amqp-pw");
    run(&["add_user", &user, password]);
    run(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let killbill_password = "Sup3r-Secret-killbill-pw";
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.db");
    let mut service = cli_command(&bus)
        .args(["--log-format", "json", "run", "--ledger", ledger.to_str().unwrap()])
        .env("CONCERTIM_BILLING_AMQP_URL", format!("amqp://{user}:{password}@127.0.0.1:5672/%2f"))
        .env("CONCERTIM_BILLING_KILLBILL__URL", "http://127.0.0.1:1")
        .env("CONCERTIM_BILLING_KILLBILL__USERNAME", "admin")
        .env("CONCERTIM_BILLING_KILLBILL__PASSWORD", killbill_password)
        .env("CONCERTIM_BILLING_KILLBILL__API_KEY", "key")
        .env("CONCERTIM_BILLING_KILLBILL__API_SECRET", killbill_password)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read while it runs: a whole run's debug log is larger than a pipe's buffer (64 KiB), and a
    // full pipe blocks the service at its next log line, with messages still to consume.
    let mut stderr = service.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut logs = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut logs).unwrap();
        logs
    });
    let queue = bus.names().queue;
    eventually("the service to consume", LIMIT, || async {
        (bus.consumers(&queue).await.unwrap_or(0) > 0).then_some(())
    })
    .await;
    let fixtures: Vec<FixtureDelivery> = deliveries("").into_iter().filter(|d| bus.routes(d)).collect();
    for d in &fixtures {
        bus.publish(d).await;
    }
    eventually("everything consumed", LIMIT, || async { (bus.depth(&queue).await == 0).then_some(()) }).await;
    signal(&service, "TERM");
    assert!(service.wait().unwrap().success());
    let logs = reader.join().unwrap();
    assert!(logs.lines().count() > fixtures.len(), "a line per message at least");
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    assert!(!logs.contains(password) && !logs.contains(killbill_password), "a password reached the logs");
    run(&["delete_user", &user]);
    bus.cleanup().await;
}

#[test]
fn run_without_a_configured_backend_refuses_to_bill_into_memory_and_says_what_to_do() {
    // A replica started without its config: before, it billed into an in-memory ledger and
    // acknowledged its share of the messages.
    let output = crate::support::binary().args(["--amqp-url", "amqp://127.0.0.1:1/%2f", "run"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no billing backend is configured") && stderr.contains("--ledger FILE"), "{stderr}");
    let check = crate::support::run_cli(&["config", "check"]);
    assert!(String::from_utf8_lossy(&check.stdout).contains("# billing backend: embedded ledger"));
}

#[test]
fn operator_inputs_are_checked_before_anything_is_done() {
    // --amqp-url used to skip the URL check that bus.url gets.
    let out =
        crate::support::binary().args(["--amqp-url", "http://127.0.0.1:5672", "topology", "declare"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must start with amqp:// or amqps://"));
    // An empty --id (a prefix of every id) used to select every dead letter without --all.
    let out = crate::support::binary()
        .args(["--amqp-url", "amqp://127.0.0.1:1/%2f", "dlq", "purge", "--id", "", "--yes"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("purge what?"));
    // Certificate verification turned off is said out loud.
    let out = crate::support::binary()
        .args(["config", "check"])
        .env("CONCERTIM_BILLING_CONCERTIM__URL", "https://concertim.example")
        .env("CONCERTIM_BILLING_CONCERTIM__USERNAME", "admin")
        .env("CONCERTIM_BILLING_CONCERTIM__PASSWORD", "secret")
        .env("CONCERTIM_BILLING_CONCERTIM__TLS_VERIFY", "false")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("WARNING: concertim.tls_verify = false"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(Iterator::count).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_neither_uses_up_descriptors_nor_stops_billing() {
    // Before: no connection limit and no timeouts. Idle connections used up the descriptors,
    // and every call that needed a new one (the ledger's file, a billing request) failed.
    let bus = TestBus::new("httpflood").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.db");
    let mut service = cli_command(&bus)
        .args(["run", "--ledger", ledger.to_str().unwrap()])
        .env("CONCERTIM_BILLING_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = format!("{base}/readyz");
    eventually("ready", LIMIT, || async { get(&ready).await.filter(|(s, _)| *s == 200) }).await;
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &service.id().to_string(), "--nofile=256:256"])
        .status()
        .expect("prlimit (util-linux)");
    assert!(limited.success());
    let baseline = open_descriptors(service.id());

    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    for d in &usage_batch(&usage_fixture(), 100) {
        bus.publish(d).await;
    }
    eventually("every message billed during the flood", LIMIT, || async {
        (billed_test_units(&ledger).await == 1000).then_some(())
    })
    .await;
    let during = open_descriptors(service.id());
    assert!(
        during <= baseline + concertim_billing::http::MAX_CONNECTIONS + 16,
        "{during} descriptors open during the flood, {baseline} before"
    );
    assert_eq!(bus.depth(&bus.names().dead_queue).await, 0);
    // The service closes every idle connection itself: the ones over the limit at once, the
    // others when their time to send headers is up.
    for mut stream in idle {
        let mut buffer = [0u8; 64];
        let read = tokio::time::timeout(LIMIT, tokio::io::AsyncReadExt::read(&mut stream, &mut buffer)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "an idle connection was kept: {read:?}");
    }
    assert_eq!(get(&format!("{base}/healthz")).await.unwrap().0, 200);
    signal(&service, "TERM");
    assert!(service.wait().unwrap().success());
    bus.cleanup().await;
}

//! One settlement pass over many running instances, and what it costs per instance and per
//! settled period: `cargo bench --bench settlement [-- INSTANCES [PERIODS] [STORE]]` (defaults
//! 100000 instances, 1 due period each, an in-memory store; STORE may be a SQLite file path or
//! a postgres:// URL). Prints the figures the README reports; it is a measurement, not a test.

use std::{sync::Arc, time::Instant};

use concertim_billing::{
    billing::Ledger,
    config::Settings,
    settle::{Horizon, Settler},
    store::Store,
    timeline::{Fact, Size, Source},
};

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it, as a
    // smoke test that must stay quick in a debug build.
    let measuring = std::env::args().any(|a| a == "--bench");
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let instances: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(if measuring { 100_000 } else { 200 });
    let periods: i64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1);
    let url = args.get(2).cloned();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let store = Arc::new(match &url {
            Some(url) => Store::open(url).await.unwrap(),
            None => Store::in_memory().await.unwrap(),
        });
        let launched = 1_740_960_000; // 2025-03-03T00:00:00Z
        let size = Size { name: "m1.small".into(), vcpus: 2, memory_mb: 4096, disk_gb: 40, bytes: 0 };
        let started = Instant::now();
        for i in 0..instances {
            let fact = Fact::Launch {
                at: launched + (i % 3600) as i64,
                source: Source::Nova,
                seen: launched,
                size: size.clone(),
            };
            store
                .add_facts(
                    &format!("i-{i:08}"),
                    "instance",
                    &format!("p-{:04}", i % 1000),
                    &[(fact.key(), fact.effective())],
                )
                .await
                .unwrap();
        }
        let facts_s = started.elapsed().as_secs_f64();
        let settler = Settler::new(Settings::embedded(), Arc::new(Ledger::in_memory()), Arc::clone(&store));
        let now = launched + 3600 * periods + 900;
        let started = Instant::now();
        let pass = settler.pass(Horizon::Now(now)).await.unwrap();
        let pass_s = started.elapsed().as_secs_f64();
        assert!(pass.failures.is_empty(), "{:?}", &pass.failures[..pass.failures.len().min(3)]);
        let started = Instant::now();
        let idle = settler.pass(Horizon::Now(now)).await.unwrap();
        let idle_s = started.elapsed().as_secs_f64();
        println!("store: {}", store.describe());
        println!(
            "facts: {instances} instances recorded in {facts_s:.2} s ({:.0} µs each)",
            facts_s * 1e6 / instances as f64
        );
        println!(
            "pass: {} instances, {} periods posted in {pass_s:.2} s ({:.0} µs per instance, {:.0} µs per period)",
            pass.reviewed,
            pass.posted,
            pass_s * 1e6 / pass.reviewed.max(1) as f64,
            pass_s * 1e6 / pass.posted.max(1) as f64
        );
        println!("idle pass (nothing due): {} reviewed in {idle_s:.3} s", idle.reviewed);
    });
}

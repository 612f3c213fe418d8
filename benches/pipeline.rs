//! Decode + plan throughput over the bundled fixtures, and the whole executor into the ledger.
//!
//! `cargo bench --bench pipeline`; the README reports the figures.

use std::path::PathBuf;

use concertim_billing::{
    billing::Ledger,
    config::Settings,
    executor::{Delivery, Executor},
    notification::{decode, DecodeLimits},
    plan::plan,
    replay::fixture,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

/// Every well-formed delivery body of fixtures/ (the malformed folder measures nothing useful).
fn bodies() -> Vec<Vec<u8>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let files = fixture::collect_files(&[root]).expect("fixtures are readable");
    let mut bodies = Vec::new();
    for file in files.iter().filter(|f| !f.to_string_lossy().contains("malformed")) {
        let text = std::fs::read_to_string(file).unwrap();
        bodies.extend(text.lines().filter_map(|l| fixture::parse_line(l).ok()).map(|d| d.body));
    }
    bodies
}

fn pipeline(c: &mut Criterion) {
    let bodies = bodies();
    let settings = Settings::embedded();
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("fixtures");
    group.throughput(Throughput::Elements(bodies.len() as u64));

    group.bench_function("decode", |b| {
        b.iter(|| {
            for body in &bodies {
                let _ = black_box(decode(black_box(body), limits));
            }
        })
    });

    group.bench_function("decode+plan", |b| {
        b.iter(|| {
            for body in &bodies {
                if let Ok(n) = decode(black_box(body), limits) {
                    let _ = black_box(plan(&n, &settings));
                }
            }
        })
    });

    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    group.bench_function("decode+plan+ledger", |b| {
        b.iter(|| {
            let executor = Executor::new(settings.clone(), Ledger::in_memory());
            runtime.block_on(async {
                for body in &bodies {
                    black_box(executor.handle(Delivery { body, redelivered: false }).await);
                }
            });
        })
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);

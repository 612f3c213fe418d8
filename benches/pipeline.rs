//! Decode, plan and the executor over the bundled fixtures, and per message kind.
//!
//! `cargo bench --bench pipeline`; the README reports the figures.

use std::path::PathBuf;

use concertim_billing::{
    billing::Ledger,
    config::Settings,
    executor::{Delivery, Executor},
    fixture,
    notification::{decode, DecodeLimits},
    plan::plan,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

/// Every well-formed delivery body of fixtures/ (the malformed folder measures nothing useful).
fn bodies() -> Vec<Vec<u8>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let files = fixture::collect_files(&[root]).expect("fixtures are readable");
    let files: Vec<PathBuf> = files.into_iter().filter(|f| !f.to_string_lossy().contains("malformed")).collect();
    fixture::read_all(&files).into_iter().filter_map(|(_, d)| d.ok()).map(|d| d.body).collect()
}

/// The first fixture body whose text contains `needle`.
fn kind(all: &[Vec<u8>], needle: &str) -> Vec<u8> {
    all.iter().find(|b| String::from_utf8_lossy(b).contains(needle)).expect("a fixture of this kind").clone()
}

/// A `metering` message with `n` samples, made from a fixture's samples.
fn metering(all: &[Vec<u8>], n: usize) -> Vec<u8> {
    let envelope: serde_json::Value =
        serde_json::from_slice(&kind(all, "\\\"event_type\\\": \\\"metering\\\"")).unwrap();
    let mut message: serde_json::Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    let samples = message["payload"].as_array().unwrap().clone();
    message["payload"] = samples.iter().cycle().take(n).cloned().collect();
    serde_json::to_vec(&serde_json::json!({"oslo.version": "2.0", "oslo.message": message.to_string()})).unwrap()
}

fn pipeline(c: &mut Criterion) {
    let bodies = bodies();
    let settings = Settings::embedded();
    let limits = DecodeLimits::default();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

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

    let kinds = [
        ("keystone-cadf", kind(&bodies, "eventTime")),
        ("nova-legacy-create", kind(&bodies, "compute.instance.create.end")),
        ("nova-versioned-create", kind(&bodies, "\\\"instance.create.end")),
        ("ceilometer-10-samples", metering(&bodies, 10)),
        ("unhandled", kind(&bodies, "image.upload")),
        ("invalid", b"{\"oslo.version\": \"2.0\", \"oslo.message\": \"{broken\"}".to_vec()),
    ];
    let mut group = c.benchmark_group("kind");
    group.throughput(Throughput::Elements(1));
    for (name, body) in &kinds {
        group.bench_function(format!("{name}/decode+plan"), |b| {
            b.iter(|| {
                if let Ok(n) = decode(black_box(body), limits) {
                    let _ = black_box(plan(&n, &settings));
                }
            })
        });
        group.bench_function(format!("{name}/decode+plan+ledger"), |b| {
            // One ledger for the whole run: repeats find their work done, as a replay would.
            let executor = Executor::new(settings.clone(), Ledger::in_memory());
            b.iter(|| runtime.block_on(executor.handle(Delivery { body, redelivered: false })))
        });
    }
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);

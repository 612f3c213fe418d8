//! The layering of `src/`: every `crate::…` a module names (outside its unit tests) must be one
//! its layer may use. The table is the README's (Layout, "Dependencies point one way"); a new
//! import against it fails here, naming the file and the module it reached for.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Each module of `src/` and the modules it may use. `main` (the binary) and `lib` may use any.
const ALLOWED: &[(&str, &[&str])] = &[
    // Foundations: the domain's value types, error classes, shared formats and helpers.
    // An instance's timeline: facts → seconds held, pure arithmetic over plain values.
    ("timeline", &[]),
    ("event", &["timeline"]),
    ("class", &[]),
    ("fields", &[]),
    ("fixture", &[]),
    ("outbound", &[]),
    ("redact", &[]),
    ("config", &["event", "timeline"]),
    ("retry", &["config"]),
    ("telemetry", &["event", "redact"]),
    // Durable state: knows failure classes, nothing of events or billing.
    ("store", &["class"]),
    // The pure core: wire formats in, billing actions out.
    ("notification", &["config", "event", "fields", "timeline"]),
    ("plan", &["config", "event", "timeline"]),
    // Prices: the catalog file read as a price list, and KillBill's item arithmetic. Pure.
    ("price", &["event"]),
    // Effects.
    ("billing", &["class", "config", "event", "fields", "outbound", "plan", "price", "store"]),
    // The OpenStack API: what the bus cannot say.
    ("keystone", &["class", "config", "event", "outbound", "telemetry"]),
    ("concertim", &["billing", "class", "config", "event", "outbound", "retry", "telemetry"]),
    ("settle", &["billing", "class", "config", "event", "plan", "store", "timeline"]),
    (
        "executor",
        &["billing", "class", "concertim", "config", "event", "notification", "plan", "settle", "store", "timeline"],
    ),
    // The transport, and what runs on top of it.
    ("bus", &["class", "config", "event", "fixture", "retry", "telemetry"]),
    (
        "handle",
        &["billing", "bus", "class", "concertim", "config", "event", "executor", "notification", "retry", "telemetry"],
    ),
    ("replay", &["billing", "bus", "class", "config", "event", "executor", "fixture", "price", "settle", "store"]),
    ("http", &["telemetry"]),
    ("api", &["billing", "class", "config", "telemetry"]),
    (
        "app",
        &[
            "api",
            "billing",
            "bus",
            "config",
            "event",
            "executor",
            "handle",
            "http",
            "keystone",
            "price",
            "settle",
            "store",
            "telemetry",
        ],
    ),
    ("capture", &["bus", "config", "fixture", "redact"]),
    ("dlq", &["bus", "class", "concertim", "config", "event", "fixture", "notification", "redact"]),
];

/// The modules a source file names as `crate::<module>` (in paths and in `use crate::{…}`
/// groups), its unit tests left out.
fn crate_modules(source: &str) -> BTreeSet<String> {
    let source = match source.find("\n#[cfg(test)]\nmod ") {
        Some(tests) => &source[..tests],
        None => source,
    };
    let ident = |text: &str| -> String {
        text.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
    };
    let mut found = BTreeSet::new();
    for (at, _) in source.match_indices("crate::") {
        let rest = &source[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first name of each item of the group, at its top level.
            let mut depth = 0usize;
            let mut item_start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(&group[item_start..i]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(&group[item_start..i]));
                        item_start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.remove("");
    found
}

/// The module a file of `src/` belongs to: `bus` for `src/bus/consumer.rs`, `plan` for
/// `src/plan.rs`.
fn module_of(relative: &Path) -> String {
    let first = relative.components().next().expect("a path").as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every import against the table, as `file: module -> target`.
fn violations(files: &[(String, String, String)]) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut out = Vec::new();
    for (file, module, source) in files {
        if module == "main" || module == "lib" {
            continue;
        }
        let Some(may) = allowed.get(module.as_str()) else {
            out.push(format!("{file}: module {module} is not in the table of tests/architecture.rs"));
            continue;
        };
        for target in crate_modules(source) {
            if target != *module && !may.contains(&target.as_str()) {
                out.push(format!("{file}: {module} -> {target}"));
            }
        }
    }
    out
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let files: Vec<(String, String, String)> = paths
        .iter()
        .map(|p| {
            let relative = p.strip_prefix(&src).unwrap();
            (relative.display().to_string(), module_of(relative), std::fs::read_to_string(p).unwrap())
        })
        .collect();
    assert!(files.len() > 30, "read {} files from {}", files.len(), src.display());
    let found = violations(&files);
    assert!(found.is_empty(), "imports against the layering (README, Layout):\n{}", found.join("\n"));
}

#[test]
fn a_forbidden_import_is_caught_in_a_path_and_in_a_use_group() {
    let file = |source: &str| vec![("plan.rs".to_owned(), "plan".to_owned(), source.to_owned())];
    assert_eq!(violations(&file("use crate::{config::X, event::{A, B}};")), Vec::<String>::new());
    assert_eq!(violations(&file("use crate::{config::X, billing::{Ledger, Billing}};")), ["plan.rs: plan -> billing"]);
    assert_eq!(violations(&file("fn f() { crate::bus::run(); }")), ["plan.rs: plan -> bus"]);
    let in_tests = "use crate::event::A;\n#[cfg(test)]\nmod tests {\n    use crate::billing::Ledger;\n}\n";
    assert_eq!(violations(&file(in_tests)), Vec::<String>::new(), "unit tests may use anything");
}

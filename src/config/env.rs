//! `CONCERTIM_BILLING_*` overrides: each a key path and its TOML value.

use super::*;

/// The overrides found in the environment: `CONCERTIM_BILLING_BUS__URL=…` → `(["bus","url"], …)`.
pub fn env_overrides(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(Vec<String>, String)> {
    vars.into_iter()
        .filter_map(|(key, value)| {
            let rest = key.strip_prefix(ENV_PREFIX)?;
            // CONFIG, AMQP_URL and LOG_FORMAT are the command line's own variables; REQUIRE_* and
            // TEST_* belong to the test suite.
            let own = matches!(rest, "CONFIG" | "AMQP_URL" | "LOG_FORMAT")
                || rest.starts_with("REQUIRE_")
                || rest.starts_with("TEST_");
            (!own && !rest.is_empty()).then(|| (rest.split("__").map(str::to_ascii_lowercase).collect(), value))
        })
        .collect()
}

/// The keys whose override is always a string, whatever it looks like: a numeric password
/// stays a password (and is never shown back in a type error).
pub(super) const LITERAL_KEYS: [&str; 15] = [
    "password",
    "api_secret",
    "api_key",
    "url",
    "username",
    "api_id",
    "token",
    "created_by",
    "prefix",
    "project",
    "user_domain",
    "project_domain",
    "application_credential_id",
    "application_credential_secret",
    "ca_file",
];

/// An environment override as a TOML value: literally a string for secrets and for keys the
/// file already holds a string in; otherwise a bare TOML value (number, boolean, array, inline
/// table) when it parses as one.
pub(super) fn override_value(table: &toml::Table, path: &[String], text: &str) -> toml::Value {
    let literal = path.last().is_some_and(|key| LITERAL_KEYS.contains(&key.as_str()) || key.ends_with("_file"))
        || matches!(get_path(table, path), Some(toml::Value::String(_)));
    if literal {
        return toml::Value::String(text.to_owned());
    }
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

pub(super) fn get_path<'t>(table: &'t toml::Table, path: &[String]) -> Option<&'t toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut current = table;
    for key in parents {
        current = current.get(key)?.as_table()?;
    }
    current.get(last)
}

/// The environment variable that sets `path`.
pub(super) fn env_name(path: &[String]) -> String {
    format!("{ENV_PREFIX}{} (environment)", path.join("__").to_ascii_uppercase())
}

/// A deserializer's message without the value it quotes: ``invalid type: integer `83750291`,
/// expected a string`` becomes `invalid type: integer, expected a string` (the value may be a
/// secret; the key is named after it).
pub(super) fn without_values(message: &str) -> String {
    let message = message.trim_end();
    let Some(rest) = ["invalid type: ", "invalid value: ", "invalid length "]
        .iter()
        .find_map(|p| message.strip_prefix(p).map(|rest| (p, rest)))
    else {
        return message.replace('\n', " ");
    };
    let (prefix, rest) = rest;
    let (quoted, tail) = rest.split_once(", expected").unwrap_or((rest, ""));
    // Values are quoted with backticks (numbers) or double quotes (strings).
    let mut kept = String::new();
    let mut quote = None;
    for c in quoted.chars() {
        match (quote, c) {
            (None, '`' | '"') => quote = Some(c),
            (None, c) => kept.push(c),
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
    }
    let kept = kept.split_whitespace().collect::<Vec<_>>().join(" ");
    let tail = if tail.is_empty() { String::new() } else { format!(", expected{tail}") };
    format!("{prefix}{kept}{tail}").replace('\n', " ")
}

pub(super) fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut current = table;
    for key in parents {
        let entry = current.entry(key.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        current = entry.as_table_mut().expect("just made a table");
    }
    current.insert(last.clone(), value);
}

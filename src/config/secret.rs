//! Secrets and the broker URL: never shown; read from files that only this service may read.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret (password, API secret): never shown in `Debug`, `Display` or `config check`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one call that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// A broker URL whose password never appears in `Debug`, `Display` or `config check`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`. The user information ends at the last
    /// `@` (a password may hold an unencoded `/` or `:`, which ends no part of it); text that is
    /// not a URL is not shown beyond what follows its last `@`.
    pub fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return match self.0.rsplit_once('@') {
                Some((_, host)) => format!("(not a URL: ***@{host})"),
                None if self.0.contains(':') => "(not a URL)".to_owned(),
                None => self.0.clone(),
            };
        };
        match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => format!("{scheme}://{userinfo}@{host}"),
            },
            None => self.0.clone(),
        }
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// The keys whose value may come from a file instead (`password_file = "/run/secrets/kb"`):
/// the secrets, and the broker URL, which carries its password.
pub(super) const SECRET_FILE_KEYS: [&str; 6] =
    ["password", "api_secret", "api_key", "url", "jwt_secret", "application_credential_secret"];

/// Replaces every `<secret>_file` key (at any level) with `<secret>` read from that file, its
/// trailing newline dropped, as design §4 asks of every secret. Errors name the key and the
/// file, never the contents.
pub(super) fn read_secret_files(table: &mut toml::Table, at: &str) -> Result<(), String> {
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let path = if at.is_empty() { key.clone() } else { format!("{at}.{key}") };
        if let Some(toml::Value::Table(inner)) = table.get_mut(&key) {
            read_secret_files(inner, &path)?;
            continue;
        }
        let Some(base) = key.strip_suffix("_file").filter(|b| SECRET_FILE_KEYS.contains(b)) else { continue };
        let Some(toml::Value::String(file)) = table.get(&key).cloned() else {
            return Err(format!("{path} must be the path of a file"));
        };
        if table.contains_key(base) {
            return Err(format!("{path} and {} are both set: keep one", path.trim_end_matches("_file")));
        }
        private_enough(&file).map_err(|e| format!("{path}: {e}"))?;
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{path}: cannot read {file}: {e}"))?;
        table.remove(&key);
        table.insert(base.to_owned(), toml::Value::String(text.trim_end_matches(['\n', '\r']).to_owned()));
    }
    Ok(())
}

/// Refuses a secret file others may read or anyone may change (a mode beyond `0640`).
pub(super) fn private_enough(file: &str) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode =
            std::fs::metadata(file).map_err(|e| format!("cannot read {file}: {e}"))?.permissions().mode() & 0o777;
        if mode & !0o640 != 0 {
            return Err(format!(
                "{file} has mode {mode:04o}: a secret file must not be readable by others or writable by its group; \
                 chmod 0600 it (Kubernetes: defaultMode: 0440 on the Secret volume, with fsGroup)"
            ));
        }
    }
    Ok(())
}

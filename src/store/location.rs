//! Where a store lives, parsed from its URL: what to connect to, and how to name it in logs
//! without its password.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
};

use sqlx::{postgres::PgConnectOptions, sqlite::SqliteConnectOptions};

use super::StoreError;

/// Where a store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    /// A SQLite file, by absolute path (created when missing).
    File(PathBuf),
    /// An in-memory SQLite database, gone when the store is dropped.
    Memory,
    /// A PostgreSQL database.
    Postgres {
        /// The URL as given (it may hold a password: never printed).
        url: String,
        /// `host:port/database`, for logs.
        shown: String,
    },
}

/// What the URL forms accept, for error messages.
const ACCEPTED: &str = "use a path, sqlite://PATH, sqlite::memory: or postgres://USER@HOST:PORT/DATABASE";

impl Location {
    /// Parses a store URL: `sqlite://PATH`, `sqlite:PATH` or a plain path → a SQLite file;
    /// `sqlite::memory:` → in memory; `postgres://…` or `postgresql://…` → PostgreSQL.
    ///
    /// # Errors
    /// [`StoreError::Url`] for another scheme, SQLite URL parameters (the store sets its own), a
    /// PostgreSQL URL that does not parse, or a path that is not UTF-8.
    pub(crate) fn parse(url: &str) -> Result<Location, StoreError> {
        let bad = |detail: String| StoreError::Url { detail };
        if matches!(url, "sqlite::memory:" | "sqlite://:memory:" | ":memory:") {
            return Ok(Location::Memory);
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // The parser's messages name the part that is wrong, never the URL itself.
            let options = PgConnectOptions::from_str(url)
                .map_err(|e| bad(format!("the PostgreSQL URL does not parse: {e}; {ACCEPTED}")))?;
            let host = match options.get_socket() {
                Some(socket) => socket.display().to_string(),
                None => format!("{}:{}", options.get_host(), options.get_port()),
            };
            let database = options.get_database().unwrap_or_else(|| options.get_username());
            return Ok(Location::Postgres { url: url.to_owned(), shown: format!("{host}/{database}") });
        }
        let path = if let Some(rest) = url.strip_prefix("sqlite:") {
            if rest.contains('?') {
                return Err(bad(format!(
                    "the SQLite URL takes no parameters (the store always creates the file and sets its own options); {ACCEPTED}"
                )));
            }
            // sqlx's parser undoes the URL's percent-encoding.
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| bad(format!("the SQLite URL does not parse: {e}; {ACCEPTED}")))?;
            options.get_filename().to_owned()
        } else if url.contains("://") {
            let scheme = url.split("://").next().unwrap_or_default();
            return Err(bad(format!("unsupported scheme {scheme:?}; {ACCEPTED}")));
        } else {
            PathBuf::from(url)
        };
        if path.as_os_str().is_empty() {
            return Err(bad(format!("no file named; {ACCEPTED}")));
        }
        // Absolute, so that the URL built from it cannot read a relative path as a host name.
        let path =
            std::path::absolute(&path).map_err(|e| bad(format!("cannot make {} absolute: {e}", path.display())))?;
        if path.to_str().is_none() {
            return Err(bad(format!("the path {} is not UTF-8", path.display())));
        }
        Ok(Location::File(path))
    }

    /// What the store is, for logs: `SQLite file /var/lib/x.db`, `in memory`, or
    /// `PostgreSQL host:port/database` (never a password).
    pub(crate) fn describe(&self) -> String {
        match self {
            Location::File(path) => format!("SQLite file {}", path.display()),
            Location::Memory => "in memory".to_owned(),
            Location::Postgres { shown, .. } => format!("PostgreSQL {shown}"),
        }
    }

    /// The URL the `Any` driver connects with.
    pub(crate) fn connect_url(&self) -> String {
        match self {
            // Created when missing; the file's options are set on each connection.
            Location::File(path) => format!("sqlite://{}?mode=rwc", encode_path(path)),
            Location::Memory => "sqlite::memory:".to_owned(),
            Location::Postgres { url, .. } => url.clone(),
        }
    }

    /// Whether this is a SQLite database (file or memory).
    pub(crate) fn is_sqlite(&self) -> bool {
        !matches!(self, Location::Postgres { .. })
    }
}

/// The path percent-encoded for a `sqlite://` URL: everything but letters, digits and `/-_.~`,
/// so that `?`, `#` and `%` in a file name stay part of it.
fn encode_path(path: &Path) -> String {
    // parse() refuses non-UTF-8 paths, so the lossy form is the path itself.
    let text = path.to_string_lossy();
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"/-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_url_form_names_its_kind_of_store() {
        let cases = [
            ("sqlite::memory:", "in memory"),
            ("sqlite:///var/lib/cb/state.db", "SQLite file /var/lib/cb/state.db"),
            ("sqlite:/var/lib/cb/state.db", "SQLite file /var/lib/cb/state.db"),
            ("/var/lib/cb/state.db", "SQLite file /var/lib/cb/state.db"),
            ("postgres://cb@db.example:5433/billing", "PostgreSQL db.example:5433/billing"),
            ("postgresql://cb@db.example/billing", "PostgreSQL db.example:5432/billing"),
        ];
        for (url, want) in cases {
            assert_eq!(Location::parse(url).unwrap().describe(), want, "case {url}");
        }
    }

    #[test]
    fn a_relative_path_is_made_absolute() {
        let location = Location::parse("state/cb.db").unwrap();
        let want = std::env::current_dir().unwrap().join("state/cb.db");
        assert_eq!(location, Location::File(want));
    }

    #[test]
    fn the_description_of_a_postgres_url_never_holds_its_password() {
        let url = "postgres://billing:secret@127.0.0.1:5432/cb?sslmode=disable";
        let location = Location::parse(url).unwrap();
        assert!(!location.describe().contains("secret"), "{}", location.describe());
        assert_eq!(location.describe(), "PostgreSQL 127.0.0.1:5432/cb");
    }

    #[test]
    fn a_bad_postgres_url_is_refused_without_echoing_it() {
        let err = Location::parse("postgres://billing:secret@127.0.0.1:notaport/cb").unwrap_err().to_string();
        assert!(!err.contains("secret") && err.contains("PostgreSQL URL"), "{err}");
    }

    #[test]
    fn other_schemes_and_sqlite_parameters_are_refused_with_the_accepted_forms() {
        for url in ["mysql://h/db", "sqlite:///x.db?mode=ro", ""] {
            let err = Location::parse(url).unwrap_err().to_string();
            assert!(err.contains("sqlite://PATH"), "case {url:?}: {err}");
        }
    }

    #[test]
    fn a_file_name_with_url_characters_survives_the_connect_url() {
        let location = Location::File(PathBuf::from("/tmp/a b?c#d%e.db"));
        let url = location.connect_url();
        assert_eq!(url, "sqlite:///tmp/a%20b%3Fc%23d%25e.db?mode=rwc");
        let back = SqliteConnectOptions::from_str(&url).unwrap();
        assert_eq!(back.get_filename(), Path::new("/tmp/a b?c#d%e.db"));
    }
}

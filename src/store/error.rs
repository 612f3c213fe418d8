//! The store's failures, each with its class.

use crate::class::ErrorClass;

/// A store failure. The text names the store (never its password) and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store's URL is not one the store understands.
    #[error("store URL: {detail}")]
    Url {
        /// What is wrong with it, and what is accepted.
        detail: String,
    },
    /// The directory for the SQLite file could not be created.
    #[error("cannot create {path}, the directory of the store's SQLite file: {source}; create it, or point the store at a writable place")]
    Directory {
        /// The directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file exists and is not an SQLite database: never written over.
    #[error("{path} is not a concertim-billing ledger or state store (not an SQLite database); it is left untouched: give a new file name, or the file `run --ledger`/`replay --ledger` or `state.path` wrote")]
    NotAStore {
        /// The file.
        path: String,
    },
    /// The store could not be opened: connecting, or bringing its schema up to date.
    #[error("cannot open the store ({what}): {source}")]
    Open {
        /// The store and the step that failed.
        what: String,
        /// The database driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A read or write failed (the database is down, locked, or out of space).
    #[error("{what}: {source}")]
    Query {
        /// The store and the operation.
        what: String,
        /// The database driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A stored row is not what this version writes (edited by hand, or written by another
    /// program).
    #[error("{what}: the stored row is not one concertim-billing wrote: {detail}")]
    Corrupt {
        /// The store and the row.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The schema is newer than this version knows: a newer concertim-billing migrated it.
    #[error("the store ({what}) has schema version {found}, but this concertim-billing knows versions up to {known}: run the newer version that migrated it")]
    Newer {
        /// The store.
        what: String,
        /// The newest version recorded in the store.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
}

impl StoreError {
    /// The failure class: a database that is down, locked or full is transient; a bad URL, a
    /// corrupt row or a newer schema needs an operator, so it is permanent.
    pub fn class(&self) -> ErrorClass {
        match self {
            StoreError::Url { .. }
            | StoreError::NotAStore { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Newer { .. } => ErrorClass::Permanent,
            // A URL that parses but that the driver refuses: retrying changes nothing.
            StoreError::Open { source: sqlx::Error::Configuration(_), .. } => ErrorClass::Permanent,
            // Permissions and full disks can be fixed without changing anything else.
            StoreError::Directory { .. } | StoreError::Open { .. } | StoreError::Query { .. } => ErrorClass::Transient,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_failure_is_transient_and_a_corrupt_row_permanent() {
        let query = StoreError::Query { what: "w".into(), source: sqlx::Error::PoolTimedOut };
        let corrupt = StoreError::Corrupt { what: "w".into(), detail: "d".into() };
        let refused = StoreError::Open { what: "w".into(), source: sqlx::Error::Configuration("bad".into()) };
        assert_eq!(query.class(), ErrorClass::Transient);
        assert_eq!(corrupt.class(), ErrorClass::Permanent);
        assert_eq!(refused.class(), ErrorClass::Permanent);
    }
}

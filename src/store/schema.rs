//! The store's schema, as numbered migrations applied in order, one transaction each, and
//! recorded in `store_migrations`.
//!
//! Replicas sharing a PostgreSQL database may start at the same moment: each migration's
//! transaction first takes a transaction-scoped advisory lock, so one replica applies it while
//! the others wait, then find its version recorded and skip it. (Even `CREATE TABLE IF NOT
//! EXISTS` is not safe to race on PostgreSQL, hence the lock rather than only the version
//! guard.) SQLite transactions here begin `IMMEDIATE`, which serialises them the same way.

use sqlx::{AnyPool, Row};

use super::StoreError;

/// Each migration: its version and its statements, in order. Only ever append: a released
/// migration is never edited.
///
/// Columns are `BIGINT` or `TEXT` only (what both databases and the `Any` driver agree on).
/// `due()` reads two indexes: `resources_next_due` for the resources whose time has come, and
/// the partial `resources_unreviewed`, which holds only the resources with unreviewed facts, so
/// a pass over many settled resources does not scan them.
const MIGRATIONS: &[(i64, &[&str])] = &[
    (
        1,
        &[
            "CREATE TABLE resources (
            id TEXT PRIMARY KEY,
            project TEXT NOT NULL,
            version BIGINT NOT NULL,
            reviewed_version BIGINT NOT NULL,
            dirty_from BIGINT,
            next_due BIGINT,
            settled_through BIGINT
        )",
            "CREATE INDEX resources_by_project ON resources (project)",
            "CREATE INDEX resources_next_due ON resources (next_due, id)",
            "CREATE INDEX resources_unreviewed ON resources (next_due, id) WHERE version <> reviewed_version",
            // A fact is keyed by its digest: PostgreSQL cannot index text longer than a third of a
            // page, and a fact's JSON has no bound.
            "CREATE TABLE facts (
            resource TEXT NOT NULL,
            digest TEXT NOT NULL,
            fact TEXT NOT NULL,
            effective BIGINT NOT NULL,
            PRIMARY KEY (resource, digest)
        )",
            "CREATE TABLE postings (
            resource TEXT NOT NULL,
            id TEXT NOT NULL,
            period_start BIGINT,
            body TEXT NOT NULL,
            state TEXT NOT NULL,
            owner TEXT NOT NULL,
            claimed_at BIGINT NOT NULL,
            posted_at BIGINT,
            PRIMARY KEY (resource, id)
        )",
            "CREATE TABLE shortfalls (
            resource TEXT NOT NULL,
            project TEXT NOT NULL,
            period_start BIGINT NOT NULL,
            unit TEXT NOT NULL,
            billed TEXT NOT NULL,
            due TEXT NOT NULL,
            noticed_at BIGINT NOT NULL,
            PRIMARY KEY (resource, period_start, unit, due)
        )",
            "CREATE TABLE projects (
            id TEXT PRIMARY KEY,
            closed_at BIGINT NOT NULL
        )",
            "CREATE TABLE ledger (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )",
        ],
    ),
    (
        2,
        // What kind of resource each is (instances only before this version).
        &["ALTER TABLE resources ADD COLUMN kind TEXT NOT NULL DEFAULT 'instance'"],
    ),
    (
        3,
        // When each project was admitted (`projects.managed_by`): its earliest role assignment.
        &["CREATE TABLE admissions (
            project TEXT PRIMARY KEY,
            admitted_at BIGINT NOT NULL
        )"],
    ),
];

/// The advisory lock key that serialises migrations on PostgreSQL (any fixed number works; this
/// one is "cbstore" in ASCII).
const MIGRATION_LOCK: i64 = 0x63_6273_746f_7265;

const CREATE_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS store_migrations (version BIGINT PRIMARY KEY)";

/// The newest schema version this build knows.
pub(crate) fn latest() -> i64 {
    MIGRATIONS.last().map_or(0, |(version, _)| *version)
}

/// Applies the migrations the store lacks, in order.
///
/// # Errors
/// [`StoreError::Open`] when a statement fails (the failed migration's transaction is rolled
/// back, so it is tried whole at the next start); [`StoreError::Newer`] when the store records
/// a version this build does not know.
pub(crate) async fn migrate(pool: &AnyPool, sqlite: bool, what: &str) -> Result<(), StoreError> {
    let fail = |step: String| move |source| StoreError::Open { what: format!("{what}: {step}"), source };
    for (version, statements) in MIGRATIONS {
        let step = || format!("applying schema migration {version}");
        let mut tx =
            if sqlite { pool.begin_with("BEGIN IMMEDIATE").await } else { pool.begin().await }.map_err(fail(step()))?;
        if !sqlite {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(fail(step()))?;
        }
        sqlx::query(CREATE_MIGRATIONS).execute(&mut *tx).await.map_err(fail(step()))?;
        let new = sqlx::query("INSERT INTO store_migrations (version) VALUES ($1) ON CONFLICT (version) DO NOTHING")
            .bind(*version)
            .execute(&mut *tx)
            .await
            .map_err(fail(step()))?
            .rows_affected()
            == 1;
        if new {
            for statement in *statements {
                sqlx::query(statement).execute(&mut *tx).await.map_err(fail(step()))?;
            }
        }
        tx.commit().await.map_err(fail(step()))?;
    }
    let found: Option<i64> = sqlx::query("SELECT MAX(version) AS version FROM store_migrations")
        .fetch_one(pool)
        .await
        .and_then(|row| row.try_get("version"))
        .map_err(fail("reading the schema version".to_owned()))?;
    match found {
        Some(found) if found > latest() => Err(StoreError::Newer { what: what.to_owned(), found, known: latest() }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_versions_count_up_from_one() {
        for (i, (version, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version, i as i64 + 1, "migration {i}");
        }
    }
}

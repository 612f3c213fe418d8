//! Test support: a store of each kind, and `on_every_store!`, which runs one test body against
//! a SQLite file, an in-memory SQLite database and PostgreSQL.
//!
//! PostgreSQL comes from `CONCERTIM_BILLING_TEST_POSTGRES_URL` (deploy/dev/test.sh starts a
//! server and sets it). Each test gets a schema of its own in that database, dropped when the
//! test passes (a failed test's schema is left behind to look at). Without the variable the
//! PostgreSQL variants say they are skipped, except under `CI`, where they fail: CI must never
//! pass by skipping.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use sqlx::{AnyConnection, Connection, Executor};

use super::Store;

/// The variable naming the test PostgreSQL database.
pub(crate) const POSTGRES_ENV: &str = "CONCERTIM_BILLING_TEST_POSTGRES_URL";

/// A store for one test, and what to clean up after it.
pub(crate) struct TestStore {
    /// The store.
    pub(crate) store: Arc<Store>,
    /// The URL that reopens it (none in memory).
    pub(crate) url: Option<String>,
    /// The SQLite file's directory, removed on drop.
    _dir: Option<tempfile::TempDir>,
    /// The test's PostgreSQL schema.
    schema: Option<PgSchema>,
}

impl TestStore {
    /// A store in a SQLite file in a fresh temporary directory.
    pub(crate) async fn sqlite_file() -> TestStore {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let store = Store::open(&url).await.expect("a SQLite file store opens");
        TestStore { store: Arc::new(store), url: Some(url), _dir: Some(dir), schema: None }
    }

    /// A store in memory.
    pub(crate) async fn in_memory() -> TestStore {
        let store = Store::in_memory().await.expect("an in-memory store opens");
        TestStore { store: Arc::new(store), url: None, _dir: None, schema: None }
    }

    /// A store in a fresh schema of the test PostgreSQL database, or `None` (said on stderr)
    /// when none is configured outside CI.
    ///
    /// # Panics
    /// Under `CI` when no database is configured, and when the database cannot be reached.
    pub(crate) async fn postgres() -> Option<TestStore> {
        let schema = PgSchema::create().await?;
        let store = Store::open(&schema.url).await.expect("a PostgreSQL store opens");
        assert!(!store.describe().contains("secret"), "{}", store.describe());
        Some(TestStore { store: Arc::new(store), url: Some(schema.url.clone()), _dir: None, schema: Some(schema) })
    }

    /// Ends a passed test: closes the store and drops its PostgreSQL schema.
    pub(crate) async fn finish(self) {
        self.store.pool.close().await;
        if let Some(schema) = self.schema {
            schema.drop().await;
        }
    }
}

/// A fresh schema in the test PostgreSQL database, and the URL of a store in it.
pub(crate) struct PgSchema {
    /// The test database's URL, as configured.
    server: String,
    /// The schema's name.
    name: String,
    /// The URL of a store in the schema (with a password the server ignores).
    pub(crate) url: String,
}

impl PgSchema {
    /// Creates the schema, or says the test is skipped and returns `None` when no test database
    /// is configured (outside CI).
    ///
    /// # Panics
    /// Under `CI` when no database is configured, and when the database cannot be reached.
    pub(crate) async fn create() -> Option<PgSchema> {
        let Ok(server) = std::env::var(POSTGRES_ENV) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{POSTGRES_ENV} is not set, and CI must not skip the PostgreSQL tests: run them through deploy/dev/test.sh"
            );
            eprintln!("skipped: {POSTGRES_ENV} is not set (deploy/dev/test.sh sets it)");
            return None;
        };
        let name = unique_name();
        super::connect::install_drivers();
        let mut admin = AnyConnection::connect(&server).await.expect("the test PostgreSQL database answers");
        admin.execute(format!("CREATE SCHEMA {name}").as_str()).await.expect("a test schema is created");
        admin.close().await.ok();
        let separator = if server.contains('?') { '&' } else { '?' };
        // A password the trust-authenticated test server ignores, so that every PostgreSQL test
        // also checks that the store's description and errors never show one.
        let url = format!("{}{separator}options[search_path]={name}", with_password(&server));
        Some(PgSchema { server, name, url })
    }

    /// Drops the schema and everything in it.
    pub(crate) async fn drop(self) {
        let mut admin = AnyConnection::connect(&self.server).await.expect("the test PostgreSQL database answers");
        admin.execute(format!("DROP SCHEMA {} CASCADE", self.name).as_str()).await.expect("the test schema is dropped");
        admin.close().await.ok();
    }
}

/// `postgres://user@…` with a password `secret` added (a URL that has one is kept as it is).
fn with_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.split_once('@') {
        Some((user, host)) if !user.contains(':') => format!("{scheme}://{user}:secret@{host}"),
        _ => url.to_owned(),
    }
}

/// A schema name no other test, run or process uses at the same time.
fn unique_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("cb_test_{}_{nanos}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Runs each named `async fn(&Store)` against a SQLite file, an in-memory store and PostgreSQL,
/// as tests named `<kind>::<name>` in a module `on_every_store` beside the bodies.
macro_rules! on_every_store {
    ($($name:ident),+ $(,)?) => {
        mod on_every_store {
            mod sqlite_file {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let test = $crate::store::testing::TestStore::sqlite_file().await;
                        super::super::$name(&test.store).await;
                        test.finish().await;
                    }
                )+
            }
            mod in_memory {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let test = $crate::store::testing::TestStore::in_memory().await;
                        super::super::$name(&test.store).await;
                        test.finish().await;
                    }
                )+
            }
            mod postgres {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let Some(test) = $crate::store::testing::TestStore::postgres().await else { return };
                        super::super::$name(&test.store).await;
                        test.finish().await;
                    }
                )+
            }
        }
    };
}
pub(crate) use on_every_store;

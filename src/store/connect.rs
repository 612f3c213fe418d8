//! Opening a store: the connection pool, the SQLite options that make a commit durable, the
//! schema; and what every operation shares (transactions, error wrapping, counts).

use std::{sync::Once, time::Duration};

use sqlx::{
    any::{AnyPoolOptions, AnyRow},
    Any, AnyPool, Executor, Row, Transaction,
};

use super::{location::Location, schema, StoreError};

/// The durable state store (see the module doc). Cheap to share behind an `Arc`; every method
/// takes `&self`.
pub struct Store {
    pub(crate) pool: AnyPool,
    sqlite: bool,
    /// [`Location::describe`], computed once.
    what: String,
    /// Facts this process has seen committed (hashes of resource and fact): adding one again
    /// needs no query. Facts are never deleted, so the set can only be stale by missing some.
    pub(crate) known: std::sync::Mutex<std::collections::HashSet<u128>>,
    /// Resources' owning projects as read: an owner, once recorded, never changes, so each
    /// resource's is read once.
    pub(crate) owners: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

// By hand: only the description, which is known to hold no password.
impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("what", &self.what).finish_non_exhaustive()
    }
}

/// How many rows the store holds, for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Resources with at least one fact (or made due by their project's end).
    pub resources: i64,
    /// Facts, over all resources.
    pub facts: i64,
    /// Postings claimed and not yet confirmed.
    pub claimed: i64,
    /// Postings the backend confirmed.
    pub posted: i64,
    /// Shortfalls recorded.
    pub shortfalls: i64,
}

/// `sqlx::any::install_default_drivers` must run once before the first `Any` connection.
static DRIVERS: Once = Once::new();

/// How long a SQLite write waits for another connection's write to finish before failing: 5 s.
const SQLITE_BUSY_TIMEOUT: &str = "PRAGMA busy_timeout = 5000";

/// Connections per pool: SQLite writes one at a time, so a few connections are enough for its
/// readers; PostgreSQL gets enough for the settlement workers and the handlers of one replica.
const SQLITE_CONNECTIONS: u32 = 4;
const POSTGRES_CONNECTIONS: u32 = 10;

/// Registers the SQLite and PostgreSQL drivers with `Any` (once per process).
pub(crate) fn install_drivers() {
    DRIVERS.call_once(sqlx::any::install_default_drivers);
}

impl Store {
    /// Opens the store at `url` and brings its schema up to date: `sqlite://PATH` or a plain
    /// path → a SQLite file (created, with its directory, when missing); `sqlite::memory:` →
    /// in memory; `postgres://…` or `postgresql://…` → PostgreSQL.
    ///
    /// # Errors
    /// [`StoreError::Url`] for a URL of another form; [`StoreError::Directory`] when the
    /// file's directory cannot be created; [`StoreError::Open`] when the database cannot be
    /// reached or migrated; [`StoreError::Newer`] when a newer version migrated it.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let location = Location::parse(url)?;
        if let Location::File(path) = &location {
            // An existing file that is not SQLite (an older JSON ledger, a typo naming another
            // file) is refused at once, before the driver retries a connection it cannot make.
            let mut header = [0u8; 16];
            let read = std::fs::File::open(path).and_then(|mut f| std::io::Read::read(&mut f, &mut header));
            if matches!(read, Ok(n) if n > 0 && header[..n.min(16)] != b"SQLite format 3\0"[..n.min(16)]) {
                return Err(StoreError::NotAStore { path: path.display().to_string() });
            }
        }
        Self::connect(location).await
    }

    /// An empty in-memory store (SQLite), gone when dropped.
    ///
    /// # Errors
    /// [`StoreError::Open`] when SQLite cannot allocate it.
    pub async fn in_memory() -> Result<Store, StoreError> {
        Self::connect(Location::Memory).await
    }

    /// What the store is, for logs: `SQLite file /var/lib/x.db`, `in memory`, or
    /// `PostgreSQL 127.0.0.1:5432/db`. Never a password.
    pub fn describe(&self) -> String {
        self.what.clone()
    }

    async fn connect(location: Location) -> Result<Store, StoreError> {
        install_drivers();
        let what = location.describe();
        if let Location::File(path) = &location {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|source| StoreError::Directory { path: dir.display().to_string(), source })?;
            }
        }
        let options = match &location {
            // Each connection to `sqlite::memory:` is a database of its own: one connection,
            // kept for the store's life (no idle or lifetime limit), holds the one database.
            Location::Memory => {
                AnyPoolOptions::new().max_connections(1).min_connections(1).idle_timeout(None).max_lifetime(None)
            }
            Location::File(_) => AnyPoolOptions::new().max_connections(SQLITE_CONNECTIONS),
            Location::Postgres { .. } => AnyPoolOptions::new().max_connections(POSTGRES_CONNECTIONS),
        };
        let options = if location.is_sqlite() {
            options.after_connect(|conn, _| {
                Box::pin(async move {
                    // FULL: a commit is on disk before it returns, so a write the caller was
                    // told about survives a crash, SIGKILL or power loss. The busy timeout lets
                    // a writer wait for another connection's write instead of failing.
                    conn.execute("PRAGMA synchronous = FULL").await?;
                    conn.execute(SQLITE_BUSY_TIMEOUT).await?;
                    Ok(())
                })
            })
        } else {
            options
        };
        let options = options.acquire_timeout(Duration::from_secs(30));
        let opening = |step: &str| {
            let what = format!("{what}: {step}");
            move |source| StoreError::Open { what, source }
        };
        let pool = options.connect(&location.connect_url()).await.map_err(opening("connecting"))?;
        if let Location::File(_) = location {
            // WAL lets readers run beside the writer. It is a property of the file, set once
            // here, before other connections exist (changing it needs the file to itself).
            sqlx::query("PRAGMA journal_mode = WAL").execute(&pool).await.map_err(opening("setting WAL mode"))?;
        }
        schema::migrate(&pool, location.is_sqlite(), &what).await?;
        Ok(Store {
            pool,
            sqlite: location.is_sqlite(),
            what,
            known: std::sync::Mutex::default(),
            owners: std::sync::Mutex::default(),
        })
    }

    /// Begins a write transaction. On SQLite it takes the write lock at once (`BEGIN
    /// IMMEDIATE`): a transaction that read first and wrote later could not wait for the lock
    /// and would fail instead.
    pub(crate) async fn begin(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        if self.sqlite {
            self.pool.begin_with("BEGIN IMMEDIATE").await
        } else {
            self.pool.begin().await
        }
    }

    /// The error of a failed operation, naming the store and what was being done.
    pub(crate) fn failed(&self, doing: impl std::fmt::Display, source: sqlx::Error) -> StoreError {
        StoreError::Query { what: format!("store ({}): {doing}", self.what), source }
    }

    /// The error of a row that does not read back.
    pub(crate) fn corrupt(&self, row: impl std::fmt::Display, detail: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt { what: format!("store ({}): {row}", self.what), detail: detail.to_string() }
    }

    /// Reads a column of a row, or says which row is corrupt.
    pub(crate) fn column<T>(&self, row: &AnyRow, name: &str, which: impl Fn() -> String) -> Result<T, StoreError>
    where
        T: for<'r> sqlx::Decode<'r, Any> + sqlx::Type<Any>,
    {
        row.try_get(name).map_err(|e| self.corrupt(which(), format!("column {name}: {e}")))
    }

    /// Counts the rows of each kind. It scans the tables: for metrics and benchmarks, not for
    /// each message.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be read.
    pub async fn counts(&self) -> Result<Counts, StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM resources) AS resources,
                    (SELECT COUNT(*) FROM facts) AS facts,
                    (SELECT COUNT(*) FROM postings WHERE state = 'claimed') AS claimed,
                    (SELECT COUNT(*) FROM postings WHERE state = 'posted') AS posted,
                    (SELECT COUNT(*) FROM shortfalls) AS shortfalls",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.failed("counting rows", e))?;
        let which = || "counts".to_owned();
        Ok(Counts {
            resources: self.column(&row, "resources", which)?,
            facts: self.column(&row, "facts", which)?,
            claimed: self.column(&row, "claimed", which)?,
            posted: self.column(&row, "posted", which)?,
            shortfalls: self.column(&row, "shortfalls", which)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{on_every_store, PgSchema, TestStore};

    async fn a_new_store_counts_nothing(store: &Store) {
        assert_eq!(store.counts().await.unwrap(), Counts::default());
    }

    async fn opening_a_store_twice_migrates_once(store: &Store) {
        // Arrange: the store is open (migrated once).
        // Act: migrate again, as a second replica would.
        schema::migrate(&store.pool, store.sqlite, &store.what).await.unwrap();
        // Assert
        let versions: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM store_migrations").fetch_one(&store.pool).await.unwrap().get("n");
        assert_eq!(versions, schema::latest());
    }

    on_every_store!(
        a_new_store_counts_nothing,
        opening_a_store_twice_migrates_once,
        the_description_never_shows_a_password
    );

    #[tokio::test]
    async fn a_store_migrated_by_a_newer_version_is_refused_with_what_to_do() {
        let test = TestStore::sqlite_file().await;
        let url = test.url.clone().unwrap();
        sqlx::query("INSERT INTO store_migrations (version) VALUES (999)").execute(&test.store.pool).await.unwrap();
        test.store.pool.close().await;
        let err = Store::open(&url).await.unwrap_err();
        assert!(matches!(err, StoreError::Newer { found: 999, .. }), "{err}");
        assert!(err.to_string().contains("run the newer version"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_opening_a_new_postgres_store_at_once_all_open_it() {
        // Arrange: an empty schema.
        let Some(schema) = PgSchema::create().await else { return };
        // Act: four replicas start at the same moment.
        let opening: Vec<_> = (0..4)
            .map(|_| {
                let url = schema.url.clone();
                tokio::spawn(async move { Store::open(&url).await })
            })
            .collect();
        let mut stores = Vec::new();
        for task in opening {
            stores.push(task.await.unwrap().unwrap());
        }
        // Assert: each migration was applied once, and every replica sees the schema.
        let versions: i64 = sqlx::query("SELECT COUNT(*) AS n FROM store_migrations")
            .fetch_one(&stores[0].pool)
            .await
            .unwrap()
            .get("n");
        assert_eq!(versions, schema::latest());
        for store in stores {
            assert_eq!(store.counts().await.unwrap(), Counts::default());
            store.pool.close().await;
        }
        schema.drop().await;
    }

    /// The environment variable that names the child's store file.
    const CRASH_CHILD_STORE: &str = "CONCERTIM_BILLING_TEST_CRASH_STORE";

    #[tokio::test]
    #[ignore = "the child process of a_committed_write_survives_sigkill"]
    async fn crash_child_adds_facts_until_killed() {
        // Run alone (--include-ignored), it has no store to write to.
        let Ok(url) = std::env::var(CRASH_CHILD_STORE) else { return };
        let store = Store::open(&url).await.unwrap();
        for i in 0.. {
            store.add_facts(&format!("r{i}"), "instance", "p", &[(format!("f{i}"), i)]).await.unwrap();
            // Said only once committed: every number printed must be in the file after the kill.
            println!("committed {i}");
        }
    }

    #[test]
    fn a_committed_write_survives_sigkill() {
        use std::io::BufRead;
        // Arrange: a child process writing to a SQLite file, one committed fact at a time.
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "store::connect::tests::crash_child_adds_facts_until_killed", "--ignored", "--nocapture"])
            .env(CRASH_CHILD_STORE, &url)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut last = None;
        for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
            if let Some(n) = line.unwrap().strip_prefix("committed ") {
                last = Some(n.parse::<i64>().unwrap());
                if last >= Some(20) {
                    break;
                }
            }
        }
        // Act: SIGKILL, mid-write.
        child.kill().unwrap();
        child.wait().unwrap();
        // Assert: every fact it reported committed is there.
        let last = last.expect("the child committed facts");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let facts = runtime.block_on(async { Store::open(&url).await.unwrap().counts().await.unwrap().facts });
        assert!(facts > last, "{facts} facts stored, the child reported fact {last} committed");
    }

    #[tokio::test]
    async fn the_sqlite_file_and_its_directory_are_created_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/dir/state.db");
        let store = Store::open(&format!("sqlite://{}", path.display())).await.unwrap();
        assert!(path.exists());
        let mode: String = sqlx::query("PRAGMA journal_mode").fetch_one(&store.pool).await.unwrap().get(0);
        let sync: i64 = sqlx::query("PRAGMA synchronous").fetch_one(&store.pool).await.unwrap().get(0);
        assert_eq!((mode.as_str(), sync), ("wal", 2), "journal mode and synchronous=FULL (2)");
        assert_eq!(store.describe(), format!("SQLite file {}", path.display()));
    }

    async fn the_description_never_shows_a_password(store: &Store) {
        // The PostgreSQL test store is opened with a password (`secret`) in its URL.
        assert!(!store.describe().contains("secret"), "{}", store.describe());
        assert!(!format!("{store:?}").contains("secret"), "{store:?}");
    }
}

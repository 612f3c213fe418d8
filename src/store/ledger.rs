//! The embedded ledger's rows: keys (`account/<id>`, `sub/<id>`, `usage/<sub>/<tracking id>`)
//! to JSON values the store does not read.

use super::{Store, StoreError};

impl Store {
    /// Writes `rows` (key, JSON value), replacing the values of keys already stored, in one
    /// transaction: all are durable when it returns, or none is.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be written (nothing is stored then).
    pub async fn ledger_put(&self, rows: &[(String, String)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let fail = |e| self.failed(format_args!("writing {} ledger rows", rows.len()), e);
        let mut tx = self.begin().await.map_err(fail)?;
        for (key, value) in rows {
            sqlx::query("INSERT INTO ledger (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
                .bind(key.as_str())
                .bind(value.as_str())
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
        }
        tx.commit().await.map_err(fail)
    }

    /// Every ledger row, by key (compared as bytes).
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be read; [`StoreError::Corrupt`] when a
    /// row does not read back.
    pub async fn ledger_rows(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT key, value FROM ledger")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.failed("reading the ledger", e))?;
        let which = || "a ledger row".to_owned();
        let mut all = rows
            .iter()
            .map(|row| Ok((self.column(row, "key", which)?, self.column(row, "value", which)?)))
            .collect::<Result<Vec<(String, String)>, StoreError>>()?;
        // Sorted here: the databases' text collations differ.
        all.sort();
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{on_every_store, TestStore};

    fn rows(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    async fn ledger_rows_are_upserted_and_read_back_by_key(store: &Store) {
        store.ledger_put(&rows(&[("sub/b", "1"), ("account/a", "2")])).await.unwrap();
        store.ledger_put(&rows(&[("sub/b", "3")])).await.unwrap();
        store.ledger_put(&[]).await.unwrap();
        assert_eq!(store.ledger_rows().await.unwrap(), rows(&[("account/a", "2"), ("sub/b", "3")]));
    }

    on_every_store!(ledger_rows_are_upserted_and_read_back_by_key);

    #[tokio::test]
    async fn a_sqlite_file_store_reopens_with_everything() {
        // Arrange: one of each kind of row.
        let test = TestStore::sqlite_file().await;
        let store = &test.store;
        store.add_facts("r1", "instance", "p1", &[("f1".to_owned(), 100)]).await.unwrap();
        store.claim("r1", "u1", Some(0), "b", "a", 100, 60).await.unwrap();
        store.posted("r1", "u1", "a", 101).await.unwrap();
        store.claim("r1", "u2", Some(50), "b", "a", 100, 60).await.unwrap();
        store.close_project("p1", 500).await.unwrap();
        store.ledger_put(&rows(&[("account/p1", "{}")])).await.unwrap();
        let shortfall = crate::store::Shortfall {
            resource: "r1".into(),
            project: "p1".into(),
            period_start: 0,
            unit: "h".into(),
            billed: "2".into(),
            due: "1".into(),
            noticed_at: 1,
        };
        store.add_shortfall(&shortfall).await.unwrap();
        let resource = store.resource("r1").await.unwrap();
        let postings = store.postings("r1", None).await.unwrap();
        store.pool.close().await;
        // Act
        let reopened = Store::open(test.url.as_deref().unwrap()).await.unwrap();
        // Assert
        assert_eq!(reopened.resource("r1").await.unwrap(), resource);
        assert_eq!(reopened.postings("r1", None).await.unwrap(), postings);
        assert_eq!(reopened.shortfalls().await.unwrap(), vec![shortfall]);
        assert_eq!(reopened.ledger_rows().await.unwrap(), rows(&[("account/p1", "{}")]));
        assert_eq!(reopened.due(0, 10).await.unwrap(), vec!["r1"]);
    }
}

//! Postings (every side effect of settlement, by id) and shortfalls.
//!
//! A posting is claimed before its effect is sent and marked posted once the backend confirmed
//! it, so that two replicas never send the same effect at once, and a replica that died between
//! claim and confirmation leaves a claim that expires (its lease) and is taken over. A shortfall
//! is a recomputed period below what was already posted: it is never posted as negative usage,
//! only listed for a credit or a review.

use sqlx::{any::AnyRow, Row};

use super::{Store, StoreError};

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the claim: it posts, then calls [`Store::posted`] (or
    /// [`Store::release`] when posting failed).
    Won,
    /// Already posted, with this body.
    Posted {
        /// The body that was posted.
        body: String,
    },
    /// Another owner holds a live claim: try again after its lease.
    Held,
}

/// Where a posting is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostingState {
    /// Claimed; the backend has not confirmed it yet.
    Claimed,
    /// The backend confirmed it.
    Posted,
}

impl PostingState {
    fn as_str(self) -> &'static str {
        match self {
            PostingState::Claimed => "claimed",
            PostingState::Posted => "posted",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [PostingState::Claimed, PostingState::Posted].into_iter().find(|s| s.as_str() == text)
    }
}

/// One posting of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posting {
    /// Its id (usage of a period, a correction, the subscription, a plan change, the cancel).
    pub id: String,
    /// The billing period it belongs to, if it belongs to one.
    pub period_start: Option<i64>,
    /// What was (or is being) posted: opaque to the store.
    pub body: String,
    /// Claimed or posted.
    pub state: PostingState,
    /// Who claimed it.
    pub owner: String,
}

/// A recomputed period below what was posted for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// The resource.
    pub resource: String,
    /// Its project.
    pub project: String,
    /// The period's start.
    pub period_start: i64,
    /// The unit.
    pub unit: String,
    /// What was posted (an exact decimal, as text).
    pub billed: String,
    /// What the period now comes to (an exact decimal, as text).
    pub due: String,
    /// When it was noticed.
    pub noticed_at: i64,
}

/// How many times a claim looks again when the row changed under it (released, taken over or
/// posted by another replica between two statements) before it answers `Held`.
const CLAIM_ATTEMPTS: usize = 3;

impl Store {
    /// Claims the right to post `id` for `resource`. A new posting is claimed for `owner` at
    /// `now` ([`Claim::Won`]); a posted one answers [`Claim::Posted`] with its body; a claim
    /// whose lease ran out (`claimed_at + lease_s <= now`: its owner died) is taken over
    /// ([`Claim::Won`]); a live claim answers [`Claim::Held`]. Of concurrent claims, on any
    /// number of replicas, exactly one wins: each step is one atomic statement, and a takeover
    /// applies only to the claim it read.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be written; [`StoreError::Corrupt`] for a
    /// posting in an unknown state.
    #[allow(clippy::too_many_arguments)] // Each is a different fact about the claim.
    pub async fn claim(
        &self,
        resource: &str,
        id: &str,
        period_start: Option<i64>,
        body: &str,
        owner: &str,
        now: i64,
        lease_s: i64,
    ) -> Result<Claim, StoreError> {
        let fail = |e| self.failed(format_args!("claiming posting {id} of resource {resource}"), e);
        let which = || format!("posting {id} of resource {resource}");
        for _ in 0..CLAIM_ATTEMPTS {
            let inserted = sqlx::query(
                "INSERT INTO postings (resource, id, period_start, body, state, owner, claimed_at)
                 VALUES ($1, $2, $3, $4, 'claimed', $5, $6)
                 ON CONFLICT (resource, id) DO NOTHING",
            )
            .bind(resource)
            .bind(id)
            .bind(period_start)
            .bind(body)
            .bind(owner)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(fail)?
            .rows_affected();
            if inserted == 1 {
                return Ok(Claim::Won);
            }
            let Some(row) =
                sqlx::query("SELECT state, body, owner, claimed_at FROM postings WHERE resource = $1 AND id = $2")
                    .bind(resource)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(fail)?
            else {
                // Released between the two statements: claim again.
                continue;
            };
            let state: String = self.column(&row, "state", which)?;
            match PostingState::parse(&state) {
                Some(PostingState::Posted) => return Ok(Claim::Posted { body: self.column(&row, "body", which)? }),
                Some(PostingState::Claimed) => {}
                None => return Err(self.corrupt(which(), format!("state {state:?}"))),
            }
            let claimed_at: i64 = self.column(&row, "claimed_at", which)?;
            if claimed_at.saturating_add(lease_s) > now {
                return Ok(Claim::Held);
            }
            let old_owner: String = self.column(&row, "owner", which)?;
            // Applies only to the claim read above: of two replicas taking over the same dead
            // claim, the second finds it changed.
            let taken = sqlx::query(
                "UPDATE postings SET owner = $3, claimed_at = $4, period_start = $5, body = $6
                 WHERE resource = $1 AND id = $2 AND state = 'claimed' AND owner = $7 AND claimed_at = $8",
            )
            .bind(resource)
            .bind(id)
            .bind(owner)
            .bind(now)
            .bind(period_start)
            .bind(body)
            .bind(old_owner)
            .bind(claimed_at)
            .execute(&self.pool)
            .await
            .map_err(fail)?
            .rows_affected();
            if taken == 1 {
                return Ok(Claim::Won);
            }
        }
        Ok(Claim::Held)
    }

    /// Records that the backend confirmed posting `id`: it becomes posted at `now`. Only the
    /// claim's owner can, and only while it is claimed; returns whether it applied.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be written.
    pub async fn posted(&self, resource: &str, id: &str, owner: &str, now: i64) -> Result<bool, StoreError> {
        let applied = sqlx::query(
            "UPDATE postings SET state = 'posted', posted_at = $4
             WHERE resource = $1 AND id = $2 AND owner = $3 AND state = 'claimed'",
        )
        .bind(resource)
        .bind(id)
        .bind(owner)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| self.failed(format_args!("marking posting {id} of resource {resource} posted"), e))?
        .rows_affected();
        Ok(applied == 1)
    }

    /// Gives up a claim after a failed post, so that the next pass tries at once. Only the
    /// owner's claim is removed, and never a posted one.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be written.
    pub async fn release(&self, resource: &str, id: &str, owner: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM postings WHERE resource = $1 AND id = $2 AND owner = $3 AND state = 'claimed'")
            .bind(resource)
            .bind(id)
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(|e| self.failed(format_args!("releasing posting {id} of resource {resource}"), e))?;
        Ok(())
    }

    /// The postings of `resource` in any state whose period starts at `from` or later (all of
    /// them when `from` is `None`; postings without a period only then), by period start (none
    /// first), then id.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be read; [`StoreError::Corrupt`] for a
    /// posting in an unknown state.
    pub async fn postings(&self, resource: &str, from: Option<i64>) -> Result<Vec<Posting>, StoreError> {
        let query = match from {
            Some(from) => sqlx::query(
                "SELECT id, period_start, body, state, owner FROM postings WHERE resource = $1 AND period_start >= $2",
            )
            .bind(resource)
            .bind(from),
            None => sqlx::query("SELECT id, period_start, body, state, owner FROM postings WHERE resource = $1")
                .bind(resource),
        };
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.failed(format_args!("listing the postings of resource {resource}"), e))?;
        let mut postings = rows.iter().map(|row| self.posting(resource, row)).collect::<Result<Vec<_>, _>>()?;
        // Sorted here, by bytes: the databases' text collations differ.
        postings.sort_by(|a, b| (a.period_start, &a.id).cmp(&(b.period_start, &b.id)));
        Ok(postings)
    }

    fn posting(&self, resource: &str, row: &AnyRow) -> Result<Posting, StoreError> {
        let id: String = row.try_get("id").map_err(|e| self.corrupt(format!("a posting of {resource}"), e))?;
        let which = || format!("posting {id} of resource {resource}");
        let state: String = self.column(row, "state", which)?;
        Ok(Posting {
            period_start: self.column(row, "period_start", which)?,
            body: self.column(row, "body", which)?,
            state: PostingState::parse(&state).ok_or_else(|| self.corrupt(which(), format!("state {state:?}")))?,
            owner: self.column(row, "owner", which)?,
            id,
        })
    }

    /// Records a shortfall; `false` when the same (resource, period start, unit, amount due)
    /// was recorded already.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be written.
    pub async fn add_shortfall(&self, s: &Shortfall) -> Result<bool, StoreError> {
        let added = sqlx::query(
            "INSERT INTO shortfalls (resource, project, period_start, unit, billed, due, noticed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (resource, period_start, unit, due) DO NOTHING",
        )
        .bind(s.resource.as_str())
        .bind(s.project.as_str())
        .bind(s.period_start)
        .bind(s.unit.as_str())
        .bind(s.billed.as_str())
        .bind(s.due.as_str())
        .bind(s.noticed_at)
        .execute(&self.pool)
        .await
        .map_err(|e| self.failed(format_args!("recording a shortfall of resource {}", s.resource), e))?
        .rows_affected();
        Ok(added == 1)
    }

    /// Every shortfall recorded, by resource, period start, unit and amount due.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be read.
    pub async fn shortfalls(&self) -> Result<Vec<Shortfall>, StoreError> {
        let rows = sqlx::query("SELECT resource, project, period_start, unit, billed, due, noticed_at FROM shortfalls")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.failed("listing the shortfalls", e))?;
        let which = || "a shortfall".to_owned();
        let mut all = rows
            .iter()
            .map(|row| {
                Ok(Shortfall {
                    resource: self.column(row, "resource", which)?,
                    project: self.column(row, "project", which)?,
                    period_start: self.column(row, "period_start", which)?,
                    unit: self.column(row, "unit", which)?,
                    billed: self.column(row, "billed", which)?,
                    due: self.column(row, "due", which)?,
                    noticed_at: self.column(row, "noticed_at", which)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        all.sort_by(|a, b| {
            (&a.resource, a.period_start, &a.unit, &a.due).cmp(&(&b.resource, b.period_start, &b.unit, &b.due))
        });
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::testing::{on_every_store, TestStore};

    async fn a_posting_is_won_once_held_while_claimed_and_posted_after(store: &Store) {
        // Act, Assert
        assert_eq!(store.claim("r", "u1", Some(0), "b1", "a", 100, 60).await.unwrap(), Claim::Won);
        assert_eq!(store.claim("r", "u1", Some(0), "b2", "b", 110, 60).await.unwrap(), Claim::Held);
        assert!(!store.posted("r", "u1", "b", 120).await.unwrap(), "only the owner confirms");
        assert!(store.posted("r", "u1", "a", 120).await.unwrap());
        assert_eq!(
            store.claim("r", "u1", Some(0), "b2", "b", 130, 60).await.unwrap(),
            Claim::Posted { body: "b1".into() }
        );
        assert_eq!(
            store.claim("r", "u1", Some(0), "b2", "b", 10_000, 60).await.unwrap(),
            Claim::Posted { body: "b1".into() }
        );
        let counts = store.counts().await.unwrap();
        assert_eq!((counts.claimed, counts.posted), (0, 1));
    }

    async fn an_expired_claim_is_taken_over_and_its_owner_can_no_longer_confirm(store: &Store) {
        assert_eq!(store.claim("r", "u1", Some(0), "old", "a", 100, 60).await.unwrap(), Claim::Won);
        assert_eq!(store.claim("r", "u1", Some(0), "new", "b", 159, 60).await.unwrap(), Claim::Held);
        assert_eq!(store.claim("r", "u1", Some(0), "new", "b", 160, 60).await.unwrap(), Claim::Won);
        assert!(!store.posted("r", "u1", "a", 161).await.unwrap());
        assert!(store.posted("r", "u1", "b", 161).await.unwrap());
        let postings = store.postings("r", None).await.unwrap();
        assert_eq!((postings[0].body.as_str(), postings[0].owner.as_str()), ("new", "b"));
    }

    async fn a_released_claim_can_be_won_again_at_once(store: &Store) {
        assert_eq!(store.claim("r", "u1", None, "b", "a", 100, 60).await.unwrap(), Claim::Won);
        store.release("r", "u1", "b").await.unwrap();
        assert_eq!(store.claim("r", "u1", None, "b", "b", 101, 60).await.unwrap(), Claim::Held, "not b's to release");
        store.release("r", "u1", "a").await.unwrap();
        assert_eq!(store.claim("r", "u1", None, "b", "b", 101, 60).await.unwrap(), Claim::Won);
    }

    async fn postings_are_listed_from_a_period_by_start_then_id(store: &Store) {
        // Arrange
        for (id, start) in [("u2", Some(200)), ("sub", None), ("u1", Some(100)), ("c2", Some(200))] {
            assert_eq!(store.claim("r", id, start, "b", "a", 1, 60).await.unwrap(), Claim::Won);
        }
        store.posted("r", "u1", "a", 2).await.unwrap();
        store.claim("other", "u9", Some(200), "b", "a", 1, 60).await.unwrap();
        // Act
        let all: Vec<_> = store.postings("r", None).await.unwrap().into_iter().map(|p| p.id).collect();
        let from: Vec<_> = store.postings("r", Some(150)).await.unwrap().into_iter().map(|p| p.id).collect();
        // Assert
        assert_eq!(all, ["sub", "u1", "c2", "u2"]);
        assert_eq!(from, ["c2", "u2"]);
        assert_eq!(store.postings("r", Some(0)).await.unwrap()[0].state, PostingState::Posted);
    }

    async fn a_shortfall_is_recorded_once(store: &Store) {
        let s = Shortfall {
            resource: "r".into(),
            project: "p".into(),
            period_start: 100,
            unit: "hours".into(),
            billed: "24".into(),
            due: "20".into(),
            noticed_at: 1_000,
        };
        assert!(store.add_shortfall(&s).await.unwrap());
        assert!(!store.add_shortfall(&Shortfall { noticed_at: 2_000, ..s.clone() }).await.unwrap());
        let lower = Shortfall { due: "18".into(), ..s.clone() };
        assert!(store.add_shortfall(&lower).await.unwrap(), "a different amount due is another shortfall");
        assert_eq!(store.shortfalls().await.unwrap(), vec![lower, s]);
        assert_eq!(store.counts().await.unwrap().shortfalls, 2);
    }

    on_every_store!(
        a_posting_is_won_once_held_while_claimed_and_posted_after,
        an_expired_claim_is_taken_over_and_its_owner_can_no_longer_confirm,
        a_released_claim_can_be_won_again_at_once,
        postings_are_listed_from_a_period_by_start_then_id,
        a_shortfall_is_recorded_once,
    );

    /// Claims from eight tasks, each on its own pool connection where the pool has that many.
    async fn eight_concurrent_claims_have_exactly_one_winner(store: Arc<Store>) {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    store.claim("r", "u1", Some(0), "b", &format!("owner-{i}"), 100, 60).await.unwrap()
                })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        let won = results.iter().filter(|c| **c == Claim::Won).count();
        assert_eq!(won, 1, "{results:?}");
        assert_eq!(results.iter().filter(|c| **c == Claim::Held).count(), 7, "{results:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_on_a_sqlite_file_have_exactly_one_winner() {
        let test = TestStore::sqlite_file().await;
        eight_concurrent_claims_have_exactly_one_winner(Arc::clone(&test.store)).await;
        test.finish().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_on_postgres_have_exactly_one_winner() {
        let Some(test) = TestStore::postgres().await else { return };
        eight_concurrent_claims_have_exactly_one_winner(Arc::clone(&test.store)).await;
        test.finish().await;
    }
}

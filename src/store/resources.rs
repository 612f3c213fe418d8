//! Facts about resources, and which resources have settlement work.
//!
//! A resource's facts are a set: adding one twice, or adding facts in any order, gives the same
//! set. Every change that can alter what settlement computes (a new fact, the project's end)
//! bumps the resource's `version`; settlement records the version it reviewed, and a resource
//! is due again as soon as the two differ, or when its `next_due` time comes.

use sha2::{Digest, Sha256};

use super::{Store, StoreError};

/// Everything settlement needs about one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// The resource's id.
    pub id: String,
    /// What kind of resource it is (`instance`, `volume` …, as `ResourceKind` spells it).
    pub kind: String,
    /// The project it was first reported under (empty while only a notification naming no
    /// project, a floating IP's delete, has reported it).
    pub project: String,
    /// Its facts (canonical JSON text), by effective time, then text.
    pub facts: Vec<String>,
    /// Bumped by every change since the resource was created.
    pub version: i64,
    /// The earliest effective time of the changes not reviewed yet.
    pub dirty_from: Option<i64>,
    /// When settlement must look at it again, even without a change.
    pub next_due: Option<i64>,
    /// Up to when its billing is settled.
    pub settled_through: Option<i64>,
    /// When its project ended, if it did.
    pub project_closed_at: Option<i64>,
    /// When its project was admitted (`projects.managed_by`), if it was.
    pub project_admitted_at: Option<i64>,
}

/// The key of a fact: PostgreSQL cannot index long text, so facts are keyed by a digest of
/// their canonical text (two texts with one digest would need a SHA-256 collision).
fn digest(fact: &str) -> String {
    Sha256::digest(fact.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Facts remembered as committed, at most: about 40 MiB; the set starts over when full.
const KNOWN_MAX: usize = 1 << 20;

/// Owners remembered, at most (about 20 MiB); the map starts over when full.
const OWNERS_MAX: usize = 1 << 17;

/// The key of a (resource, fact) pair in [`Store::known`]: 128 bits of SHA-256 (a collision,
/// which would skip a new fact, is as likely as guessing a random 128-bit key).
fn known_key(resource: &str, fact: &str) -> u128 {
    let mut h = Sha256::new();
    h.update(resource.as_bytes());
    h.update([0]);
    h.update(fact.as_bytes());
    let d = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&d[..16]);
    u128::from_le_bytes(bytes)
}

/// `dirty_from` lowered to `$2` (the SQL of `min(dirty_from, $2)` where NULL is "nothing").
const LOWER_DIRTY_FROM: &str =
    "dirty_from = CASE WHEN dirty_from IS NULL OR dirty_from > $2 THEN $2 ELSE dirty_from END";

impl Store {
    /// Adds facts about a resource of a kind: each is (canonical JSON text, effective unix
    /// time). A fact already stored changes nothing. The resource is created when missing,
    /// under `project`; a later, different project does not replace the first, except the
    /// empty project of a notification that named none. When at least one fact is new,
    /// the version goes up by one and `dirty_from` down to the earliest new effective time. One
    /// transaction. Returns how many facts were new.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be written (nothing is stored then).
    pub async fn add_facts(
        &self,
        resource: &str,
        kind: &str,
        project: &str,
        facts: &[(String, i64)],
    ) -> Result<usize, StoreError> {
        let keys: Vec<u128> = facts.iter().map(|(f, _)| known_key(resource, f)).collect();
        let fresh: Vec<usize> = {
            let known = self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (0..facts.len()).filter(|i| !known.contains(&keys[*i])).collect()
        };
        if fresh.is_empty() {
            // Every fact was committed before (a duplicate, a republished sample's evidence).
            return Ok(0);
        }
        let new = self.insert_facts(resource, kind, project, fresh.iter().map(|i| &facts[*i])).await?;
        let mut known = self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.len() + fresh.len() > KNOWN_MAX {
            known.clear();
        }
        known.extend(fresh.iter().map(|i| keys[*i]));
        Ok(new)
    }

    async fn insert_facts<'f>(
        &self,
        resource: &str,
        kind: &str,
        project: &str,
        facts: impl Iterator<Item = &'f (String, i64)>,
    ) -> Result<usize, StoreError> {
        let fail = |e| self.failed(format_args!("adding facts about resource {resource}"), e);
        let mut tx = self.begin().await.map_err(fail)?;
        sqlx::query(
            "INSERT INTO resources (id, kind, project, version, reviewed_version) VALUES ($1, $2, $3, 0, 0)
             ON CONFLICT (id) DO UPDATE SET project = excluded.project
             WHERE resources.project = '' AND excluded.project <> ''",
        )
        .bind(resource)
        .bind(kind)
        .bind(project)
        .execute(&mut *tx)
        .await
        .map_err(fail)?;
        let mut new = 0;
        let mut earliest: Option<i64> = None;
        for (fact, effective) in facts {
            let inserted = sqlx::query(
                "INSERT INTO facts (resource, digest, fact, effective) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (resource, digest) DO NOTHING",
            )
            .bind(resource)
            .bind(digest(fact))
            .bind(fact.as_str())
            .bind(*effective)
            .execute(&mut *tx)
            .await
            .map_err(fail)?
            .rows_affected();
            if inserted == 1 {
                new += 1;
                earliest = Some(earliest.map_or(*effective, |e| e.min(*effective)));
            }
        }
        if let Some(earliest) = earliest {
            sqlx::query(&format!("UPDATE resources SET version = version + 1, {LOWER_DIRTY_FROM} WHERE id = $1"))
                .bind(resource)
                .bind(earliest)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        Ok(new)
    }

    /// Resources with settlement work: facts not reviewed yet (`version <> reviewed_version`),
    /// or `next_due <= now`. Oldest `next_due` first, then the resources never reviewed (they
    /// have none), then by id; at most `limit` (none when it is not positive).
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be read.
    pub async fn due(&self, now: i64, limit: i64) -> Result<Vec<String>, StoreError> {
        // Two branches, each served by its own index (see the schema), each cut to `limit`
        // before they are merged: a single OR would scan every resource. NULLS LAST is
        // PostgreSQL's order for an ascending index, so it reads the first `limit` entries of
        // the index instead of sorting; SQLite, which puts NULLs first by default, is told.
        let rows = sqlx::query(
            "SELECT id, next_due FROM (
                 SELECT id, next_due FROM resources WHERE version <> reviewed_version
                 ORDER BY next_due NULLS LAST, id LIMIT $2
             ) AS unreviewed
             UNION
             SELECT id, next_due FROM (
                 SELECT id, next_due FROM resources WHERE next_due <= $1
                 ORDER BY next_due, id LIMIT $2
             ) AS timed
             ORDER BY next_due NULLS LAST, id
             LIMIT $2",
        )
        .bind(now)
        // PostgreSQL refuses a negative LIMIT, SQLite reads it as "no limit": neither is asked.
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.failed("listing the resources due", e))?;
        rows.iter().map(|row| self.column(row, "id", || "a due resource".to_owned())).collect()
    }

    /// The project `resource` was first recorded under, or `None` when it is unknown.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be read; [`StoreError::Corrupt`] when the
    /// row does not read back.
    pub async fn owner(&self, resource: &str) -> Result<Option<String>, StoreError> {
        if let Some(owner) = self.owners.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(resource) {
            return Ok(Some(owner.clone()));
        }
        let row = sqlx::query("SELECT project FROM resources WHERE id = $1")
            .bind(resource)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.failed(format_args!("reading the project of resource {resource}"), e))?;
        let owner: Option<String> =
            row.map(|row| self.column(&row, "project", || format!("resource {resource}"))).transpose()?;
        // Only a recorded project is final: an empty one is filled in by the first message that
        // names it.
        if let Some(owner) = owner.as_ref().filter(|o| !o.is_empty()) {
            let mut owners = self.owners.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if owners.len() >= OWNERS_MAX {
                owners.clear();
            }
            owners.insert(resource.to_owned(), owner.clone());
        }
        Ok(owner)
    }

    /// Everything settlement needs about `resource`, or `None` when it is unknown.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be read; [`StoreError::Corrupt`] when a
    /// row does not read back.
    pub async fn resource(&self, resource: &str) -> Result<Option<Resource>, StoreError> {
        let fail = |e| self.failed(format_args!("reading resource {resource}"), e);
        let which = || format!("resource {resource}");
        // The version is read before the facts, never after: a fact added in between is then
        // read with the older version, and `reviewed` with that version does not apply, so the
        // resource stays due. The other order could mark a fact reviewed that was never read.
        let Some(row) = sqlx::query(
            "SELECT r.kind, r.project, r.version, r.dirty_from, r.next_due, r.settled_through, p.closed_at,
                    a.admitted_at
             FROM resources r LEFT JOIN projects p ON p.id = r.project LEFT JOIN admissions a ON a.project = r.project
             WHERE r.id = $1",
        )
        .bind(resource)
        .fetch_optional(&self.pool)
        .await
        .map_err(fail)?
        else {
            return Ok(None);
        };
        let facts = sqlx::query("SELECT fact, effective FROM facts WHERE resource = $1")
            .bind(resource)
            .fetch_all(&self.pool)
            .await
            .map_err(fail)?;
        let mut facts = facts
            .iter()
            .map(|f| Ok((self.column::<i64>(f, "effective", which)?, self.column::<String>(f, "fact", which)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        // Sorted here, by bytes: the databases' text collations differ.
        facts.sort();
        Ok(Some(Resource {
            id: resource.to_owned(),
            kind: self.column(&row, "kind", which)?,
            project: self.column(&row, "project", which)?,
            facts: facts.into_iter().map(|(_, fact)| fact).collect(),
            version: self.column(&row, "version", which)?,
            dirty_from: self.column(&row, "dirty_from", which)?,
            next_due: self.column(&row, "next_due", which)?,
            settled_through: self.column(&row, "settled_through", which)?,
            project_closed_at: self.column(&row, "closed_at", which)?,
            project_admitted_at: self.column(&row, "admitted_at", which)?,
        }))
    }

    /// Records a finished review of `resource` at `version_seen`: the version is reviewed, no
    /// change is pending, and `next_due` and `settled_through` are set as given. Applies only
    /// while the resource is still at `version_seen` (a change that came in meanwhile keeps it
    /// due). Returns whether it applied.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be written.
    pub async fn reviewed(
        &self,
        resource: &str,
        version_seen: i64,
        next_due: Option<i64>,
        settled_through: Option<i64>,
    ) -> Result<bool, StoreError> {
        let applied = sqlx::query(
            "UPDATE resources SET reviewed_version = $2, dirty_from = NULL, next_due = $3, settled_through = $4
             WHERE id = $1 AND version = $2",
        )
        .bind(resource)
        .bind(version_seen)
        .bind(next_due)
        .bind(settled_through)
        .execute(&self.pool)
        .await
        .map_err(|e| self.failed(format_args!("recording the review of resource {resource}"), e))?
        .rows_affected();
        Ok(applied == 1)
    }

    /// Admits `project` from `at` (the earliest admission is kept); its resources become due
    /// again, so that what they held before is settled now.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be written.
    pub async fn admit_project(&self, project: &str, at: i64) -> Result<(), StoreError> {
        // Held until now: reviewed again from their start (settled_through is still unset).
        self.earliest_project_time(
            &format!("admitting project {project}"),
            "INSERT INTO admissions (project, admitted_at) VALUES ($1, $2)
             ON CONFLICT (project) DO UPDATE SET admitted_at = excluded.admitted_at
             WHERE admissions.admitted_at > excluded.admitted_at",
            "UPDATE resources SET version = version + 1 WHERE project = $1",
            project,
            at,
        )
        .await
    }

    /// Records `at` for `project` with `insert` (which keeps the earliest time), and, when that
    /// changed it, runs `update` on the project's resources (bound to the project, and to `at`
    /// when it has a `$2`); one transaction.
    async fn earliest_project_time(
        &self,
        what: &str,
        insert: &str,
        update: &str,
        project: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        let fail = |e| self.failed(format_args!("{what}"), e);
        let mut tx = self.begin().await.map_err(fail)?;
        let changed =
            sqlx::query(insert).bind(project).bind(at).execute(&mut *tx).await.map_err(fail)?.rows_affected() == 1;
        if changed {
            let query = sqlx::query(update).bind(project);
            let query = if update.contains("$2") { query.bind(at) } else { query };
            query.execute(&mut *tx).await.map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        Ok(())
    }

    /// Whether `project` was admitted (`projects.managed_by`).
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be read.
    pub async fn admitted(&self, project: &str) -> Result<bool, StoreError> {
        let fail = |e| self.failed(format_args!("reading the admission of project {project}"), e);
        let row = sqlx::query("SELECT admitted_at FROM admissions WHERE project = $1")
            .bind(project)
            .fetch_optional(&self.pool)
            .await
            .map_err(fail)?;
        Ok(row.is_some())
    }

    /// Records that `project` ended at `at`; the earliest end wins. When that changes the
    /// project's end (the first report, or an earlier one), every resource of the project
    /// becomes due from `at`: its version goes up and `dirty_from` down to `at`. A repeated
    /// report changes nothing. One transaction.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the database cannot be written (nothing is stored then).
    pub async fn close_project(&self, project: &str, at: i64) -> Result<(), StoreError> {
        self.earliest_project_time(
            &format!("closing project {project}"),
            "INSERT INTO projects (id, closed_at) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET closed_at = excluded.closed_at
             WHERE projects.closed_at > excluded.closed_at",
            &format!("UPDATE resources SET version = version + 1, {LOWER_DIRTY_FROM} WHERE project = $1"),
            project,
            at,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::on_every_store;

    fn facts(list: &[(&str, i64)]) -> Vec<(String, i64)> {
        list.iter().map(|(f, t)| ((*f).to_owned(), *t)).collect()
    }

    async fn adding_the_same_facts_twice_stores_them_once_and_bumps_the_version_once(store: &Store) {
        // Arrange
        let both = facts(&[(r#"{"b":1}"#, 200), (r#"{"a":1}"#, 100)]);
        // Act
        let first = store.add_facts("r1", "instance", "p1", &both).await.unwrap();
        let again = store.add_facts("r1", "instance", "p1", &both).await.unwrap();
        // Assert
        assert_eq!((first, again), (2, 0));
        let r = store.resource("r1").await.unwrap().unwrap();
        assert_eq!(r.facts, vec![r#"{"a":1}"#.to_owned(), r#"{"b":1}"#.to_owned()], "by effective time");
        assert_eq!((r.version, r.dirty_from), (1, Some(100)));
        assert_eq!(store.counts().await.unwrap().facts, 2);
    }

    async fn a_later_different_project_does_not_replace_the_first(store: &Store) {
        store.add_facts("r1", "instance", "p1", &facts(&[("f1", 100)])).await.unwrap();
        store.add_facts("r1", "instance", "p2", &facts(&[("f2", 50)])).await.unwrap();
        let r = store.resource("r1").await.unwrap().unwrap();
        assert_eq!(r.project, "p1");
        assert_eq!(store.owner("r1").await.unwrap().as_deref(), Some("p1"));
        assert_eq!((r.version, r.dirty_from), (2, Some(50)), "new facts still count");
    }

    async fn an_unknown_resource_reads_as_none(store: &Store) {
        assert_eq!(store.resource("nope").await.unwrap(), None);
        assert_eq!(store.owner("nope").await.unwrap(), None);
    }

    async fn a_long_fact_is_stored_whole(store: &Store) {
        // Longer than PostgreSQL can index as text (about 2.7 kB).
        let long = format!(r#"{{"x":"{}"}}"#, "y".repeat(10_000));
        store.add_facts("r1", "instance", "p1", &[(long.clone(), 1)]).await.unwrap();
        assert_eq!(store.add_facts("r1", "instance", "p1", &[(long.clone(), 1)]).await.unwrap(), 0);
        assert_eq!(store.resource("r1").await.unwrap().unwrap().facts, vec![long]);
    }

    async fn new_facts_make_a_resource_due_until_it_is_reviewed(store: &Store) {
        // Arrange
        store.add_facts("r1", "instance", "p1", &facts(&[("f1", 100)])).await.unwrap();
        assert_eq!(store.due(1_000, 10).await.unwrap(), vec!["r1"]);
        // Act
        let applied = store.reviewed("r1", 1, Some(5_000), Some(900)).await.unwrap();
        // Assert
        assert!(applied);
        assert!(store.due(1_000, 10).await.unwrap().is_empty());
        let r = store.resource("r1").await.unwrap().unwrap();
        assert_eq!((r.dirty_from, r.next_due, r.settled_through), (None, Some(5_000), Some(900)));
        assert_eq!(store.due(5_000, 10).await.unwrap(), vec!["r1"], "due again when next_due comes");
    }

    async fn a_review_of_a_stale_version_does_not_apply(store: &Store) {
        store.add_facts("r1", "instance", "p1", &facts(&[("f1", 100)])).await.unwrap();
        let seen = store.resource("r1").await.unwrap().unwrap().version;
        store.add_facts("r1", "instance", "p1", &facts(&[("f2", 50)])).await.unwrap();
        assert!(!store.reviewed("r1", seen, Some(5_000), None).await.unwrap());
        assert_eq!(store.due(0, 10).await.unwrap(), vec!["r1"]);
        assert_eq!(store.resource("r1").await.unwrap().unwrap().dirty_from, Some(50));
    }

    async fn due_lists_unreviewed_first_then_by_next_due_up_to_the_limit(store: &Store) {
        // Arrange: r1 and r2 reviewed with next_due 300 and 200, r0 never reviewed, r4 not due.
        for (id, next_due) in [("r1", Some(300)), ("r2", Some(200)), ("r4", Some(10_000))] {
            store.add_facts(id, "instance", "p", &facts(&[("f", 1)])).await.unwrap();
            assert!(store.reviewed(id, 1, next_due, None).await.unwrap());
        }
        store.add_facts("r0", "instance", "p", &facts(&[("f", 1)])).await.unwrap();
        // Act, Assert
        assert_eq!(store.due(1_000, 10).await.unwrap(), vec!["r2", "r1", "r0"]);
        assert_eq!(store.due(1_000, 2).await.unwrap(), vec!["r2", "r1"]);
        assert!(store.due(1_000, -1).await.unwrap().is_empty());
    }

    async fn closing_a_project_makes_its_resources_due_from_its_end(store: &Store) {
        // Arrange: two reviewed resources of p1, one of p2.
        for (id, project) in [("r1", "p1"), ("r2", "p1"), ("r3", "p2")] {
            store.add_facts(id, "instance", project, &facts(&[("f", 100)])).await.unwrap();
            assert!(store.reviewed(id, 1, None, None).await.unwrap());
        }
        // Act
        store.close_project("p1", 500).await.unwrap();
        store.close_project("p1", 400).await.unwrap();
        store.close_project("p1", 600).await.unwrap();
        // Assert
        assert_eq!(store.due(0, 10).await.unwrap(), vec!["r1", "r2"]);
        let r1 = store.resource("r1").await.unwrap().unwrap();
        assert_eq!((r1.project_closed_at, r1.dirty_from, r1.version), (Some(400), Some(400), 3));
        assert!(store.reviewed("r1", 3, None, None).await.unwrap());
        store.close_project("p1", 450).await.unwrap();
        assert_eq!(store.due(0, 10).await.unwrap(), vec!["r2"], "a later end changes nothing");
        assert_eq!(store.resource("r3").await.unwrap().unwrap().project_closed_at, None);
    }

    async fn admitting_a_project_makes_its_held_resources_due_and_is_remembered(store: &Store) {
        // Arrange: reviewed (held) resources of p1 and p2.
        for (id, project) in [("r1", "p1"), ("r2", "p2")] {
            store.add_facts(id, "instance", project, &facts(&[("f", 100)])).await.unwrap();
            assert!(store.reviewed(id, 1, None, None).await.unwrap());
        }
        assert!(!store.admitted("p1").await.unwrap());
        // Act
        store.admit_project("p1", 700).await.unwrap();
        store.admit_project("p1", 900).await.unwrap();
        // Assert
        assert!(store.admitted("p1").await.unwrap() && !store.admitted("p2").await.unwrap());
        assert_eq!(store.due(0, 10).await.unwrap(), vec!["r1"]);
        let r1 = store.resource("r1").await.unwrap().unwrap();
        assert_eq!((r1.project_admitted_at, r1.dirty_from, r1.version), (Some(700), None, 2));
        assert!(store.reviewed("r1", 2, None, None).await.unwrap());
        store.admit_project("p1", 800).await.unwrap();
        assert!(store.due(0, 10).await.unwrap().is_empty(), "a later admission changes nothing");
    }

    on_every_store!(
        admitting_a_project_makes_its_held_resources_due_and_is_remembered,
        adding_the_same_facts_twice_stores_them_once_and_bumps_the_version_once,
        a_later_different_project_does_not_replace_the_first,
        an_unknown_resource_reads_as_none,
        a_long_fact_is_stored_whole,
        new_facts_make_a_resource_due_until_it_is_reviewed,
        a_review_of_a_stale_version_does_not_apply,
        due_lists_unreviewed_first_then_by_next_due_up_to_the_limit,
        closing_a_project_makes_its_resources_due_from_its_end,
    );
}

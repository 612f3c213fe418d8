//! Carries out Concertim [`Update`]s: finds the device, rack or team, and changes it only when
//! it differs.
//!
//! Devices are found by `metadata.openstack_instance_id` (an instance's or a volume's id: the
//! original service keeps every device's OpenStack id there), racks by
//! `metadata.openstack_stack_id`, teams by `project_id`: each kind is listed once and cached, and
//! listed again on a miss (at most once per `relist_interval_ms`); there is no sync loop. An
//! update whose device, rack or team Concertim does not have is skipped and counted: Concertim
//! decides what it shows.
//!
//! Team refreshes are debounced per project: the first request schedules one refresh
//! `team_refresh_interval_ms` later, requests until then join it, so a burst of usage costs one
//! refresh per interval. The refresh reads the figures from the billing application then, so it
//! shows everything recorded before it runs.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use serde_json::json;
use tracing::{debug, warn};

use super::{
    client::{Client, ConcertimError, Item, Team},
    Status, Update, Work,
};
use crate::{
    billing::{BillingError, Figures},
    class::ErrorClass,
    config::{BackoffSettings, ConcertimSettings},
    event::{ProjectId, Timestamp},
    retry,
};

/// Why an update failed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// Concertim failed.
    #[error(transparent)]
    Concertim(#[from] ConcertimError),
    /// Reading the figures from the billing application failed.
    #[error("reading billing figures: {0}")]
    Billing(#[from] BillingError),
}

impl UpdateError {
    /// The failure class.
    pub fn class(&self) -> ErrorClass {
        match self {
            UpdateError::Concertim(e) => e.class(),
            UpdateError::Billing(e) => e.class(),
        }
    }
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Concertim was changed.
    Changed,
    /// Concertim already showed it.
    Unchanged,
    /// Concertim has no such device, rack or team (or the backend has no figures).
    NotFound,
    /// A newer status was applied already.
    Stale,
    /// Joined a pending team refresh.
    Scheduled,
    /// The team names another billing account already: left as it is, and said (a log line,
    /// [`crate::telemetry::TEAM_ACCOUNT_CONFLICTS`]).
    Conflict,
}

impl Done {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Done::Changed => "changed",
            Done::Unchanged => "unchanged",
            Done::NotFound => "not_found",
            Done::Stale => "stale",
            Done::Scheduled => "scheduled",
            Done::Conflict => "conflict",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Team,
    Device,
    Rack,
}

#[derive(Debug, Clone)]
struct Entry {
    id: String,
    /// Status (devices, racks) or billing account (teams) as Concertim has it.
    value: Option<String>,
    /// The time of the last status we applied.
    at: Option<Timestamp>,
}

#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<(u8, String), Entry>,
    listed: HashMap<u8, Instant>,
}

/// Applies Concertim work. Shared by the Concertim lanes.
#[derive(Debug)]
pub struct Worker<B> {
    client: Client,
    billing: Arc<B>,
    settings: ConcertimSettings,
    cache: Mutex<Cache>,
    relisting: [tokio::sync::Mutex<()>; 3],
    pending: Mutex<HashSet<ProjectId>>,
    refreshes: AtomicUsize,
}

impl<B: Figures + 'static> Worker<B> {
    /// A worker reading figures from `billing`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(settings: ConcertimSettings, billing: Arc<B>) -> Result<Self, ConcertimError> {
        Ok(Self {
            client: Client::new(settings.clone())?,
            billing,
            settings,
            cache: Mutex::new(Cache::default()),
            relisting: Default::default(),
            pending: Mutex::new(HashSet::new()),
            refreshes: AtomicUsize::new(0),
        })
    }

    /// The client (its login count is observable).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Team refreshes run so far.
    pub fn refreshes(&self) -> usize {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// Applies every update of `work`, in order.
    ///
    /// # Errors
    /// The first failing update, in words, with its error.
    pub async fn apply_all(self: &Arc<Self>, work: &Work) -> Result<Vec<Done>, (String, UpdateError)> {
        let mut done = Vec::with_capacity(work.updates.len());
        for update in &work.updates {
            let result = self.apply(update).await.map_err(|e| (update.describe(), e))?;
            metrics::counter!(crate::telemetry::CONCERTIM_UPDATES, "update" => update.kind(), "result" => result.as_str())
                .increment(1);
            done.push(result);
        }
        Ok(done)
    }

    /// Applies one update.
    ///
    /// # Errors
    /// When Concertim (or, for team figures, the billing application) fails.
    pub async fn apply(self: &Arc<Self>, update: &Update) -> Result<Done, UpdateError> {
        match update {
            Update::LinkTeam { project } => self.link_team(project).await,
            Update::RefreshTeam { project } => Ok(self.schedule_refresh(project)),
            Update::DeviceStatus { instance, status, at } => {
                self.set_status(Kind::Device, instance.as_str(), *status, *at).await
            }
            Update::RackStatus { stack, status, at } => self.set_status(Kind::Rack, stack.as_str(), *status, *at).await,
            Update::RemoveDevice { instance } => self.remove(Kind::Device, instance.as_str()).await,
            Update::RemoveRack { stack } => self.remove(Kind::Rack, stack.as_str()).await,
            Update::PushMetrics { instance, metrics } => {
                let Some(device) = self.find(Kind::Device, instance.as_str()).await? else {
                    return Ok(Done::NotFound);
                };
                let mut done = Done::Changed;
                for metric in metrics {
                    if !self.client.put_metric(&device.id, metric).await? {
                        done = Done::NotFound;
                    }
                }
                Ok(done)
            }
        }
    }

    async fn link_team(&self, project: &ProjectId) -> Result<Done, UpdateError> {
        let Some(team) = self.find(Kind::Team, project.as_str()).await? else { return Ok(Done::NotFound) };
        self.link(project, &team).await
    }

    /// Writes the project's account id on its team, unless the team shows it already or names
    /// another account: that one may be the account the team's invoices and credits are in (a
    /// previous billing service's), so it is kept, and the conflict is logged and counted for
    /// an operator to settle.
    async fn link(&self, project: &ProjectId, team: &Entry) -> Result<Done, UpdateError> {
        let Some(account) = self.billing.team_account(project).await? else { return Ok(Done::NotFound) };
        match team.value.as_deref().filter(|v| !v.is_empty()) {
            Some(current) if current == account => return Ok(Done::Unchanged),
            Some(current) => {
                metrics::counter!(crate::telemetry::TEAM_ACCOUNT_CONFLICTS).increment(1);
                tracing::warn!(
                    project = %project, team = %team.id, team_account = %current, billing_account = %account,
                    "the team names another billing account than the project's: left as it is; set the team's billing_acct_id by hand if the project's is the right one"
                );
                return Ok(Done::Conflict);
            }
            None => {}
        }
        let fields = json!({"billing_acct_id": account});
        Ok(self.change(Kind::Team, project.as_str(), team, fields, Some(account), None).await?)
    }

    /// Sets a device's or rack's status unless it shows it already or a newer one was applied.
    async fn set_status(&self, kind: Kind, key: &str, status: Status, at: Timestamp) -> Result<Done, UpdateError> {
        let Some(entry) = self.find(kind, key).await? else { return Ok(Done::NotFound) };
        if entry.at.is_some_and(|last| last > at) {
            return Ok(Done::Stale);
        }
        if entry.value.as_deref() == Some(status.as_str()) {
            self.store(kind, key, Entry { at: Some(at), ..entry });
            return Ok(Done::Unchanged);
        }
        let fields = json!({"status": status.as_str()});
        Ok(self.change(kind, key, &entry, fields, Some(status.as_str().to_owned()), Some(at)).await?)
    }

    /// PATCHes a record and keeps the cache in step; a record gone meanwhile is forgotten.
    async fn change(
        &self,
        kind: Kind,
        key: &str,
        entry: &Entry,
        fields: serde_json::Value,
        value: Option<String>,
        at: Option<Timestamp>,
    ) -> Result<Done, ConcertimError> {
        if !self.client.update(kind.name(), &entry.id, fields).await? {
            self.forget(kind, key);
            return Ok(Done::NotFound);
        }
        if value.is_some() || at.is_some() {
            let value = value.or_else(|| entry.value.clone());
            self.store(kind, key, Entry { id: entry.id.clone(), value, at: at.or(entry.at) });
        }
        Ok(Done::Changed)
    }

    async fn remove(&self, kind: Kind, key: &str) -> Result<Done, UpdateError> {
        let Some(entry) = self.find(kind, key).await? else { return Ok(Done::NotFound) };
        self.client.delete(kind.name(), &entry.id).await?;
        self.forget(kind, key);
        Ok(Done::Changed)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cached(&self, kind: Kind, key: &str) -> Option<Entry> {
        self.lock_cache().entries.get(&(kind as u8, key.to_owned())).cloned()
    }

    fn store(&self, kind: Kind, key: &str, entry: Entry) {
        self.lock_cache().entries.insert((kind as u8, key.to_owned()), entry);
    }

    fn forget(&self, kind: Kind, key: &str) {
        self.lock_cache().entries.remove(&(kind as u8, key.to_owned()));
    }

    /// The cached record, or, on a miss, the record after listing the kind again (unless it
    /// was listed within the relist interval).
    async fn find(&self, kind: Kind, key: &str) -> Result<Option<Entry>, ConcertimError> {
        if let Some(entry) = self.cached(kind, key) {
            return Ok(Some(entry));
        }
        // One listing per kind at a time; whoever waited finds the fresh list in the cache.
        let _one = self.relisting[kind as usize].lock().await;
        if let Some(entry) = self.cached(kind, key) {
            return Ok(Some(entry));
        }
        let interval = Duration::from_millis(self.settings.relist_interval_ms);
        if self.lock_cache().listed.get(&(kind as u8)).is_some_and(|at| at.elapsed() < interval) {
            return Ok(None);
        }
        let listed: Vec<(String, Entry)> = match kind {
            Kind::Team => self.client.teams().await?.into_iter().filter_map(team_entry).collect(),
            Kind::Device => item_entries(self.client.devices().await?, "openstack_instance_id"),
            Kind::Rack => item_entries(self.client.racks().await?, "openstack_stack_id"),
        };
        debug!(kind = kind.name(), count = listed.len(), "listed Concertim records");
        let mut cache = self.lock_cache();
        cache.entries.retain(|(k, _), _| *k != kind as u8);
        for (key, mut entry) in listed {
            // Keep the time of the last status applied: Concertim's answer has none.
            if let Some(old) = cache.entries.get(&(kind as u8, key.clone())) {
                entry.at = old.at;
            }
            cache.entries.insert((kind as u8, key), entry);
        }
        cache.listed.insert(kind as u8, Instant::now());
        Ok(cache.entries.get(&(kind as u8, key.to_owned())).cloned())
    }

    /// Joins or schedules the project's next team refresh.
    fn schedule_refresh(self: &Arc<Self>, project: &ProjectId) -> Done {
        if !self.pending.lock().unwrap_or_else(PoisonError::into_inner).insert(project.clone()) {
            return Done::Scheduled;
        }
        let worker = Arc::clone(self);
        let project = project.clone();
        // FIXME(concertim): a pending refresh lives in memory only: if the process stops within
        // the interval, the team shows the previous figures until the project's next usage
        // schedules another refresh. The figures are re-read whole, so none is lost for good.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(worker.settings.team_refresh_interval_ms)).await;
            // Requests from now on need a refresh that starts after them: a new one.
            worker.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(&project);
            worker.refresh_with_retries(&project).await;
        });
        Done::Scheduled
    }

    async fn refresh_with_retries(&self, project: &ProjectId) {
        // As patient as a queued update: the retry queue's budget, in process.
        let s = &self.settings;
        let mut schedule = retry::in_process(&BackoffSettings {
            initial_ms: s.backoff.initial_ms,
            max_ms: s.retry_delay_ms.max(s.backoff.max_ms),
            max_elapsed_ms: s.retry_delay_ms.saturating_mul(u64::from(s.max_attempts)),
        });
        loop {
            let result = self.refresh_team(project).await;
            let label = match &result {
                Ok(done) => done.as_str(),
                Err(_) => "failed",
            };
            match result {
                Ok(_) => {
                    metrics::counter!(crate::telemetry::CONCERTIM_UPDATES, "update" => "refresh_team", "result" => label)
                        .increment(1);
                    return;
                }
                Err(e) if e.class() == ErrorClass::Transient => match schedule.next_wait() {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => {
                        warn!(project_id = %project, error.message = %e, "team refresh gave up; the next usage of the project schedules another");
                        return;
                    }
                },
                Err(e) => {
                    metrics::counter!(crate::telemetry::CONCERTIM_UPDATES, "update" => "refresh_team", "result" => "failed")
                        .increment(1);
                    warn!(project_id = %project, error.message = %e, "team refresh refused");
                    return;
                }
            }
        }
    }

    /// Writes the team's cost, credits and billing period as the billing application has them now.
    async fn refresh_team(&self, project: &ProjectId) -> Result<Done, UpdateError> {
        let Some(team) = self.find(Kind::Team, project.as_str()).await? else { return Ok(Done::NotFound) };
        // A team created after its project was (its link found no team then) is linked now.
        if team.value.as_deref().is_none_or(str::is_empty) {
            self.link(project, &team).await?;
        }
        let today = time::OffsetDateTime::now_utc().date();
        let Some(figures) = self.billing.team_figures(project, today).await? else { return Ok(Done::NotFound) };
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        let fields = json!({
            "cost": format!("{:.2}", figures.cost),
            "credits": format!("{:.2}", figures.credits),
            "billing_period_start": figures.period_start.to_string(),
            "billing_period_end": figures.period_end.to_string(),
        });
        Ok(self.change(Kind::Team, project.as_str(), &team, fields, None, None).await?)
    }
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Team => "team",
            Kind::Device => "device",
            Kind::Rack => "rack",
        }
    }
}

fn team_entry(team: Team) -> Option<(String, Entry)> {
    let project = team.project_id.filter(|p| !p.is_empty())?;
    Some((project, Entry { id: team.id, value: team.billing_acct_id, at: None }))
}

fn item_entries(items: Vec<Item>, key: &str) -> Vec<(String, Entry)> {
    items
        .into_iter()
        .filter_map(|item| {
            let k = item.metadata(key)?;
            Some((k, Entry { id: item.id, value: item.status, at: None }))
        })
        .collect()
}

//! The service, wired once: the executor over a billing backend, the consumers (billing,
//! Concertim, and the intake in sharded mode) and the HTTP listener, run until shutdown.
//! `concertim-billing run`, the tests' `spawn_app` and the load generator all start it here.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    api,
    billing::{accounts::Accounts, Billing},
    bus::{self, BusError},
    config::Settings,
    executor::Executor,
    handle, http,
    settle::{Horizon, Settler},
    store::Store,
    telemetry::Health,
};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// `http.listen` is not an address, or cannot be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The configured address.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// The service over one billing backend.
pub struct App<B> {
    /// The executor every message goes through (and its billing backend).
    pub executor: Arc<Executor<B>>,
    /// What `/healthz` and `/readyz` report.
    pub health: Arc<Health>,
    listener: Option<(TcpListener, http::HttpState)>,
    api: Option<(TcpListener, axum::Router)>,
}

impl<B: Billing + 'static> App<B> {
    /// The service over `billing`, configured by `settings`; nothing runs yet.
    pub fn new(settings: Settings, billing: B) -> Self {
        Self { executor: Arc::new(Executor::new(settings, billing)), health: Arc::default(), listener: None, api: None }
    }

    /// Keeps the timelines in `store` (without it they are kept in memory, lost at exit).
    #[must_use]
    pub fn with_store(self, store: Arc<Store>) -> Self {
        self.executor.use_store(store);
        self
    }

    /// Serves `/healthz`, `/readyz` (naming `backend`) and `/metrics` (when `metrics` is
    /// recorded) on `listener` while it runs.
    #[must_use]
    pub fn with_http(mut self, listener: TcpListener, metrics: Option<PrometheusHandle>, backend: String) -> Self {
        let state = http::HttpState::new(Arc::clone(&self.health), metrics, backend);
        self.listener = Some((listener, state));
        self
    }

    /// Listens on `http.listen` (empty: no listener) for `/healthz`, `/readyz` and `/metrics`,
    /// recording metrics into a Prometheus recorder installed here.
    ///
    /// # Errors
    /// When `http.listen` is not an address or cannot be bound.
    pub async fn listen(self, backend: String) -> Result<Self, AppError> {
        let Some(listener) = bind(&self.executor.settings().http.listen, "http.listen").await? else {
            return Ok(self);
        };
        tracing::info!(addr = %self.executor.settings().http.listen, "serving /healthz /readyz /metrics");
        Ok(self.with_http(listener, crate::telemetry::install_prometheus(), backend))
    }

    /// Runs the listener (if any) and the consumers until `shutdown`, or until the bus fails
    /// for good.
    ///
    /// # Errors
    /// As [`bus::run`].
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BusError> {
        let handlers = handle::Handlers::new(&self.executor)
            .map_err(|e| BusError::Config { detail: format!("concertim: {e}") })?;
        if let Some((listener, state)) = self.listener {
            tokio::spawn(http::serve(listener, http::router(state), shutdown.clone()));
        }
        if let Some((listener, router)) = self.api {
            tokio::spawn(http::serve(listener, router, shutdown.clone()));
        }
        let settings = self.executor.settings().clone();
        let settler =
            self.executor.settler().await.map_err(|e| BusError::Config { detail: format!("state store: {e}") })?;
        let concertim = handlers.concertim.as_ref().map(Arc::clone);
        let settling = tokio::spawn(settle_every(
            Arc::clone(&self.executor),
            settler,
            concertim,
            settings.billing.time.settle_every_s,
            shutdown.clone(),
        ));
        let result = bus::run(&settings, handlers.billing, handlers.concertim, shutdown.clone(), self.health).await;
        shutdown.cancel();
        // A pass in progress finishes its current step; what it did not reach waits for the next run.
        let _ = settling.await;
        result
    }
}

impl<B: Billing + Accounts + 'static> App<B> {
    /// Serves the billing API ([`crate::api`]) on `listener` while it runs, over this
    /// service's billing backend.
    #[must_use]
    pub fn with_api(mut self, listener: TcpListener) -> Self {
        let settings = self.executor.settings();
        // The bundled catalog is checked by the unit tests: its currency has a precision.
        let precision = crate::price::Catalog::bundled().map_or(2, crate::price::Catalog::precision);
        let state = api::ApiState::new(
            self.executor.shared_billing(),
            settings.api.clone(),
            settings.billing.credit_threshold,
            precision,
        );
        self.api = Some((listener, api::router(Arc::new(state))));
        self
    }

    /// Listens on `api.listen` (empty, the default: no billing API) for the billing API.
    ///
    /// # Errors
    /// When `api.listen` is not an address or cannot be bound.
    pub async fn listen_api(self) -> Result<Self, AppError> {
        let Some(listener) = bind(&self.executor.settings().api.listen, "api.listen").await? else {
            return Ok(self);
        };
        tracing::info!(addr = %self.executor.settings().api.listen, routes = api::ROUTES.join(" "), "serving the billing API");
        Ok(self.with_api(listener))
    }
}

impl<B: Billing + 'static> App<B> {
    /// Admits, from Keystone, the projects the bus cannot say are in the managed scope: those on
    /// which `projects.managed_by` holds its role, and those whose name matches
    /// `projects.include_names`, as they are now (assignments made before this service ran, or
    /// while it was down). Answers how many it admitted that were not admitted yet.
    ///
    /// # Errors
    /// When Keystone or the state store fails.
    pub async fn admit_from_keystone(&self, keystone: &crate::keystone::Keystone) -> Result<usize, anyhow::Error> {
        let projects = keystone.managed_projects(&self.executor.settings().projects).await?;
        let now = crate::event::Timestamp::now();
        let mut admitted = 0;
        for project in &projects {
            if self.executor.admit(project, now).await? {
                admitted += 1;
            }
        }
        Ok(admitted)
    }
}

/// A listener on `listen` (the setting `key`), or none when it is empty.
async fn bind(listen: &str, key: &str) -> Result<Option<TcpListener>, AppError> {
    if listen.is_empty() {
        return Ok(None);
    }
    let addr: std::net::SocketAddr =
        listen.parse().map_err(|e| AppError::Listen { addr: listen.to_owned(), reason: format!("{e}") })?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| AppError::Listen { addr: listen.to_owned(), reason: format!("{e} ({key}; \"\" disables it)") })?;
    Ok(Some(listener))
}

/// The one clock of the service: a settlement pass every `every_s` seconds until shutdown, up
/// to the executor's watermark (now, unless a backlog is being drained). The teams of the
/// projects a pass billed get their figures refreshed in Concertim (debounced like the others).
async fn settle_every<B: Billing + 'static>(
    executor: Arc<Executor<B>>,
    settler: Settler<B>,
    concertim: Option<Arc<handle::ConcertimHandler<B>>>,
    every_s: u64,
    shutdown: CancellationToken,
) {
    // The first pass comes one period after the start, not at once: a replica that restarts
    // in a loop does not hammer the billing application.
    let every = std::time::Duration::from_secs(every_s.max(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        // Idle for a whole interval (and at least 5 s): the bus has nothing older to say.
        // FIXME(settlement): the watermark is this replica's own; a replica that consumes
        // nothing (a standby in sharded mode) settles up to now while another drains a backlog,
        // which can bill a deleted instance until its queued delete arrives (then a shortfall).
        // A watermark shared through the store would close this.
        let horizon = executor.watermark(now, i64::try_from(every_s.max(5)).unwrap_or(i64::MAX));
        let pass = tokio::select! {
            () = shutdown.cancelled() => return,
            pass = settler.pass(Horizon::Now(horizon)) => pass,
        };
        match &pass {
            Ok(pass) if pass.posted > 0 || !pass.failures.is_empty() => tracing::info!(
                reviewed = pass.reviewed,
                posted = pass.posted,
                corrections = pass.corrections,
                failed = pass.failures.len(),
                held_elsewhere = pass.held,
                "settlement pass"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "settlement pass failed; the next one tries again"),
        }
        if let (Ok(pass), Some(concertim)) = (&pass, &concertim) {
            for project in &pass.billed_projects {
                concertim.refresh_team(project).await;
            }
        }
    }
}

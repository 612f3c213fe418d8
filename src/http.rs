//! The HTTP surface: `/healthz` (the process answers), `/readyz` (consuming from the broker) and
//! `/metrics` (Prometheus text). Bound to 127.0.0.1 by default.
//!
//! It cannot be starved: at most [`MAX_CONNECTIONS`] connections are served at once (the others
//! are closed as soon as they are accepted, so idle sockets cannot use up the process's file
//! descriptors, which the billing clients and the broker connection need), a client has
//! [`HEADER_TIMEOUT`] to send its request headers and a connection lives at most
//! [`CONNECTION_LIFETIME`]. `/metrics` renders at most once per [`METRICS_MAX_AGE`], so a flood
//! of scrapes costs the consumers little.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Health;

/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request headers (also between requests on a kept-alive
/// connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection is kept, however busy.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long a rendered `/metrics` page is served again before it is rendered anew.
pub const METRICS_MAX_AGE: Duration = Duration::from_millis(500);
/// Requests are answered at most this often, all routes together (200 a second): a flood
/// waits instead of taking the consumers' CPU. Probes and scrapes need a few a second, and the
/// longest wait, [`MAX_CONNECTIONS`] requests queued, is 0.32 s, within a probe's timeout.
pub const REQUEST_INTERVAL: Duration = Duration::from_millis(5);

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// The consumer's health.
    pub health: Arc<Health>,
    /// The metrics, when this process installed the recorder.
    pub metrics: Option<PrometheusHandle>,
    /// Where billing goes, as `/readyz` reports it.
    pub backend: String,
    /// The last rendered `/metrics` page, and when.
    rendered: Arc<Mutex<Option<(Instant, String)>>>,
    /// When the next request may be answered (see [`REQUEST_INTERVAL`]).
    next_answer: Arc<Mutex<Option<Instant>>>,
}

impl HttpState {
    /// The state for these parts, nothing rendered yet.
    pub fn new(health: Arc<Health>, metrics: Option<PrometheusHandle>, backend: String) -> Self {
        Self { health, metrics, backend, rendered: Arc::default(), next_answer: Arc::default() }
    }
}

/// The routes, paced (see [`REQUEST_INTERVAL`]).
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), pace))
        .with_state(state)
}

/// Holds each request until its turn: one every [`REQUEST_INTERVAL`].
async fn pace(
    State(state): State<HttpState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let turn = {
        let mut next_answer = state.next_answer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let turn = next_answer.map_or_else(Instant::now, |t| t.max(Instant::now()));
        *next_answer = Some(turn + REQUEST_INTERVAL);
        turn
    };
    tokio::time::sleep_until(turn.into()).await;
    next.run(request).await
}

/// Serves `router` on `listener` until `stop`, within the limits above.
pub async fn serve(listener: tokio::net::TcpListener, router: Router, stop: CancellationToken) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: let some close before trying again.
                tracing::warn!(error.message = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            metrics::counter!(crate::telemetry::HTTP_REFUSED).increment(1);
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_LIFETIME, connection) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if let Some((stuck, waiting)) = state.health.intake_stuck() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: the intake lock is held by a connection that moves nothing for {} s \
                 ({waiting} messages wait in the main queue, which has no consumer); this replica takes over \
                 after bus.intake_takeover_ms; billing to {}\n",
                stuck.as_secs(),
                state.backend
            ),
        );
    }
    if state.health.is_consuming() {
        (StatusCode::OK, format!("ready: consuming; billing to {}\n", state.backend))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: not consuming from the broker; billing to {}\n", state.backend),
        )
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let Some(handle) = &state.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are not recorded in this process\n".to_owned());
    };
    let mut rendered = state.rendered.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match &*rendered {
        Some((at, text)) if at.elapsed() < METRICS_MAX_AGE => (StatusCode::OK, text.clone()),
        _ => {
            let text = handle.render();
            *rendered = Some((Instant::now(), text.clone()));
            (StatusCode::OK, text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readyz_is_unready_while_the_intake_is_stuck_even_when_consuming() {
        let health = Arc::new(Health::default());
        health.set_consuming(true);
        let state = HttpState::new(Arc::clone(&health), None, "the ledger".into());
        let ready = readyz(State(state.clone())).await.into_response();
        assert_eq!(ready.status(), StatusCode::OK);
        health.set_intake_stuck(Some((Instant::now(), 4)));
        let stuck = readyz(State(state)).await.into_response();
        assert_eq!(stuck.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}

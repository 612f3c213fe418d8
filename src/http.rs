//! The HTTP surface: `/healthz` (the process answers), `/readyz` (consuming from the broker) and
//! `/metrics` (Prometheus text). Bound to 127.0.0.1 by default.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::telemetry::Health;

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// The consumer's health.
    pub health: Arc<Health>,
    /// The metrics, when this process installed the recorder.
    pub metrics: Option<PrometheusHandle>,
    /// Where billing goes, as `/readyz` reports it.
    pub backend: String,
}

/// The routes.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
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
    match &state.metrics {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (StatusCode::NOT_FOUND, "metrics are not recorded in this process\n".to_owned()),
    }
}

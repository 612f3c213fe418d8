//! `[concertim]`: the Concertim API, its queue, and the live metrics it shows.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use super::*;

/// Concertim (the Rails API and its metric reporting daemon): device and rack status, team
/// billing figures and live metrics. Its updates run on their own queue, so an outage of
/// Concertim never holds billing up.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConcertimSettings {
    /// Base URL, e.g. `https://concertim.example`; the API is under `/api/v1`, the metric
    /// reporting daemon under `/mrd`.
    pub url: String,
    /// Login of a root (admin) user: only root may write team billing figures.
    pub username: String,
    /// Its password.
    pub password: Secret,
    /// Verify the server's TLS certificate (against `ca_file`, or the system roots).
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// A PEM bundle of the CAs Concertim's certificate is verified against, instead of the
    /// system roots (a private CA).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Whole-request timeout (ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Connection timeout (ms).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// A team's cost and credits are refreshed at most once per this interval (ms): a burst
    /// of usage for one project causes one refresh at the end of the interval.
    #[serde(default = "default_team_refresh_ms")]
    pub team_refresh_interval_ms: u64,
    /// Devices, racks and teams are listed again on a miss, at most once per this interval (ms).
    #[serde(default = "default_relist_ms")]
    pub relist_interval_ms: u64,
    /// Delay of the Concertim retry queue (ms).
    #[serde(default = "default_concertim_retry_ms")]
    pub retry_delay_ms: u64,
    /// Attempts (each with its in-process retries) before a Concertim update is dead-lettered.
    #[serde(default = "default_concertim_attempts")]
    pub max_attempts: u32,
    /// In-process retries of a transient Concertim failure.
    #[serde(default = "default_concertim_backoff")]
    pub backoff: BackoffSettings,
    /// Parallel lanes of Concertim updates (one project's updates stay in order).
    #[serde(default = "default_concertim_lanes")]
    pub lanes: usize,
    /// Ceilometer meter → the metric pushed to the metric reporting daemon for the instance's
    /// device. Meters not listed are not pushed.
    #[serde(default)]
    pub metrics: BTreeMap<String, MetricRule>,
}

/// How one Ceilometer meter is shown as a live metric.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricRule {
    /// The metric's name in Concertim, e.g. `cpu_load`.
    pub name: String,
    /// Its units, e.g. `%`.
    #[serde(default)]
    pub units: String,
    /// The MRD type: `double` (default), `float`, `int32`, … (`string` is not supported).
    #[serde(default = "default_metric_type", rename = "type")]
    pub kind: String,
    /// The MRD slope: `both` (default), `zero`, `positive`, `negative`, `derivative`.
    #[serde(default = "default_metric_slope")]
    pub slope: String,
    /// Seconds the value stays current.
    #[serde(default = "default_metric_ttl")]
    pub ttl: u32,
}

pub(super) fn default_true() -> bool {
    true
}
pub(super) fn default_team_refresh_ms() -> u64 {
    10_000
}
pub(super) fn default_relist_ms() -> u64 {
    30_000
}
pub(super) fn default_concertim_retry_ms() -> u64 {
    15_000
}
pub(super) fn default_concertim_attempts() -> u32 {
    20
}
pub(super) fn default_concertim_backoff() -> BackoffSettings {
    BackoffSettings { initial_ms: 500, max_ms: 5_000, max_elapsed_ms: 15_000 }
}
pub(super) fn default_concertim_lanes() -> usize {
    4
}
pub(super) fn default_metric_type() -> String {
    "double".to_owned()
}
pub(super) fn default_metric_slope() -> String {
    "both".to_owned()
}
pub(super) fn default_metric_ttl() -> u32 {
    3600
}

impl ConcertimSettings {
    pub(super) fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("concertim.url {:?} must start with http:// or https://", self.url));
        }
        if self.lanes == 0 || self.lanes > 1024 {
            return Err(format!("concertim.lanes is {}: it must be between 1 and 1024", self.lanes));
        }
        if self.max_attempts == 0 {
            return Err("concertim.max_attempts must be at least 1".into());
        }
        check_ca_file("concertim", self.ca_file.as_deref(), self.tls_verify)?;
        const TYPES: [&str; 8] = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "float", "double"];
        const SLOPES: [&str; 5] = ["zero", "positive", "negative", "both", "derivative"];
        for (meter, rule) in &self.metrics {
            if !TYPES.contains(&rule.kind.as_str()) {
                return Err(format!("concertim.metrics.\"{meter}\".type {:?} is not one of {TYPES:?}", rule.kind));
            }
            if !SLOPES.contains(&rule.slope.as_str()) {
                return Err(format!("concertim.metrics.\"{meter}\".slope {:?} is not one of {SLOPES:?}", rule.slope));
            }
            if rule.ttl == 0 || rule.name.is_empty() {
                return Err(format!("concertim.metrics.\"{meter}\" needs a name and a ttl of at least 1 s"));
            }
        }
        Ok(())
    }

    /// The Concertim retry queue's delay.
    pub fn retry_delay(&self) -> Duration {
        Duration::from_millis(self.retry_delay_ms)
    }
}

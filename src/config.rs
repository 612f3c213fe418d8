//! Typed configuration: one `Settings` tree read from TOML and validated once, at start.
//!
//! Owns the billing rules an operator controls (flavor → plan, meter → unit and factor, which
//! projects are billed) and the decoder's limits. Everything else in the program receives these
//! as already-checked values: a bad deployment fails at start with one message naming the key.

use std::{collections::BTreeMap, fmt, path::Path, str::FromStr, time::Duration};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::event::{PlanName, ProjectId, Unit};

/// The embedded default configuration, used when no file is given. It is also the annotated
/// reference for every key (`config check` prints the effective values).
pub const DEFAULT_TOML: &str = include_str!("default-config.toml");

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, or a value of the wrong type.
    #[error("invalid config {origin}: {source}")]
    Parse {
        /// The file, or `(embedded default)`.
        origin: String,
        /// The parser's error, with the offending key and position.
        #[source]
        source: toml::de::Error,
    },
    /// A cross-field rule failed.
    #[error("invalid config {origin}: {message}")]
    Rule {
        /// The file, or `(embedded default)`.
        origin: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// Prefix of the environment variables that override the file: `CONCERTIM_BILLING_BUS__URL`
/// sets `bus.url` (`__` separates levels). `CONCERTIM_BILLING_CONFIG` and
/// `CONCERTIM_BILLING_AMQP_URL` are the command line's `--config` and `--amqp-url`.
pub const ENV_PREFIX: &str = "CONCERTIM_BILLING_";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Billing rules.
    pub billing: BillingSettings,
    /// Which projects are billed.
    #[serde(default)]
    pub projects: ProjectFilter,
    /// Decoder limits.
    #[serde(default)]
    pub decode: DecodeLimits,
    /// The message bus: broker, our queues, bindings, retries.
    #[serde(default)]
    pub bus: BusSettings,
    /// The KillBill server, used when `billing.backend = "killbill"`.
    #[serde(default)]
    pub killbill: Option<KillBillSettings>,
    /// The HostBill server, used when `billing.backend = "hostbill"`.
    #[serde(default)]
    pub hostbill: Option<HostBillSettings>,
    /// The health and metrics listener of `run`.
    #[serde(default)]
    pub http: HttpSettings,
    /// Concertim, the visualisation app, updated alongside billing when this section is present.
    #[serde(default)]
    pub concertim: Option<ConcertimSettings>,
}

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
    /// Verify the server's TLS certificate (against the system roots).
    #[serde(default = "default_true")]
    pub tls_verify: bool,
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

fn default_true() -> bool {
    true
}
fn default_team_refresh_ms() -> u64 {
    10_000
}
fn default_relist_ms() -> u64 {
    30_000
}
fn default_concertim_retry_ms() -> u64 {
    15_000
}
fn default_concertim_attempts() -> u32 {
    20
}
fn default_concertim_backoff() -> BackoffSettings {
    BackoffSettings { initial_ms: 500, max_ms: 5_000, max_elapsed_ms: 15_000 }
}
fn default_concertim_lanes() -> usize {
    4
}
fn default_metric_type() -> String {
    "double".to_owned()
}
fn default_metric_slope() -> String {
    "both".to_owned()
}
fn default_metric_ttl() -> u32 {
    3600
}

/// The health and metrics listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address of `/healthz`, `/readyz` and `/metrics`; empty to disable. Loopback by default:
    /// expose it deliberately.
    pub listen: String,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9464".to_owned() }
    }
}

/// The HostBill server. Every key may be absent in the file (so `config check` can name each
/// missing one); the ones a HostBill deployment needs are checked at load.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostBillSettings {
    /// Base URL of HostBill, e.g. `https://billing.example`; calls go to `<url>/admin/api.php`.
    pub url: Option<String>,
    /// API id (Settings → Security → API Access).
    pub api_id: Option<String>,
    /// API key.
    pub api_key: Option<Secret>,
    /// Plan name (from `[billing.plans]` and `default_plan`) → HostBill product id of a
    /// Metered Billing product whose variables are the meter units.
    #[serde(default)]
    pub products: BTreeMap<String, String>,
    /// Clients are found again by the email `<project id>@<client_email_domain>`.
    #[serde(default = "default_client_email_domain")]
    pub client_email_domain: String,
    /// Billing cycle of new orders (`m` monthly, `q`, `s`, `a`, …).
    #[serde(default = "default_cycle")]
    pub cycle: String,
    /// Whole-request timeout (ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Connection timeout (ms).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

fn default_client_email_domain() -> String {
    "openstack.invalid".to_owned()
}
fn default_cycle() -> String {
    "m".to_owned()
}

/// A secret (password, API secret): never shown in `Debug`, `Display` or `config check`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one call that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// Which billing application receives the plans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The embedded ledger (memory, or the `--ledger` file).
    #[default]
    Ledger,
    /// KillBill, as configured in `[killbill]`.
    Killbill,
    /// HostBill, as configured in `[hostbill]`.
    Hostbill,
}

/// The KillBill server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KillBillSettings {
    /// Base URL, e.g. `https://killbill.example:8443` (TLS verified against the system roots).
    pub url: String,
    /// Basic-auth user.
    pub username: String,
    /// Basic-auth password.
    pub password: Secret,
    /// The tenant's API key (`X-Killbill-ApiKey`).
    pub api_key: String,
    /// The tenant's API secret (`X-Killbill-ApiSecret`).
    pub api_secret: Secret,
    /// `X-Killbill-CreatedBy` on every write.
    #[serde(default = "default_created_by")]
    pub created_by: String,
    /// Currency of new accounts (immutable in KillBill).
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Whole-request timeout (ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Connection timeout (ms).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Idle connections kept per host.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle: usize,
    /// The server's release line, which decides how dates and amounts are written.
    #[serde(default)]
    pub server_version: KillBillVersion,
}

impl std::fmt::Display for KillBillVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KillBillVersion::V0_24 => "0.24",
            KillBillVersion::V0_22 => "0.22",
        })
    }
}

/// The KillBill release lines this client speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum KillBillVersion {
    /// 0.24: subscription and usage dates are date-times, usage amounts decimals.
    #[default]
    #[serde(rename = "0.24")]
    V0_24,
    /// 0.22: subscription and usage dates are days (`yyyy-MM-dd`, refused otherwise) and usage
    /// amounts whole numbers (a fraction is silently truncated by the server, so this client
    /// refuses to send one).
    #[serde(rename = "0.22")]
    V0_22,
}

fn default_created_by() -> String {
    "concertim-billing".to_owned()
}
fn default_currency() -> String {
    "USD".to_owned()
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_connect_timeout_ms() -> u64 {
    3_000
}
fn default_pool_max_idle() -> usize {
    32
}

/// A broker URL whose password never appears in `Debug`, `Display` or `config check`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`. The user information ends at the last
    /// `@` (a password may hold an unencoded `/` or `:`, which ends no part of it); text that is
    /// not a URL is not shown beyond what follows its last `@`.
    pub fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return match self.0.rsplit_once('@') {
                Some((_, host)) => format!("(not a URL: ***@{host})"),
                None if self.0.contains(':') => "(not a URL)".to_owned(),
                None => self.0.clone(),
            };
        };
        match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => format!("{scheme}://{userinfo}@{host}"),
            },
            None => self.0.clone(),
        }
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// One binding of our queue to an upstream (OpenStack) exchange.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// The service's control exchange (`nova`, `keystone`, `ceilometer`, …).
    pub exchange: String,
    /// The routing key (`notifications.info`, `metering.sample`, …).
    pub routing_key: String,
}

/// The message bus.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusSettings {
    /// Broker URL, `amqp://user:password@host:5672/vhost` or `amqps://…` (TLS, certificates
    /// verified against the system roots). The vhost is the URL's path (`%2f` is `/`).
    pub url: SecretUrl,
    /// Prepended to every queue and exchange this service owns (not to upstream exchanges).
    pub prefix: String,
    /// Name of our main queue; the retry and dead-letter names derive from it.
    pub queue: String,
    /// Upstream exchanges and routing keys our queue is bound to.
    pub bindings: Vec<Binding>,
    /// The durability with which `replay --publish` declares the upstream exchanges it
    /// publishes to, as OpenStack's publishers would: their `[oslo_messaging_rabbit]
    /// amqp_durable_queues` (true with `rabbit_quorum_queue`). The service itself never
    /// declares an upstream exchange; it checks them passively.
    pub upstream_durable: bool,
    /// Unacknowledged messages the broker may hand us at once.
    pub prefetch: u16,
    /// Parallel lanes. One project's messages always take the same lane, so they are handled in
    /// order; different projects are handled concurrently.
    pub lanes: usize,
    /// Quorum-queue `x-delivery-limit`: after this many redeliveries (crash loops) the broker
    /// dead-letters a message by itself. RabbitMQ 3.10 has no default, so it is always set.
    pub delivery_limit: u32,
    /// Delay of the retry queue before a transiently failed message is tried again (ms).
    pub retry_delay_ms: u64,
    /// Processing attempts (each with its in-process retries) before a transiently failing
    /// message is dead-lettered as exhausted.
    pub max_attempts: u32,
    /// In-process retries of a transient failure, before the retry queue.
    pub backoff: BackoffSettings,
    /// How long in-flight messages may take to finish on shutdown (ms).
    pub shutdown_deadline_ms: u64,
    /// Longest wait between reconnection attempts (ms).
    pub reconnect_max_ms: u64,
    /// Shard queues of the sharded topology (0: off). With N shards, one replica at a time
    /// (the intake) moves the main queue's messages to N queues by project id through the
    /// consistent-hash exchange, and each shard has a single active consumer among the
    /// replicas: each project is handled by one replica at a time, in order.
    pub shards: u16,
    /// How often a standby replica asks to become the intake in sharded mode (ms): the longest
    /// the main queue waits after the intake replica stops.
    pub intake_standby_ms: u64,
    /// How long the intake lock may be held by a connection that moves nothing (the main queue
    /// has messages and no consumer) before a standby replica consumes the main queue anyway
    /// (ms).
    pub intake_takeover_ms: u64,
}

impl Default for BusSettings {
    fn default() -> Self {
        let binding = |exchange: &str, routing_key: &str| Binding {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        };
        Self {
            url: SecretUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            prefix: String::new(),
            queue: "concertim-billing".to_owned(),
            bindings: vec![
                binding("nova", "notifications.info"),
                binding("keystone", "notifications.info"),
                binding("ceilometer", "metering.sample"),
                binding("heat", "notifications.info"),
            ],
            upstream_durable: false,
            prefetch: 256,
            lanes: 32,
            delivery_limit: 20,
            retry_delay_ms: 30_000,
            max_attempts: 5,
            backoff: BackoffSettings::default(),
            shutdown_deadline_ms: 30_000,
            reconnect_max_ms: 30_000,
            shards: 0,
            intake_standby_ms: 2_000,
            intake_takeover_ms: 60_000,
        }
    }
}

impl BusSettings {
    /// The retry queue's delay.
    pub fn retry_delay(&self) -> Duration {
        Duration::from_millis(self.retry_delay_ms)
    }

    /// The shutdown deadline.
    pub fn shutdown_deadline(&self) -> Duration {
        Duration::from_millis(self.shutdown_deadline_ms)
    }
}

/// Exponential backoff of in-process retries.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffSettings {
    /// First wait (ms); each next one is 1.5 times longer, plus a random jitter of up to
    /// itself.
    pub initial_ms: u64,
    /// Longest single wait before its jitter (ms).
    pub max_ms: u64,
    /// Give up retrying in process once the waits add up to this (ms); 0 disables in-process
    /// retries.
    pub max_elapsed_ms: u64,
}

impl Default for BackoffSettings {
    fn default() -> Self {
        Self { initial_ms: 200, max_ms: 2_000, max_elapsed_ms: 5_000 }
    }
}

/// Billing rules: plans and meters.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BillingSettings {
    /// Where billing goes: `ledger` (the default) or `killbill`.
    #[serde(default)]
    pub backend: BackendKind,
    /// The plan of flavors not listed in `plans`.
    pub default_plan: PlanName,
    /// Flavor name → plan.
    #[serde(default)]
    pub plans: BTreeMap<String, PlanName>,
    /// Ceilometer meter name → billing unit and factor. Meters not listed are not billed.
    #[serde(default)]
    pub meters: BTreeMap<String, MeterRule>,
    /// The largest amount one usage record may carry (in its unit). A sample whose amount is
    /// above it, negative, or dated far from its notification is invalid and dead-lettered
    /// with the reason, never billed (nor credited).
    #[serde(default = "default_max_record_amount")]
    pub max_record_amount: Decimal,
}

fn default_max_record_amount() -> Decimal {
    Decimal::from(1_000_000_000u64)
}

impl BillingSettings {
    /// The plan for a flavor name: its entry in `plans`, or the default plan.
    pub fn plan_for(&self, flavor: Option<&str>) -> &PlanName {
        flavor.and_then(|name| self.plans.get(name)).unwrap_or(&self.default_plan)
    }
}

/// How one Ceilometer meter is billed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeterRule {
    /// The billing unit (KillBill `unitType`).
    pub unit: Unit,
    /// amount = volume × factor.
    pub factor: Factor,
}

/// A non-negative multiplier, written as a decimal (`"0.5"`, `2`) or a ratio (`"1/6"`), so that
/// factors like one sixth of an hour stay exact until the final rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Factor {
    numerator: Decimal,
    denominator: Decimal,
}

/// Decimal places kept in a usage amount: KillBill stores amounts as numeric(15,9).
pub const AMOUNT_SCALE: u32 = 9;

impl Factor {
    /// The factor 1.
    pub const ONE: Factor = Factor { numerator: Decimal::ONE, denominator: Decimal::ONE };

    /// volume × factor, rounded half-even to [`AMOUNT_SCALE`] places. Each record is rounded on
    /// its own, so totals do not depend on the order records arrive in. `None` on overflow.
    pub fn apply(&self, volume: Decimal) -> Option<Decimal> {
        let product = volume.checked_mul(self.numerator)?.checked_div(self.denominator)?;
        Some(product.round_dp(AMOUNT_SCALE).normalize())
    }
}

impl FromStr for Factor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let number = |t: &str| {
            Decimal::from_str(t.trim())
                .or_else(|_| Decimal::from_scientific(t.trim()))
                .map_err(|_| format!("factor {text:?} is not a number or a ratio such as \"1/6\""))
        };
        let (numerator, denominator) = match text.split_once('/') {
            Some((n, d)) => (number(n)?, number(d)?),
            None => (number(text)?, Decimal::ONE),
        };
        if denominator.is_zero() {
            return Err(format!("factor {text:?} divides by zero"));
        }
        if numerator.is_sign_negative() || denominator.is_sign_negative() {
            return Err(format!("factor {text:?} is negative"));
        }
        Ok(Factor { numerator, denominator })
    }
}

impl fmt::Display for Factor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.denominator == Decimal::ONE {
            write!(f, "{}", self.numerator)
        } else {
            write!(f, "{}/{}", self.numerator, self.denominator)
        }
    }
}

impl Serialize for Factor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Factor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Int(i64),
            Float(f64),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Text(t) => t,
            Raw::Int(i) => i.to_string(),
            Raw::Float(f) => f.to_string(),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Which projects are billed. Keystone and Nova notifications carry project ids, not names, so
/// the filter is by id.
// FIXME(billing): filtering by project name (only `CM_*` projects, as Concertim names them)
// needs a Keystone lookup per new project id; until then such a deployment lists the ids.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectFilter {
    /// When non-empty, only these projects are billed.
    #[serde(default)]
    pub include: Vec<ProjectId>,
    /// Never billed, even when included.
    #[serde(default)]
    pub exclude: Vec<ProjectId>,
}

impl ProjectFilter {
    /// Whether events of this project are billed.
    pub fn admits(&self, project: &ProjectId) -> bool {
        !self.exclude.contains(project) && (self.include.is_empty() || self.include.contains(project))
    }
}

/// The largest body accepted by default (1 MiB). oslo notifications are a few KiB; a Ceilometer
/// batch of a hundred samples stays well under 256 KiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// The decoder's limits (`[decode]`), applied before any parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeLimits {
    /// Bodies larger than this many bytes are invalid without being parsed.
    pub max_body_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_body_bytes: DEFAULT_MAX_BODY_BYTES }
    }
}

impl Settings {
    /// The embedded default configuration.
    pub fn embedded() -> Self {
        // The embedded file is checked by a unit test, so this cannot fail in a release.
        Self::from_toml(DEFAULT_TOML, "(embedded default)").expect("the embedded default config is valid")
    }

    /// Parses and validates a TOML document; `origin` names it in errors.
    ///
    /// # Errors
    /// Malformed TOML, an unknown key, a wrong type, or a failed cross-field rule.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::layered(text, origin, std::iter::empty())
    }

    /// Parses a TOML document, applies `overrides` (`(["bus", "url"], "amqp://…")`), then
    /// validates. An override of a secret or of a string-valued key is taken literally; any
    /// other that parses as a bare TOML value (number, boolean, array) is taken as that.
    ///
    /// Errors never echo a value: a value of the wrong type is named by its key, and by its
    /// environment variable when an override brought it.
    ///
    /// # Errors
    /// As [`Settings::from_toml`].
    pub fn layered(
        text: &str,
        origin: &str,
        overrides: impl IntoIterator<Item = (Vec<String>, String)>,
    ) -> Result<Self, ConfigError> {
        let file: toml::Table =
            text.parse().map_err(|source| ConfigError::Parse { origin: origin.to_owned(), source })?;
        let overrides: Vec<(Vec<String>, String)> = overrides.into_iter().collect();
        let mut table = file.clone();
        for (path, value) in &overrides {
            let value = override_value(&table, path, value);
            set_path(&mut table, path, value);
        }
        let settings = match Self::from_table(table) {
            Ok(settings) => settings,
            Err(message) if overrides.is_empty() => {
                return Err(ConfigError::Rule { origin: origin.to_owned(), message })
            }
            Err(message) => {
                // Blame the first override that breaks a file that reads well without it.
                let mut table = file;
                let mut culprit = Self::from_table(table.clone()).err().map(|m| (origin.to_owned(), m));
                for (path, value) in &overrides {
                    if culprit.is_some() {
                        break;
                    }
                    let value = override_value(&table, path, value);
                    set_path(&mut table, path, value);
                    culprit = Self::from_table(table.clone()).err().map(|m| (env_name(path), m));
                }
                let (origin, message) =
                    culprit.unwrap_or_else(|| (format!("{origin} with its environment overrides"), message));
                return Err(ConfigError::Rule { origin, message });
            }
        };
        settings.validate().map_err(|message| ConfigError::Rule {
            origin: if overrides.is_empty() {
                origin.to_owned()
            } else {
                let names: Vec<String> = overrides.iter().map(|(path, _)| env_name(path)).collect();
                format!("{origin} with {}", names.join(", "))
            },
            message,
        })?;
        Ok(settings)
    }

    /// The settings a table holds, or why not (values never echoed).
    fn from_table(mut table: toml::Table) -> Result<Self, String> {
        read_secret_files(&mut table, "")?;
        table.try_into().map_err(|e: toml::de::Error| without_values(&e.to_string()))
    }

    /// Loads a config file, or the embedded default when `path` is `None`, then the
    /// `CONCERTIM_BILLING_*` environment overrides (`CONCERTIM_BILLING_CONFIG` itself excepted).
    ///
    /// # Errors
    /// As [`Settings::from_toml`], or when the file cannot be read.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(path) => (
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?,
                path.display().to_string(),
            ),
            None => (DEFAULT_TOML.to_owned(), "(embedded default)".to_owned()),
        };
        Self::layered(&text, &origin, env_overrides(std::env::vars()))
    }

    /// What is valid but probably not meant: no billed meter at all, or a meter Ceilometer
    /// emits under no such name (`vcpu` for `vcpus`), either of which bills no usage. `config
    /// check` prints them and `run` logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        let meters = &self.billing.meters;
        if meters.is_empty() {
            return vec![format!(
                "billing.meters is empty: no usage is billed at all (Ceilometer's instance meters: {})",
                INSTANCE_METERS.join(", ")
            )];
        }
        meters
            .keys()
            .filter(|m| !is_ceilometer_meter(m))
            .map(|m| {
                format!(
                    "billing.meters.\"{m}\": Ceilometer emits no meter by that name, so it bills nothing (its instance meters: {})",
                    INSTANCE_METERS.join(", ")
                )
            })
            .collect()
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }

    fn validate(&self) -> Result<(), String> {
        if self.billing.backend == BackendKind::Killbill {
            let Some(kb) = &self.killbill else {
                return Err("billing.backend = \"killbill\" needs a [killbill] section (url, username, password, api_key, api_secret)".into());
            };
            if !(kb.url.starts_with("http://") || kb.url.starts_with("https://")) {
                return Err(format!("killbill.url {:?} must start with http:// or https://", kb.url));
            }
        }
        if self.billing.backend == BackendKind::Hostbill {
            let hb = self.hostbill.clone().unwrap_or_default();
            let mut missing = Vec::new();
            if hb.url.is_none() {
                missing.push("hostbill.url (e.g. \"https://billing.example\")".to_owned());
            }
            if hb.api_id.is_none() {
                missing.push("hostbill.api_id".to_owned());
            }
            if hb.api_key.is_none() {
                missing.push("hostbill.api_key (or CONCERTIM_BILLING_HOSTBILL__API_KEY)".to_owned());
            }
            let plans = std::iter::once(&self.billing.default_plan).chain(self.billing.plans.values());
            for plan in plans {
                if !hb.products.contains_key(plan.as_str()) && !missing.iter().any(|m| m.contains(plan.as_str())) {
                    missing.push(format!("hostbill.products.\"{plan}\" (the HostBill product id for plan {plan})"));
                }
            }
            if !missing.is_empty() {
                return Err(format!("billing.backend = \"hostbill\" needs: {}", missing.join(", ")));
            }
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "http.listen {:?} is not an address such as 127.0.0.1:9464 (empty disables it)",
                self.http.listen
            ));
        }
        let bus = &self.bus;
        if !(bus.url.expose().starts_with("amqp://") || bus.url.expose().starts_with("amqps://")) {
            return Err(format!("bus.url {} must start with amqp:// or amqps://", bus.url));
        }
        if bus.lanes == 0 || bus.lanes > 1024 {
            return Err(format!("bus.lanes is {}: it must be between 1 and 1024", bus.lanes));
        }
        if bus.prefetch == 0 {
            return Err("bus.prefetch must be at least 1 (0 would mean unlimited)".into());
        }
        if bus.max_attempts == 0 {
            return Err("bus.max_attempts must be at least 1".into());
        }
        if bus.shards > 256 {
            return Err(format!("bus.shards is {}: it must be between 0 (off) and 256", bus.shards));
        }
        if bus.shards > 0 && bus.intake_standby_ms == 0 {
            return Err("bus.intake_standby_ms must be at least 1 when bus.shards is set".into());
        }
        if bus.shards > 0 && bus.intake_takeover_ms < bus.intake_standby_ms {
            return Err("bus.intake_takeover_ms must be at least bus.intake_standby_ms".into());
        }
        if bus.delivery_limit == 0 {
            return Err("bus.delivery_limit must be at least 1".into());
        }
        if bus.queue.is_empty() || bus.bindings.iter().any(|b| b.exchange.is_empty()) {
            return Err("bus.queue and every bus.bindings exchange must be non-empty".into());
        }
        // OpenStack's publishers declare a queue named after each routing key; consuming from
        // it would steal the notifications Ceilometer reads there.
        if bus.bindings.iter().any(|b| format!("{}{}", bus.prefix, bus.queue) == b.routing_key) {
            return Err("bus.queue must not be OpenStack's own notifications queue: consuming it steals messages from Ceilometer".into());
        }
        if let Some(c) = &self.concertim {
            c.validate()?;
        }
        if self.decode.max_body_bytes == 0 {
            return Err("decode.max_body_bytes must be at least 1".into());
        }
        if let Some(p) = self.projects.include.iter().find(|p| self.projects.exclude.contains(p)) {
            return Err(format!("project {p} is both in projects.include and projects.exclude"));
        }
        Ok(())
    }
}

impl ConcertimSettings {
    fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("concertim.url {:?} must start with http:// or https://", self.url));
        }
        if self.lanes == 0 || self.lanes > 1024 {
            return Err(format!("concertim.lanes is {}: it must be between 1 and 1024", self.lanes));
        }
        if self.max_attempts == 0 {
            return Err("concertim.max_attempts must be at least 1".into());
        }
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

/// The overrides found in the environment: `CONCERTIM_BILLING_BUS__URL=…` → `(["bus","url"], …)`.
pub fn env_overrides(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(Vec<String>, String)> {
    vars.into_iter()
        .filter_map(|(key, value)| {
            let rest = key.strip_prefix(ENV_PREFIX)?;
            // CONFIG, AMQP_URL and LOG_FORMAT are the command line's own variables.
            (!matches!(rest, "CONFIG" | "AMQP_URL" | "LOG_FORMAT") && !rest.is_empty() && !rest.starts_with("REQUIRE_"))
                .then(|| (rest.split("__").map(str::to_ascii_lowercase).collect(), value))
        })
        .collect()
}

/// The keys whose value may come from a file instead (`password_file = "/run/secrets/kb"`):
/// the secrets, and the broker URL, which carries its password.
const SECRET_FILE_KEYS: [&str; 4] = ["password", "api_secret", "api_key", "url"];

/// Replaces every `<secret>_file` key (at any level) with `<secret>` read from that file, its
/// trailing newline dropped, as design §4 asks of every secret. Errors name the key and the
/// file, never the contents.
fn read_secret_files(table: &mut toml::Table, at: &str) -> Result<(), String> {
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let path = if at.is_empty() { key.clone() } else { format!("{at}.{key}") };
        if let Some(toml::Value::Table(inner)) = table.get_mut(&key) {
            read_secret_files(inner, &path)?;
            continue;
        }
        let Some(base) = key.strip_suffix("_file").filter(|b| SECRET_FILE_KEYS.contains(b)) else { continue };
        let Some(toml::Value::String(file)) = table.get(&key).cloned() else {
            return Err(format!("{path} must be the path of a file"));
        };
        if table.contains_key(base) {
            return Err(format!("{path} and {} are both set: keep one", path.trim_end_matches("_file")));
        }
        private_enough(&file).map_err(|e| format!("{path}: {e}"))?;
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{path}: cannot read {file}: {e}"))?;
        table.remove(&key);
        table.insert(base.to_owned(), toml::Value::String(text.trim_end_matches(['\n', '\r']).to_owned()));
    }
    Ok(())
}

/// The meters Ceilometer emits per instance, which the default configuration bills.
const INSTANCE_METERS: [&str; 6] = ["vcpus", "memory", "disk.root.size", "disk.ephemeral.size", "instance", "cpu"];

/// Whether Ceilometer emits a meter by this name: one of its instance meters, or one of its
/// meter families (`network.*`, `volume.*`, …).
fn is_ceilometer_meter(name: &str) -> bool {
    const OTHERS: [&str; 6] = ["bandwidth", "ip.floating", "memory.usage", "memory.resident", "cpu_l3_cache", "port"];
    const FAMILIES: [&str; 13] = [
        "disk.",
        "network.",
        "volume.",
        "snapshot.",
        "image.",
        "storage.",
        "memory.",
        "hardware.",
        "ip.",
        "port.",
        "switch.",
        "compute.node.",
        "backup.",
    ];
    INSTANCE_METERS.contains(&name) || OTHERS.contains(&name) || FAMILIES.iter().any(|f| name.starts_with(f))
}

/// The keys whose override is always a string, whatever it looks like: a numeric password
/// stays a password (and is never shown back in a type error).
const LITERAL_KEYS: [&str; 9] =
    ["password", "api_secret", "api_key", "url", "username", "api_id", "token", "created_by", "prefix"];

/// An environment override as a TOML value: literally a string for secrets and for keys the
/// file already holds a string in; otherwise a bare TOML value (number, boolean, array, inline
/// table) when it parses as one.
/// Refuses a secret file others may read or anyone may change (a mode beyond `0640`).
fn private_enough(file: &str) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode =
            std::fs::metadata(file).map_err(|e| format!("cannot read {file}: {e}"))?.permissions().mode() & 0o777;
        if mode & !0o640 != 0 {
            return Err(format!(
                "{file} has mode {mode:04o}: a secret file must not be readable by others or writable by its group; \
                 chmod 0600 it (Kubernetes: defaultMode: 0440 on the Secret volume, with fsGroup)"
            ));
        }
    }
    Ok(())
}

fn override_value(table: &toml::Table, path: &[String], text: &str) -> toml::Value {
    let literal = path.last().is_some_and(|key| LITERAL_KEYS.contains(&key.as_str()) || key.ends_with("_file"))
        || matches!(get_path(table, path), Some(toml::Value::String(_)));
    if literal {
        return toml::Value::String(text.to_owned());
    }
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

fn get_path<'t>(table: &'t toml::Table, path: &[String]) -> Option<&'t toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut current = table;
    for key in parents {
        current = current.get(key)?.as_table()?;
    }
    current.get(last)
}

/// The environment variable that sets `path`.
fn env_name(path: &[String]) -> String {
    format!("{ENV_PREFIX}{} (environment)", path.join("__").to_ascii_uppercase())
}

/// A deserializer's message without the value it quotes: ``invalid type: integer `83750291`,
/// expected a string`` becomes `invalid type: integer, expected a string` (the value may be a
/// secret; the key is named after it).
fn without_values(message: &str) -> String {
    let message = message.trim_end();
    let Some(rest) = ["invalid type: ", "invalid value: ", "invalid length "]
        .iter()
        .find_map(|p| message.strip_prefix(p).map(|rest| (p, rest)))
    else {
        return message.replace('\n', " ");
    };
    let (prefix, rest) = rest;
    let (quoted, tail) = rest.split_once(", expected").unwrap_or((rest, ""));
    // Values are quoted with backticks (numbers) or double quotes (strings).
    let mut kept = String::new();
    let mut quote = None;
    for c in quoted.chars() {
        match (quote, c) {
            (None, '`' | '"') => quote = Some(c),
            (None, c) => kept.push(c),
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
    }
    let kept = kept.split_whitespace().collect::<Vec<_>>().join(" ");
    let tail = if tail.is_empty() { String::new() } else { format!(", expected{tail}") };
    format!("{prefix}{kept}{tail}").replace('\n', " ")
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut current = table;
    for key in parents {
        let entry = current.entry(key.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        current = entry.as_table_mut().expect("just made a table");
    }
    current.insert(last.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_that_bills_no_usage_is_warned_about() {
        assert!(Settings::embedded().warnings().is_empty(), "{:?}", Settings::embedded().warnings());
        let empty = DEFAULT_TOML.split("\n[billing.meters").next().unwrap().to_owned()
            + &DEFAULT_TOML[DEFAULT_TOML.find("\n[projects]").unwrap()..];
        let settings = Settings::from_toml(&empty, "t").unwrap();
        assert!(settings.billing.meters.is_empty());
        assert!(settings.warnings()[0].contains("billing.meters is empty"), "{:?}", settings.warnings());
        let typo = DEFAULT_TOML.replace("[billing.meters.vcpus]", "[billing.meters.vcpu]");
        let warnings = Settings::from_toml(&typo, "t").unwrap().warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("billing.meters.\"vcpu\""), "{warnings:?}");
    }

    fn with_env(file: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let vars = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        Settings::layered(file, "kb.toml", env_overrides(vars))
    }

    fn kb_file() -> String {
        format!("{DEFAULT_TOML}\n{KB_SECTION}").replace("backend = \"ledger\"", "backend = \"killbill\"")
    }

    const KB_SECTION: &str = "[killbill]\nurl = \"http://127.0.0.1:18080\"\nusername = \"admin\"\npassword = \"p\"\napi_key = \"k\"\napi_secret = \"s\"\n";

    #[test]
    fn secrets_from_the_environment_are_taken_literally_whatever_they_look_like() {
        for secret in ["83750291", "3.14159e7", "0xDEADBEEF", "\"Quoted-Pass\"", "true", "[1]"] {
            let settings = with_env(
                &kb_file(),
                &[("CONCERTIM_BILLING_KILLBILL__PASSWORD", secret), ("CONCERTIM_BILLING_KILLBILL__API_SECRET", secret)],
            )
            .unwrap();
            let kb = settings.killbill.unwrap();
            assert_eq!(kb.password.expose(), secret);
            assert_eq!(kb.api_secret.expose(), secret);
        }
    }

    #[test]
    fn a_wrong_value_from_the_environment_is_blamed_on_its_variable_and_never_echoed() {
        let err = with_env(&kb_file(), &[("CONCERTIM_BILLING_BUS__LANES", "\"Sekr1tLanes\"")]).unwrap_err().to_string();
        assert!(err.contains("CONCERTIM_BILLING_BUS__LANES (environment)"), "{err}");
        assert!(!err.contains("Sekr1tLanes") && !err.contains("kb.toml"), "{err}");
        let err = with_env(&kb_file(), &[("CONCERTIM_BILLING_BUS__PREFETCH", "98765.5")]).unwrap_err().to_string();
        assert!(err.contains("CONCERTIM_BILLING_BUS__PREFETCH") && !err.contains("98765"), "{err}");
    }

    #[test]
    fn a_wrong_value_in_the_file_is_named_by_its_key_without_the_value() {
        let err = Settings::from_toml(&kb_file().replace("password = \"p\"", "password = 83750291"), "kb.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kb.toml") && err.contains("killbill.password") && !err.contains("83750291"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_file_others_can_read_is_refused_saying_how_to_fix_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kb-password");
        std::fs::write(&file, "FromTheFile\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = kb_file().replace("password = \"p\"", &format!("password_file = {:?}", file.display().to_string()));
        let err = Settings::from_toml(&text, "kb.toml").unwrap_err().to_string();
        assert!(err.contains("killbill.password_file") && err.contains("0644") && err.contains("chmod 0600"), "{err}");
        assert!(!err.contains("FromTheFile"), "{err}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let kb = Settings::from_toml(&text, "kb.toml").unwrap().killbill.unwrap();
        assert_eq!(kb.password.expose(), "FromTheFile");
    }

    #[test]
    fn a_hostbill_backend_names_every_missing_setting() {
        let text = format!("{DEFAULT_TOML}\n[hostbill]\napi_id = \"x\"\n")
            .replace("backend = \"ledger\"", "backend = \"hostbill\"");
        let err = Settings::from_toml(&text, "t.toml").unwrap_err().to_string();
        for missing in ["hostbill.url", "hostbill.api_key", "hostbill.products.\"openstack-standard-monthly\""] {
            assert!(err.contains(missing), "{missing}: {err}");
        }
        assert!(!err.contains("hostbill.api_id"), "{err}");
    }

    #[test]
    fn environment_overrides_reach_nested_keys_with_their_types() {
        let vars = [
            ("CONCERTIM_BILLING_BUS__URL".to_owned(), "amqp://u:p@h:5672/v".to_owned()),
            ("CONCERTIM_BILLING_BUS__LANES".to_owned(), "3".to_owned()),
            ("CONCERTIM_BILLING_BUS__PREFIX".to_owned(), "test-".to_owned()),
            ("CONCERTIM_BILLING_CONFIG".to_owned(), "ignored.toml".to_owned()),
            ("OTHER".to_owned(), "x".to_owned()),
        ];
        let s = Settings::layered(DEFAULT_TOML, "t", env_overrides(vars)).unwrap();
        assert_eq!(s.bus.url.expose(), "amqp://u:p@h:5672/v");
        assert_eq!(s.bus.lanes, 3);
        assert_eq!(s.bus.prefix, "test-");
    }

    #[test]
    fn a_secret_can_come_from_a_file_and_its_errors_never_show_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kb-password");
        std::fs::write(&file, "Fr0m-A-File\n").unwrap();
        #[cfg(unix)]
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let section = |extra: &str| {
            format!(
                "{DEFAULT_TOML}\n[killbill]\nurl = \"http://kb\"\nusername = \"admin\"\napi_key = \"k\"\napi_secret = \"s\"\n{extra}\n"
            )
        };
        let text = section(&format!("password_file = \"{}\"", file.display()));
        let settings = Settings::from_toml(&text, "t").unwrap();
        assert_eq!(settings.killbill.as_ref().unwrap().password.expose(), "Fr0m-A-File");
        assert!(!settings.to_toml().contains("Fr0m-A-File"));
        // From the environment as well.
        let text = section("password = \"x\"");
        let env = [(vec!["bus".to_owned(), "url_file".to_owned()], file.display().to_string())];
        let error = Settings::layered(&text, "t", env.clone()).unwrap_err().to_string();
        assert!(error.contains("bus.url_file and bus.url are both set"), "{error}");
        let missing = section("password_file = \"/nonexistent/kb\"");
        let error = Settings::from_toml(&missing, "t").unwrap_err().to_string();
        assert!(error.contains("killbill.password_file: cannot read /nonexistent/kb"), "{error}");
    }

    #[test]
    fn a_password_with_slashes_colons_or_at_signs_never_shows() {
        for (url, shown) in [
            ("amqp://billing:Ab/cd+ef/gh==@rabbit:5672/%2f", "amqp://billing:***@rabbit:5672/%2f"),
            ("amqp://billing:p:a@ss@rabbit:5672/", "amqp://billing:***@rabbit:5672/"),
            ("amqp://rabbit:5672/", "amqp://rabbit:5672/"),
            ("billing:S3cret/x@rabbit:5672", "(not a URL: ***@rabbit:5672)"),
            ("billing:S3cret", "(not a URL)"),
        ] {
            let redacted = SecretUrl::new(url).redacted();
            assert_eq!(redacted, shown, "{url}");
            assert!(!redacted.contains("S3cret") && !redacted.contains("gh=="));
        }
    }

    #[test]
    fn passwords_never_show_in_debug_display_or_config_check() {
        let url = SecretUrl::new("amqps://billing:s3cret@rabbit.example:5671/openstack");
        for shown in [format!("{url:?}"), url.to_string()] {
            assert!(
                !shown.contains("s3cret") && shown.contains("billing:***@rabbit.example:5671/openstack"),
                "{shown}"
            );
        }
        let mut s = Settings::embedded();
        s.bus.url = url;
        assert!(!s.to_toml().contains("s3cret"));
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn the_effective_config_prints_as_toml_that_loads_again() {
        let s = Settings::embedded();
        let again = Settings::from_toml(&s.to_toml(), "printed").unwrap();
        assert_eq!(again.bus.queue, "concertim-billing");
        assert_eq!(again.billing.meters["memory"].factor.to_string(), "10/1024");
    }

    #[test]
    fn a_bus_rule_violation_names_the_key() {
        let err = Settings::layered(DEFAULT_TOML, "t", [(vec!["bus".into(), "lanes".into()], "0".into())]).unwrap_err();
        assert!(err.to_string().contains("bus.lanes"), "{err}");
        let err =
            Settings::layered(DEFAULT_TOML, "t", [(vec!["bus".into(), "url".into()], "http://x".into())]).unwrap_err();
        assert!(err.to_string().contains("amqp://"), "{err}");
    }

    #[test]
    fn the_embedded_default_is_valid_and_bills_the_instance_meters() {
        let s = Settings::embedded();
        assert_eq!(s.billing.default_plan.as_str(), "openstack-standard-monthly");
        for meter in ["vcpus", "memory", "disk.root.size", "instance"] {
            assert!(s.billing.meters.contains_key(meter), "{meter}");
        }
    }

    #[test]
    fn the_commented_concertim_example_loads_once_uncommented() {
        let start = DEFAULT_TOML.find("# [concertim]").unwrap();
        let example: String = DEFAULT_TOML[start..]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .map(|l| format!("{l}\n"))
            .collect();
        let s = Settings::from_toml(&format!("{}\n{example}", &DEFAULT_TOML[..start]), "t").unwrap();
        let c = s.concertim.unwrap();
        assert_eq!((c.metrics["cpu_util"].name.as_str(), c.metrics["cpu_util"].kind.as_str()), ("cpu_load", "double"));
        assert_eq!(c.max_attempts, 20);
        let bad = format!(
            "{}\n{}",
            &DEFAULT_TOML[..start],
            example.replace("units = \"%\"", "units = \"%\"\nslope = \"up\"")
        );
        assert!(Settings::from_toml(&bad, "t")
            .unwrap_err()
            .to_string()
            .contains("concertim.metrics.\"cpu_util\".slope"));
    }

    #[test]
    fn ratio_factors_stay_exact_until_rounding() {
        let sixth: Factor = "1/6".parse().unwrap();
        assert_eq!(sixth.apply(Decimal::from(6)).unwrap(), Decimal::ONE);
        assert_eq!(sixth.apply(Decimal::ONE).unwrap().to_string(), "0.166666667");
        let mb: Factor = "1/6144".parse().unwrap();
        assert_eq!(mb.apply(Decimal::from(6144)).unwrap(), Decimal::ONE);
    }

    #[test]
    fn bad_factors_are_rejected_with_the_reason() {
        for (text, reason) in [("1/0", "divides by zero"), ("-1", "negative"), ("x", "not a number")] {
            let err = text.parse::<Factor>().unwrap_err();
            assert!(err.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_naming_the_key() {
        let err = Settings::from_toml("[billing]\ndefault_plan = \"p\"\nplann = 1\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("plann"), "{err}");
    }

    #[test]
    fn the_plan_of_an_unlisted_flavor_is_the_default_plan() {
        let s = Settings::from_toml(
            "[billing]\ndefault_plan = \"std\"\n[billing.plans]\n\"m1.large\" = \"large\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(s.billing.plan_for(Some("m1.large")).as_str(), "large");
        assert_eq!(s.billing.plan_for(Some("m1.tiny")).as_str(), "std");
        assert_eq!(s.billing.plan_for(None).as_str(), "std");
    }

    #[test]
    fn exclude_wins_over_include_and_an_empty_include_admits_all() {
        let a = ProjectId::parse("a").unwrap();
        let b = ProjectId::parse("b").unwrap();
        assert!(ProjectFilter::default().admits(&a));
        let f = ProjectFilter { include: vec![], exclude: vec![b.clone()] };
        assert!(f.admits(&a) && !f.admits(&b));
        let f = ProjectFilter { include: vec![a.clone()], exclude: vec![] };
        assert!(f.admits(&a) && !f.admits(&b));
    }
}

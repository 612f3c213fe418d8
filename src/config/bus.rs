//! `[bus]`, `[http]` and `[decode]`: the broker, the listener, the decoder's limits.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;

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
    /// TLS beyond the system roots (`amqps://` only): a private CA, a client certificate.
    #[serde(default)]
    pub tls: BusTls,
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
    /// Settled deliveries acknowledged together, with one `multiple` ack of the prefix that is
    /// settled (never a delivery still in flight). 1 acknowledges each message on its own; a
    /// batch over `prefetch` is `prefetch` (the broker hands over no more at once).
    pub ack_batch: usize,
    /// The longest a settled delivery waits for its acknowledgement (ms), when fewer than
    /// `ack_batch` are waiting. A crash in between only redelivers it (billing is idempotent).
    pub ack_delay_ms: u64,
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
            tls: BusTls::default(),
            prefix: String::new(),
            queue: "concertim-billing".to_owned(),
            bindings: vec![
                binding("nova", "notifications.info"),
                binding("keystone", "notifications.info"),
                binding("ceilometer", "metering.sample"),
                binding("heat", "notifications.info"),
                binding("cinder", "notifications.info"),
                binding("neutron", "notifications.info"),
                binding("glance", "notifications.info"),
            ],
            upstream_durable: false,
            prefetch: 256,
            lanes: 32,
            ack_batch: 64,
            ack_delay_ms: 5,
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

/// `[bus.tls]`: how an `amqps://` broker is verified, and how this service proves itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BusTls {
    /// PEM file of the CA(s) that sign the broker's certificate, trusted besides the system's
    /// roots (a private CA).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// PEM file of this service's client certificate (chain), for a broker that asks for one.
    #[serde(default)]
    pub cert_file: Option<String>,
    /// PEM file of the client certificate's key (PKCS#8, unencrypted), with `cert_file`.
    #[serde(default)]
    pub key_file: Option<String>,
}

impl BusTls {
    fn validate(&self) -> Result<(), String> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("bus.tls.cert_file and bus.tls.key_file go together: set both, or neither".into());
        }
        Ok(())
    }

    /// Whether anything beyond the system roots is configured.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some()
    }
}

impl HttpSettings {
    pub(super) fn validate(&self) -> Result<(), String> {
        if !self.listen.is_empty() && self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "http.listen {:?} is not an address such as 127.0.0.1:9464 (empty disables it)",
                self.listen
            ));
        }
        Ok(())
    }
}

impl DecodeLimits {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.max_body_bytes == 0 {
            return Err("decode.max_body_bytes must be at least 1".into());
        }
        Ok(())
    }
}

impl BusSettings {
    pub(super) fn validate(&self) -> Result<(), String> {
        let bus = self;
        if !(bus.url.expose().starts_with("amqp://") || bus.url.expose().starts_with("amqps://")) {
            return Err(format!("bus.url {} must start with amqp:// or amqps://", bus.url));
        }
        bus.tls.validate()?;
        if bus.tls.is_set() && !bus.url.expose().starts_with("amqps://") {
            return Err(format!("bus.tls is set, but bus.url {} is not amqps://: TLS would not be used", bus.url));
        }
        if bus.lanes == 0 || bus.lanes > 1024 {
            return Err(format!("bus.lanes is {}: it must be between 1 and 1024", bus.lanes));
        }
        if bus.ack_batch == 0 {
            return Err("bus.ack_batch must be at least 1 (1 acknowledges each message on its own)".into());
        }
        if bus.ack_delay_ms == 0 || bus.ack_delay_ms > 1_000 {
            return Err(format!(
                "bus.ack_delay_ms is {}: it must be between 1 and 1000 (a settled message waits that long for its ack)",
                bus.ack_delay_ms
            ));
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
        Ok(())
    }

    /// The retry queue's delay.
    pub fn retry_delay(&self) -> Duration {
        Duration::from_millis(self.retry_delay_ms)
    }

    /// The shutdown deadline.
    pub fn shutdown_deadline(&self) -> Duration {
        Duration::from_millis(self.shutdown_deadline_ms)
    }

    /// `ack_delay_ms` as a duration.
    pub fn ack_delay(&self) -> Duration {
        Duration::from_millis(self.ack_delay_ms)
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

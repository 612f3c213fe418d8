//! concertim-billing: OpenStack notifications in, billing and Concertim updates out.
//!
//! # Layout
//! One message flows one way: **Delivery → Notification → Event → Plan → Effects → Outcome**.
//!
//! - [`notification`]: bytes → [`event::Notification`] (oslo envelopes, Keystone, Nova,
//!   Ceilometer, Heat); pure, owns every wire format.
//! - [`event`]: the domain events and the value types they are made of.
//! - [`config`]: the typed settings (flavor → plan, meter → unit and factor, project filter).
//! - [`plan`]: event + settings → ordered billing actions (and the facts an event adds to an
//!   instance's timeline); pure.
//! - [`timeline`]: an instance's facts → its segments and the seconds × quantities held in any
//!   window; pure.
//! - [`settle`]: timelines → usage posted once per (instance, period), with corrections and
//!   shortfalls.
//! - [`billing`]: the [`billing::Billing`] trait and its backends (the embedded ledger).
//! - [`store`]: the durable state store (facts, postings, the ledger's rows): a SQLite file, in
//!   memory, or PostgreSQL shared by replicas.
//! - [`concertim`]: event → Concertim updates (pure), their client and worker.
//! - [`keystone`]: the Keystone v3 client (project names, role assignments), the first piece of
//!   the OpenStack API client.
//! - [`executor`]: one delivery → decode → plan → billing → commit → [`executor::Outcome`]
//!   (with its Concertim follow-up).
//! - [`replay`]: fixture files through the executor, and the report; [`fixture`] is the
//!   fixture format (`capture`, `dlq export` and `replay` share it).
//! - [`fields`]: the lenient field readers every wire format uses (OpenStack's, HostBill's).
//! - [`class`]: the failure classes that decide a failed message's fate.
//! - [`bus`]: RabbitMQ: topology, the consumer and its lanes, acknowledgement, publishing.
//! - [`handle`]: the billing and Concertim handlers the bus runs (outcome → verdict, retries in
//!   process).
//! - [`retry`]: every backoff schedule; [`outbound`]: what every outbound HTTP client shares.
//! - [`telemetry`], [`http`]: metrics, health, and `/healthz` `/readyz` `/metrics`.
//! - [`app`]: the service wired once (executor, consumers, listener), as `run` starts it.
//! - [`dlq`], [`capture`]: operator tools over the dead-letter queue and the live bus;
//!   [`redact`] keeps credentials out of what they print and write.

pub mod api;
pub mod app;
pub mod billing;
pub mod bus;
pub mod capture;
pub mod class;
pub mod concertim;
pub mod config;
pub mod dlq;
pub mod event;
pub mod executor;
pub mod fields;
pub mod fixture;
pub mod handle;
pub mod http;
pub mod keystone;
pub mod notification;
pub mod outbound;
pub mod plan;
pub mod price;
pub mod redact;
pub mod replay;
pub mod retry;
pub mod settle;
pub mod store;
pub mod telemetry;
pub mod timeline;

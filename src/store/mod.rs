//! The durable state store: instance lifecycle facts, what settlement posted for each billing
//! period, shortfalls, closed projects, and the embedded ledger's rows.
//!
//! One implementation over `sqlx`'s `Any` driver serves three places: an embedded SQLite file (the
//! default), PostgreSQL (when several replicas share the state) and an in-memory SQLite database
//! (`replay`). The SQL is the dialect both speak: `$n` placeholders, `BIGINT` and `TEXT` columns,
//! `INSERT … ON CONFLICT`, no `RETURNING`. Every write that must not interleave with another is
//! one statement or one transaction, so two replicas on one PostgreSQL database cannot both win
//! a claim or both bump a version.
//!
//! The store knows nothing of events, plans or billing backends: ids are strings the caller has
//! validated, facts and amounts are opaque text, and times are unix seconds.

mod connect;
mod error;
mod ledger;
mod location;
mod postings;
mod resources;
mod schema;
#[cfg(test)]
pub(crate) mod testing;

pub use connect::{Counts, Store};
pub use error::StoreError;
pub use postings::{Claim, Posting, PostingState, Shortfall};
pub use resources::Resource;

//! Invoices are the proof: instance lives replayed into the real KillBill, its test clock moved
//! past the account's billing day, and every invoice's usage items compared with what was used,
//! at the catalog's prices.
//!
//! A target of its own because KillBill's test clock is one for the whole server: cargo runs
//! test targets one after another, so no other test meets the moved clock. Within the target the
//! tests take [`helpers::CLOCK`] in turn, and each puts the clock back to the real time.

#[path = "../support/mod.rs"]
mod support;

mod api;
mod fixtures;
mod helpers;
mod month;
mod resources;

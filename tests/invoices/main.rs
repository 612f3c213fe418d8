//! Invoices are the proof: the fixture lifecycles replayed into the real KillBill, its test
//! clock moved past every account's billing day, and every invoice's usage items compared with
//! what the embedded ledger says was used, and with what that costs at the catalog's prices.
//!
//! A target of its own because KillBill's test clock is one for the whole server: cargo runs
//! test targets one after another, so no other test meets the moved clock. Within the target the
//! tests take [`CLOCK`] in turn, and each puts the clock back to the real time.

#[path = "../support/mod.rs"]
mod support;

mod fixtures;

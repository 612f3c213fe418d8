//! Integration tests: one binary, one module per feature.

#[path = "../support/mod.rs"]
mod support;

mod api;
mod bus;
mod catalog;
mod concertim;
mod config;
mod conformance;
mod conformance_kinds;
mod deploy;
mod dlq;
mod hostbill;
mod http;
mod keystone;
mod killbill;
mod killbill_differential;
mod oslo;
mod outbound;
mod properties;
mod replay;
mod scope;
mod shard;

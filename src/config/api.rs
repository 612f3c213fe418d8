//! `[api]`: the billing API Concertim and its cluster builder call (credits, invoices, orders).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::Secret;

/// The billing API: the Python service's billing routes, on a listener of their own.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Address to serve the API on (the Python service used port 42356); empty (the default)
    /// serves none.
    pub listen: String,
    /// The secret Concertim signs its tokens with (HS256; Concertim's `JWT_SECRET`). Set it from
    /// a file with `jwt_secret_file`. Required when `listen` is set.
    pub jwt_secret: Option<Secret>,
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// The KillBill plan an order's subscription is on: one that prices nothing by itself (the
    /// cluster's resources are billed on their own subscriptions).
    pub order_plan: String,
    /// The largest deposit `/credits` accepts in one request.
    pub max_deposit: Decimal,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            listen: String::new(),
            jwt_secret: None,
            max_body_bytes: 64 * 1024,
            order_plan: "openstack-standard-monthly".to_owned(),
            max_deposit: Decimal::from(1_000_000),
        }
    }
}

/// The shortest shared secret accepted: HS256 with a guessable key is no check at all.
pub const MIN_SECRET_BYTES: usize = 16;

impl ApiSettings {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.listen.is_empty() {
            return Ok(());
        }
        match &self.jwt_secret {
            None => Err("api.listen is set, but api.jwt_secret (or api.jwt_secret_file) is not: set it to Concertim's JWT_SECRET".into()),
            Some(s) if s.expose().len() < MIN_SECRET_BYTES => Err(format!(
                "api.jwt_secret is shorter than {MIN_SECRET_BYTES} bytes: use Concertim's JWT_SECRET (Rails generates 128 hex digits)"
            )),
            Some(_) if self.max_body_bytes < 1024 => Err("api.max_body_bytes must be at least 1024".into()),
            Some(_) if self.max_deposit <= Decimal::ZERO => Err("api.max_deposit must be positive".into()),
            Some(_) => Ok(()),
        }
    }
}

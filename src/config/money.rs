//! Exact factors and the scale of a usage amount.

use std::{fmt, str::FromStr};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

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

//! Lenient readers for payload fields whose type varies across releases: legacy Nova writes `""`
//! or `"None"` for unset numbers, old captures quote numbers, and Ceilometer volumes may be
//! integers or floats. Each reader accepts the forms seen upstream and rejects the rest.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{de, Deserialize, Deserializer};

/// A number that may arrive as a JSON number, a numeric string, `""`, `"None"` or `null`.
///
/// Read with a visitor rather than `#[serde(untagged)]`, which buffers every value before trying
/// each variant: these readers run for most payload fields, so that cost dominated decoding.
enum Loose<'a> {
    Int(u64),
    NegInt(i64),
    Float(f64),
    Text(std::borrow::Cow<'a, str>),
    Null,
}

impl<'de> Deserialize<'de> for Loose<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = Loose<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number, a string or null")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Loose::Int(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(u64::try_from(v).map_or(Loose::NegInt(v), Loose::Int))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Loose::Float(v))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Loose::Text(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Loose::Text(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Loose::Text(std::borrow::Cow::Owned(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Loose::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Loose::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                Loose::deserialize(d)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Reads an optional non-negative integer (vCPUs, MiB, GiB).
pub(crate) fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Loose::deserialize(d)? {
        Loose::Int(n) => Ok(Some(n)),
        // Whole floats such as 512.0 appear in some captures; fractions are not sizes.
        Loose::Float(f) if f >= 0.0 && f.fract() == 0.0 && f < 1e15 => Ok(Some(f as u64)),
        Loose::Float(f) => Err(de::Error::custom(format!("{f} is not a whole size"))),
        Loose::Text(t) => match t.trim() {
            "" | "None" => Ok(None),
            t => t.parse().map(Some).map_err(|_| de::Error::custom(format!("{t:?} is not a whole number"))),
        },
        Loose::NegInt(n) => Err(de::Error::custom(format!("{n} is not a size"))),
        Loose::Null => Ok(None),
    }
}

/// Reads an optional `u32` (vCPUs).
pub(crate) fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    opt_u64(d)?.map(|n| u32::try_from(n).map_err(|_| de::Error::custom(format!("{n} is too large")))).transpose()
}

/// Reads a measured volume exactly: the shortest text form of the number is parsed as a decimal,
/// so `10.839122` stays `10.839122` instead of picking up binary floating-point noise.
pub(crate) fn volume<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    let text = match Loose::deserialize(d)? {
        Loose::Int(n) => return Ok(Some(Decimal::from(n))),
        Loose::NegInt(n) => return Ok(Some(Decimal::from(n))),
        Loose::Float(f) => f.to_string(),
        Loose::Text(t) if t.trim().is_empty() => return Ok(None),
        Loose::Text(t) => t.trim().to_owned(),
        Loose::Null => return Ok(None),
    };
    Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .map(Some)
        .map_err(|_| de::Error::custom(format!("volume {text:?} is not a decimal number in range")))
}

/// Reads a string that may arrive as a number (HostBill ids); absent or null is an error.
pub(crate) fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    opt_text(d)?.ok_or_else(|| de::Error::custom("expected a string or a number, found null"))
}

/// Reads an optional string that older releases sometimes send as a number (ids, flavor ids).
pub(crate) fn opt_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Loose::deserialize(d)? {
        Loose::Int(n) => Some(n.to_string()),
        Loose::NegInt(n) => Some(n.to_string()),
        Loose::Float(f) => Some(f.to_string()),
        Loose::Text(t) => Some(t.into_owned()),
        Loose::Null => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        #[serde(default, deserialize_with = "opt_u64")]
        n: Option<u64>,
        #[serde(default, deserialize_with = "volume")]
        v: Option<Decimal>,
    }

    #[test]
    fn loose_numbers_accept_upstream_forms() {
        for (json, n) in [
            (r#"{"n":5}"#, Some(5)),
            (r#"{"n":"5"}"#, Some(5)),
            (r#"{"n":""}"#, None),
            (r#"{"n":null}"#, None),
            (r#"{"n":512.0}"#, Some(512)),
            (r#"{}"#, None),
        ] {
            assert_eq!(serde_json::from_str::<T>(json).unwrap().n, n, "{json}");
        }
        assert!(serde_json::from_str::<T>(r#"{"n":"five"}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"n":-1}"#).is_err());
    }

    #[test]
    fn volumes_keep_their_decimal_text() {
        let t: T = serde_json::from_str(r#"{"v":10.839122}"#).unwrap();
        assert_eq!(t.v.unwrap().to_string(), "10.839122");
        let t: T = serde_json::from_str(r#"{"v":1e-7}"#).unwrap();
        assert_eq!(t.v.unwrap(), Decimal::from_str("0.0000001").unwrap());
        assert!(serde_json::from_str::<T>(r#"{"v":1e300}"#).is_err());
    }
}

//! Bootstrap: the tenant and the catalog, and what a catalog declares.

use super::client::{CATALOG_INVALID_FOR_TENANT, TENANT_ALREADY_EXISTS};
use super::KillBill;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;

use crate::billing::BillingError;
use crate::config::BillingSettings;
use crate::event::{PlanName, Timestamp};

pub use crate::price::CATALOG_XML;

/// What `bootstrap` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bootstrapped {
    /// The tenant was created (false: it existed).
    pub tenant_created: bool,
    /// The catalog was uploaded (false: this version was there already).
    pub catalog_uploaded: bool,
}

impl KillBill {
    /// Creates the tenant when absent, then uploads `catalog_xml` unless a catalog with its
    /// `effectiveDate` is already there. Safe to repeat. KillBill keeps every version it is
    /// given, so a server holding only older versions gets this one added beside them.
    ///
    /// # Errors
    /// When KillBill refuses or cannot be reached.
    pub async fn bootstrap(&self, catalog_xml: &str, created_by: &str) -> Result<Bootstrapped, BillingError> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct NewTenant<'a> {
            api_key: &'a str,
            api_secret: &'a str,
        }
        let base = self.settings.url.trim_end_matches('/');
        let auth = |request: RequestBuilder| {
            request
                .basic_auth(&self.settings.username, Some(self.settings.password.expose()))
                .header("X-Killbill-CreatedBy", created_by)
        };
        // Tenant calls take basic auth only: the tenant headers do not exist yet. The tenant is
        // created outright, 409/20000 meaning it exists: a look-up first would not do, since
        // KillBill answers an unknown apiKey with a 500 (its tenant cache finds nothing).
        let what = "create the tenant";
        let body = NewTenant { api_key: &self.settings.api_key, api_secret: self.settings.api_secret.expose() };
        let answer = self.send(what, auth(self.http.post(format!("{base}/1.0/kb/tenants"))).json(&body)).await?;
        let tenant_created = match answer.status {
            StatusCode::CREATED => true,
            StatusCode::CONFLICT if answer.code() == Some(TENANT_ALREADY_EXISTS) => false,
            _ => return Err(Self::refused(what, &answer)),
        };
        let effective = catalog_effective_dates(catalog_xml).into_iter().next().ok_or_else(|| {
            BillingError::Protocol { what: "read the catalog".into(), detail: "no <effectiveDate>".into() }
        })?;
        let what = "read the catalog";
        let answer = self
            .send(what, self.request(Method::GET, "/1.0/kb/catalog/xml", None).header("Accept", "text/xml"))
            .await?;
        // KillBill answers its own rendering of every version (JAXB, `…T00:00:00Z`), not the
        // text that was uploaded: versions are compared as instants.
        if answer.status == StatusCode::OK && catalog_effective_dates(&answer.body).contains(&effective) {
            return Ok(Bootstrapped { tenant_created, catalog_uploaded: false });
        }
        let what = "upload the catalog";
        let request = self
            .request(Method::POST, "/1.0/kb/catalog/xml", None)
            .header("X-Killbill-CreatedBy", created_by)
            .header("Content-Type", "text/xml")
            .body(catalog_xml.to_owned());
        let answer = self.send(what, request).await?;
        match answer.status {
            StatusCode::CREATED => Ok(Bootstrapped { tenant_created, catalog_uploaded: true }),
            // 2080 is also KillBill's answer to a version whose effectiveDate exists (a concurrent
            // bootstrap uploaded it meanwhile); its message does not say which, so look again.
            StatusCode::BAD_REQUEST if answer.code() == Some(CATALOG_INVALID_FOR_TENANT) => {
                let again = self
                    .send(
                        "read the catalog",
                        self.request(Method::GET, "/1.0/kb/catalog/xml", None).header("Accept", "text/xml"),
                    )
                    .await?;
                if again.status == StatusCode::OK && catalog_effective_dates(&again.body).contains(&effective) {
                    Ok(Bootstrapped { tenant_created, catalog_uploaded: false })
                } else {
                    Err(Self::refused(what, &answer))
                }
            }
            _ => Err(Self::refused(what, &answer)),
        }
    }
}

/// Every `<effectiveDate>` of a catalog document (uploaded form or KillBill's rendering of its
/// versions), as instants.
pub fn catalog_effective_dates(xml: &str) -> Vec<Timestamp> {
    xml.split("<effectiveDate>")
        .skip(1)
        .filter_map(|rest| rest.split("</effectiveDate>").next())
        .filter_map(|text| Timestamp::parse(text.trim()).ok())
        .collect()
}

/// The units and plans named in `wanted` that the catalog does not declare: usage in an
/// unknown unit, or a subscription on an unknown plan, is accepted by KillBill and then never
/// invoiced (units) or refused (plans), so `bootstrap` refuses such a catalog.
pub fn catalog_gaps<'a>(
    xml: &str,
    units: impl IntoIterator<Item = &'a str>,
    plans: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let declared = |tag: &str, name: &str| {
        xml.contains(&format!("<{tag} name=\"{name}\"/>"))
            || xml.contains(&format!("<{tag} name=\"{name}\">"))
            || xml.contains(&format!("<{tag} name=\"{name}\" "))
    };
    let mut gaps: Vec<String> = Vec::new();
    for unit in units {
        if !declared("unit", unit) && !gaps.iter().any(|g| g.ends_with(&format!(" {unit}"))) {
            gaps.push(format!("unit {unit}"));
        }
    }
    for plan in plans {
        if !declared("plan", plan) && !gaps.iter().any(|g| g == &format!("plan {plan}")) {
            gaps.push(format!("plan {plan}"));
        }
    }
    gaps
}

/// The units and plans the configuration bills that the catalog `xml` does not declare
/// ([`catalog_gaps`] of [`BillingSettings::billed_units`] and
/// [`BillingSettings::billed_plans`]): every resource kind's time units and plans, and the
/// metered meters' units.
pub fn configured_gaps(billing: &BillingSettings, xml: &str) -> Vec<String> {
    let units = billing.billed_units();
    catalog_gaps(xml, units.iter().map(String::as_str), billing.billed_plans().into_iter().map(PlanName::as_str))
}

/// Why `killbill bootstrap` did not run.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The configuration has no `[killbill]` section.
    #[error("killbill bootstrap needs a [killbill] section in the config")]
    NotConfigured,
    /// The catalog file cannot be read.
    #[error("cannot read {path}: {source}")]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The catalog lacks units or plans the configuration bills.
    #[error(
        "the catalog{file} does not declare {gaps}, which the configuration bills: add them to the catalog \
         (and bump its effectiveDate) or change [billing.plans]/[billing.resources]/[billing.meters]"
    )]
    Gaps {
        /// ` <path>` of the catalog file, or empty for the built-in one.
        file: String,
        /// The missing units and plans.
        gaps: String,
    },
    /// KillBill refused or could not be reached.
    #[error(transparent)]
    KillBill(#[from] BillingError),
}

/// `killbill bootstrap`: the tenant and the catalog (`catalog`, or [`CATALOG_XML`]) on the
/// configured KillBill, once the catalog is checked against the configuration.
///
/// # Errors
/// As [`BootstrapError`].
pub async fn bootstrap_configured(
    settings: &crate::config::Settings,
    catalog: Option<&std::path::Path>,
) -> Result<Bootstrapped, BootstrapError> {
    let kb = settings.killbill.clone().ok_or(BootstrapError::NotConfigured)?;
    let xml = match catalog {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|source| BootstrapError::Unreadable { path: path.display().to_string(), source })?,
        None => CATALOG_XML.to_owned(),
    };
    // Usage in a unit the catalog lacks is accepted by KillBill and never invoiced; a plan it
    // lacks refuses every subscription. Both are refused here, before anything is sent.
    let gaps = configured_gaps(&settings.billing, &xml);
    if !gaps.is_empty() {
        let file = catalog.map(|p| format!(" {}", p.display())).unwrap_or_default();
        return Err(BootstrapError::Gaps { file, gaps: gaps.join(", ") });
    }
    let created_by = kb.created_by.clone();
    Ok(KillBill::new(kb)?.bootstrap(&xml, &created_by).await?)
}

#[cfg(test)]
mod tests {
    //! What the bundled catalog must declare for the time billing to be invoiced, read from
    //! `deploy/killbill/catalog.xml` itself.

    use rust_decimal::Decimal;

    use super::{catalog_effective_dates, CATALOG_XML};
    use crate::event::Timestamp;

    /// The units of an instance's exact time billing, amounts in seconds.
    const TIME_UNITS: [&str; 4] = [
        "openstack-instance-seconds",
        "openstack-vcpu-seconds",
        "openstack-memory-gib-seconds",
        "openstack-disk-gib-seconds",
    ];

    /// The units of the version of 2025-01-01, counted from Ceilometer samples.
    const PREVIOUS_UNITS: [&str; 4] =
        ["openstack-billed-instance", "openstack-billed-vcpus", "openstack-billed-memory", "openstack-billed-disk"];

    /// The instance plans, which the configuration maps flavors to.
    const INSTANCE_PLANS: [&str; 4] = [
        "openstack-standard-monthly",
        "openstack-compute-monthly",
        "openstack-memory-monthly",
        "openstack-large-monthly",
    ];

    /// A plan of another resource kind: (plan, product, [(unit, USD per unit)]).
    type ResourcePlan = (&'static str, &'static str, &'static [(&'static str, &'static str)]);

    /// The plans of the other resource kinds. The prices are the catalog's, written out so that
    /// a change to one is a decision.
    const RESOURCE_PLANS: [ResourcePlan; 6] = [
        ("openstack-volume-monthly", "Volume", &[("openstack-volume-gib-seconds", "0.00000004")]),
        ("openstack-volume-premium-monthly", "Volume", &[("openstack-volume-gib-seconds", "0.0000001")]),
        ("openstack-snapshot-monthly", "Snapshot", &[("openstack-snapshot-gib-seconds", "0.00000002")]),
        ("openstack-floating-ip-monthly", "FloatingIp", &[("openstack-floating-ip-seconds", "0.000001")]),
        ("openstack-image-monthly", "Image", &[("openstack-image-gib-seconds", "0.00000002")]),
        (
            "openstack-network-monthly",
            "Network",
            &[("openstack-network-egress-gib", "0.09"), ("openstack-network-ingress-gib", "0.01")],
        ),
    ];

    /// Units billed by the GiB rather than by the second.
    const TRAFFIC_UNITS: [&str; 2] = ["openstack-network-egress-gib", "openstack-network-ingress-gib"];

    /// The text between the first `<tag>` after `from` and its `</tag>`.
    fn inner<'a>(from: &'a str, tag: &str) -> Option<&'a str> {
        let rest = from.split_once(&format!("<{tag}>"))?.1;
        Some(rest.split_once(&format!("</{tag}>"))?.0.trim())
    }

    /// Every plan definition, as (name, text up to its `</plan>`).
    fn plans() -> Vec<(&'static str, &'static str)> {
        let plans = CATALOG_XML.split_once("<plans>").unwrap().1.split_once("</plans>").unwrap().0;
        plans
            .split("<plan name=\"")
            .skip(1)
            .map(|rest| {
                let (name, body) = rest.split_once('"').unwrap();
                (name, body.split_once("</plan>").unwrap().0)
            })
            .collect()
    }

    /// The definition of the plan named `name`.
    fn plan(name: &str) -> &'static str {
        plans().into_iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no plan {name}")).1
    }

    /// The units a plan bills: the instance time units, or its resource's.
    fn units_of(plan: &str) -> Vec<&'static str> {
        match RESOURCE_PLANS.iter().find(|(name, _, _)| *name == plan) {
            Some((_, _, units)) => units.iter().map(|(unit, _)| *unit).collect(),
            None => TIME_UNITS.to_vec(),
        }
    }

    /// A plan's usage sections, as (opening tag, body).
    fn usages(plan: &str) -> Vec<(&str, &str)> {
        plan.split("<usage ")
            .skip(1)
            .map(|rest| {
                let (open, body) = rest.split_once('>').unwrap();
                (open, body.split_once("</usage>").unwrap().0)
            })
            .collect()
    }

    /// The tiered blocks of a usage section, each with the comment just before it, if any.
    fn blocks(usage: &str) -> Vec<(Option<&str>, &str)> {
        let mut found = Vec::new();
        let mut before = usage;
        for (i, piece) in usage.split("<tieredBlock>").enumerate() {
            if i > 0 {
                let comment = before
                    .trim_end()
                    .strip_suffix("-->")
                    .and_then(|text| text.rsplit_once("<!--"))
                    .map(|(_, text)| text.trim());
                found.push((comment, piece.split_once("</tieredBlock>").unwrap().0));
            }
            before = piece;
        }
        found
    }

    /// The block of `unit` in the plan's usage, with its comment.
    fn block_of<'a>(plan: &'a str, unit: &str) -> Option<(Option<&'a str>, &'a str)> {
        let unit_tag = format!("<unit>{unit}</unit>");
        usages(plan).into_iter().flat_map(|(_, body)| blocks(body)).find(|(_, block)| block.contains(&unit_tag))
    }

    fn price(block: &str) -> (String, Decimal) {
        let price = inner(block, "price").expect("a <price>");
        let currency = inner(price, "currency").expect("a <currency>").to_owned();
        let value = inner(price, "value").expect("a <value>").parse().expect("a decimal price");
        (currency, value)
    }

    /// The price at the start of a block's comment (`$<price> per …`).
    fn commented_price(plan: &str, unit: &str, comment: Option<&str>) -> Decimal {
        let comment = comment.unwrap_or_else(|| panic!("{plan} {unit}: no price comment"));
        comment
            .strip_prefix('$')
            .and_then(|text| text.split_whitespace().next())
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| panic!("{plan} {unit}: the comment {comment:?} does not start with $<price>"))
    }

    #[test]
    fn the_catalog_has_the_instance_plans_then_one_plan_per_resource_kind() {
        let names: Vec<&str> = plans().into_iter().map(|(name, _)| name).collect();
        let expected: Vec<&str> =
            INSTANCE_PLANS.into_iter().chain(RESOURCE_PLANS.iter().map(|(name, _, _)| *name)).collect();
        // The configuration maps flavors, volume types and kinds to these names: renaming one
        // strands its subscriptions.
        assert_eq!(names, expected);
        let price_list = inner(CATALOG_XML, "priceLists").and_then(|lists| inner(lists, "plans")).unwrap();
        for name in expected {
            assert!(price_list.contains(&format!("<plan>{name}</plan>")), "the DEFAULT price list lacks {name}");
        }
    }

    #[test]
    fn every_plan_bills_its_units_consumable_in_arrear_all_tiers_by_blocks_of_one_at_a_usd_price() {
        for (plan, body) in plans() {
            let sections = usages(body);
            assert_eq!(sections.len(), 1, "{plan}: one usage section");
            let (open, _) = sections[0];
            for attribute in
                [r#"billingMode="IN_ARREAR""#, r#"usageType="CONSUMABLE""#, r#"tierBlockPolicy="ALL_TIERS""#]
            {
                assert!(open.contains(attribute), "{plan}: the usage section lacks {attribute}: {open}");
            }
            assert_eq!(inner(sections[0].1, "billingPeriod"), Some("MONTHLY"), "{plan}");
            for unit in units_of(plan) {
                assert!(CATALOG_XML.contains(&format!("<unit name=\"{unit}\"/>")), "<units> lacks {unit}");
                let (_, block) = block_of(body, unit).unwrap_or_else(|| panic!("{plan} does not bill {unit}"));
                // Blocks of one unit-second (one GiB of traffic): KillBill rounds each period's
                // total up to whole blocks.
                assert_eq!(inner(block, "size"), Some("1"), "{plan} {unit}");
                // Unbounded: KillBill stops counting a tier at its max, and a month of a large
                // instance is billions of GiB-seconds.
                assert_eq!(inner(block, "max"), Some("-1"), "{plan} {unit}");
                let (currency, value) = price(block);
                assert_eq!(currency, "USD", "{plan} {unit}");
                assert!(value > Decimal::ZERO, "{plan} {unit}: price {value}");
                // KillBill keeps invoice rates to 9 places (numeric(15,9)).
                assert!(value.scale() <= 9, "{plan} {unit}: price {value} has more than 9 decimals");
            }
        }
    }

    #[test]
    fn each_resource_plan_is_of_its_product_and_bills_only_its_units_at_their_prices() {
        for (plan, product, units) in RESOURCE_PLANS {
            let body = self::plan(plan);
            assert_eq!(inner(body, "product"), Some(product), "{plan}");
            assert!(CATALOG_XML.contains(&format!("<product name=\"{product}\">")), "no product {product}");
            let billed = usages(body).into_iter().flat_map(|(_, usage)| blocks(usage)).count();
            assert_eq!(billed, units.len(), "{plan}: one block per unit of its kind, none of another's");
            for (unit, expected) in units {
                let (_, block) = block_of(body, unit).unwrap();
                assert_eq!(price(block).1, expected.parse::<Decimal>().unwrap(), "{plan} {unit}");
            }
        }
    }

    #[test]
    fn each_price_comment_states_the_price_per_hour_or_per_gib() {
        for (plan, body) in plans() {
            for unit in units_of(plan) {
                let (comment, block) = block_of(body, unit).unwrap();
                let stated = commented_price(plan, unit, comment);
                let (_, per_unit) = price(block);
                // Time is priced per unit-second and commented per hour; traffic per GiB both ways.
                let expected = if TRAFFIC_UNITS.contains(&unit) { per_unit } else { per_unit * Decimal::from(3600) };
                assert_eq!(stated, expected, "{plan} {unit}: {comment:?}");
            }
        }
    }

    #[test]
    fn every_instance_plan_still_bills_the_previous_units() {
        for unit in PREVIOUS_UNITS {
            assert!(CATALOG_XML.contains(&format!("<unit name=\"{unit}\"/>")), "<units> lacks {unit}");
        }
        for plan in INSTANCE_PLANS {
            let body = self::plan(plan);
            assert_eq!(inner(body, "product"), Some("Instance"), "{plan}");
            for unit in PREVIOUS_UNITS {
                let (_, block) = block_of(body, unit).unwrap_or_else(|| panic!("{plan} no longer bills {unit}"));
                assert_eq!(inner(block, "size"), Some("1"), "{plan} {unit}");
                assert!(price(block).1 > Decimal::ZERO, "{plan} {unit}");
            }
        }
    }

    #[test]
    fn this_version_is_later_than_the_previous_ones_and_moves_existing_subscriptions_to_it() {
        let effective = catalog_effective_dates(CATALOG_XML);
        assert_eq!(effective.len(), 1, "one version per file: KillBill takes one per upload");
        // The sample-counted version, then the instance time version.
        for previous in ["2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z"] {
            let previous = Timestamp::parse(previous).unwrap();
            assert!(effective[0] > previous, "{} is not after the version of {previous}", effective[0]);
        }
        for (plan, body) in plans() {
            // Without it, subscriptions that started under an earlier version stay on it, which
            // may not know the units this one bills; KillBill refuses a date before the version's.
            let moved = inner(body, "effectiveDateForExistingSubscriptions")
                .unwrap_or_else(|| panic!("{plan} keeps existing subscriptions on the previous version"));
            assert_eq!(Timestamp::parse(moved).unwrap(), effective[0], "{plan}");
        }
    }
}

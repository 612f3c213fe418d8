//! Bootstrap: the tenant and the catalog, and what a catalog declares.

use super::client::{CATALOG_INVALID_FOR_TENANT, TENANT_ALREADY_EXISTS};
use super::KillBill;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;

use crate::billing::BillingError;
use crate::event::Timestamp;

/// The catalog written for this project (`deploy/killbill/catalog.xml`): usage-only plans in the
/// units of the default meters.
pub const CATALOG_XML: &str = include_str!("../../../deploy/killbill/catalog.xml");

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
    /// `effectiveDate` is already there. Safe to repeat.
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
         (and bump its effectiveDate) or change [billing.meters]/[billing.plans]"
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
    let units = settings.billing.meters.values().map(|m| m.unit.as_str());
    let plans = std::iter::once(settings.billing.default_plan.as_str())
        .chain(settings.billing.plans.values().map(|p| p.as_str()));
    let gaps = catalog_gaps(&xml, units, plans);
    if !gaps.is_empty() {
        let file = catalog.map(|p| format!(" {}", p.display())).unwrap_or_default();
        return Err(BootstrapError::Gaps { file, gaps: gaps.join(", ") });
    }
    let created_by = kb.created_by.clone();
    Ok(KillBill::new(kb)?.bootstrap(&xml, &created_by).await?)
}

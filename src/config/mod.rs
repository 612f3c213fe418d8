//! Typed configuration: one `Settings` tree read from TOML and validated once, at start.
//!
//! Owns the billing rules an operator controls (flavor → plan, meter → unit and factor, which
//! projects are billed) and the decoder's limits. Everything else in the program receives these
//! as already-checked values: a bad deployment fails at start with one message naming the key.
//!
//! One file per section: [`bus`] (with the listener and the decoder's limits), [`billing`]
//! (rules, meters, the project filter), [`money`] (exact factors), [`killbill`], [`hostbill`],
//! [`concertim`], [`keystone`]; [`secret`] keeps secrets out of every printout, [`env`] reads the
//! `CONCERTIM_BILLING_*` overrides.

mod api;
mod billing;
mod bus;
mod concertim;
mod env;
mod hostbill;
mod keystone;
mod killbill;
mod money;
mod secret;

pub use api::ApiSettings;
pub use billing::{
    BackendKind, BillingSettings, Counter, FloatingIpBilled, ManagedBy, MeterRule, ProjectFilter, ResourceSettings,
    TimeSettings, INSTANCE_METERS,
};
pub use bus::{BackoffSettings, Binding, BusSettings, BusTls, DecodeLimits, HttpSettings, DEFAULT_MAX_BODY_BYTES};
pub use concertim::{ConcertimSettings, MetricRule};
pub use env::env_overrides;
pub use hostbill::HostBillSettings;
pub use keystone::{KeystoneAuth, KeystoneSettings};
pub use killbill::{KillBillSettings, KillBillVersion};
pub use money::{Factor, AMOUNT_SCALE};
pub use secret::{Secret, SecretUrl};

use billing::is_ceilometer_meter;
use env::{env_name, override_value, set_path, without_values};
use secret::read_secret_files;

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The embedded default configuration, used when no file is given. It is also the annotated
/// reference for every key (`config check` prints the effective values).
pub const DEFAULT_TOML: &str = include_str!("../default-config.toml");

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, or a value of the wrong type.
    #[error("invalid config {origin}: {source}")]
    Parse {
        /// The file, or `(embedded default)`.
        origin: String,
        /// The parser's error, with the offending key and position.
        #[source]
        source: toml::de::Error,
    },
    /// A cross-field rule failed.
    #[error("invalid config {origin}: {message}")]
    Rule {
        /// The file, or `(embedded default)`.
        origin: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// Prefix of the environment variables that override the file: `CONCERTIM_BILLING_BUS__URL`
/// sets `bus.url` (`__` separates levels). `CONCERTIM_BILLING_CONFIG` and
/// `CONCERTIM_BILLING_AMQP_URL` are the command line's `--config` and `--amqp-url`.
pub const ENV_PREFIX: &str = "CONCERTIM_BILLING_";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Billing rules.
    pub billing: BillingSettings,
    /// Which projects are billed.
    #[serde(default)]
    pub projects: ProjectFilter,
    /// Decoder limits.
    #[serde(default)]
    pub decode: DecodeLimits,
    /// The message bus: broker, our queues, bindings, retries.
    #[serde(default)]
    pub bus: BusSettings,
    /// The KillBill server, used when `billing.backend = "killbill"`.
    #[serde(default)]
    pub killbill: Option<KillBillSettings>,
    /// The HostBill server, used when `billing.backend = "hostbill"`.
    #[serde(default)]
    pub hostbill: Option<HostBillSettings>,
    /// The health and metrics listener of `run`.
    #[serde(default)]
    pub http: HttpSettings,
    /// Concertim, the visualisation app, updated alongside billing when this section is present.
    #[serde(default)]
    pub concertim: Option<ConcertimSettings>,
    /// Keystone, the identity service the OpenStack API client authenticates against.
    #[serde(default)]
    pub keystone: Option<KeystoneSettings>,
    /// The billing API Concertim calls (off unless `api.listen` is set).
    #[serde(default)]
    pub api: ApiSettings,
    /// Where the instance timelines and what each period posted are kept.
    #[serde(default)]
    pub state: StateSettings,
}

/// The state store (`[state]`): an embedded SQLite file, or PostgreSQL shared by replicas.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    /// The SQLite file `run` keeps its state in (created when missing), unless `url` is set.
    #[serde(default = "default_state_path")]
    pub path: String,
    /// A PostgreSQL URL (`postgres://user:password@host/db`), for several replicas sharing one
    /// state; its password never appears in logs or `config check`.
    #[serde(default)]
    pub url: Option<SecretUrl>,
    /// A replica that claimed a period and died is taken over after this long (above the
    /// billing application's longest answer time, so a slow post is never doubled).
    #[serde(default = "default_claim_lease_s")]
    pub claim_lease_s: u64,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self { path: default_state_path(), url: None, claim_lease_s: default_claim_lease_s() }
    }
}

fn default_state_path() -> String {
    "concertim-billing.db".into()
}

fn default_claim_lease_s() -> u64 {
    120
}

impl Settings {
    /// The embedded default configuration.
    pub fn embedded() -> Self {
        // The embedded file is checked by a unit test, so this cannot fail in a release.
        Self::from_toml(DEFAULT_TOML, "(embedded default)").expect("the embedded default config is valid")
    }

    /// Parses and validates a TOML document; `origin` names it in errors.
    ///
    /// # Errors
    /// Malformed TOML, an unknown key, a wrong type, or a failed cross-field rule.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::layered(text, origin, std::iter::empty())
    }

    /// Parses a TOML document, applies `overrides` (`(["bus", "url"], "amqp://…")`), then
    /// validates. An override of a secret or of a string-valued key is taken literally; any
    /// other that parses as a bare TOML value (number, boolean, array) is taken as that.
    ///
    /// Errors never echo a value: a value of the wrong type is named by its key, and by its
    /// environment variable when an override brought it.
    ///
    /// # Errors
    /// As [`Settings::from_toml`].
    pub fn layered(
        text: &str,
        origin: &str,
        overrides: impl IntoIterator<Item = (Vec<String>, String)>,
    ) -> Result<Self, ConfigError> {
        let file: toml::Table =
            text.parse().map_err(|source| ConfigError::Parse { origin: origin.to_owned(), source })?;
        Self::layered_table(file, origin, overrides)
    }

    /// A config file as `run` reads it: layered key by key over the embedded defaults (what it
    /// does not name keeps its default; a table it names is merged into the default's, an array
    /// or a value replaces the default's), then `overrides`.
    ///
    /// # Errors
    /// As [`Settings::layered`].
    pub fn over_defaults(
        text: &str,
        origin: &str,
        overrides: impl IntoIterator<Item = (Vec<String>, String)>,
    ) -> Result<Self, ConfigError> {
        let file: toml::Table =
            text.parse().map_err(|source| ConfigError::Parse { origin: origin.to_owned(), source })?;
        // The embedded file is checked by a unit test: it parses.
        let mut table: toml::Table = DEFAULT_TOML.parse().expect("the embedded default config parses");
        merge(&mut table, file);
        Self::layered_table(table, origin, overrides)
    }

    fn layered_table(
        file: toml::Table,
        origin: &str,
        overrides: impl IntoIterator<Item = (Vec<String>, String)>,
    ) -> Result<Self, ConfigError> {
        let overrides: Vec<(Vec<String>, String)> = overrides.into_iter().collect();
        let mut table = file.clone();
        for (path, value) in &overrides {
            let value = override_value(&table, path, value);
            set_path(&mut table, path, value);
        }
        let settings = match Self::from_table(table) {
            Ok(settings) => settings,
            Err(message) if overrides.is_empty() => {
                return Err(ConfigError::Rule { origin: origin.to_owned(), message })
            }
            Err(message) => {
                // Blame the first override that breaks a file that reads well without it.
                let mut table = file;
                let mut culprit = Self::from_table(table.clone()).err().map(|m| (origin.to_owned(), m));
                for (path, value) in &overrides {
                    if culprit.is_some() {
                        break;
                    }
                    let value = override_value(&table, path, value);
                    set_path(&mut table, path, value);
                    culprit = Self::from_table(table.clone()).err().map(|m| (env_name(path), m));
                }
                let (origin, message) =
                    culprit.unwrap_or_else(|| (format!("{origin} with its environment overrides"), message));
                return Err(ConfigError::Rule { origin, message });
            }
        };
        settings.validate().map_err(|message| ConfigError::Rule {
            origin: if overrides.is_empty() {
                origin.to_owned()
            } else {
                let names: Vec<String> = overrides.iter().map(|(path, _)| env_name(path)).collect();
                format!("{origin} with {}", names.join(", "))
            },
            message,
        })?;
        Ok(settings)
    }

    /// The settings a table holds, or why not (values never echoed).
    fn from_table(mut table: toml::Table) -> Result<Self, String> {
        read_secret_files(&mut table, "")?;
        let mut settings: Self = table.try_into().map_err(|e: toml::de::Error| without_values(&e.to_string()))?;
        settings.billing.add_traffic_meters();
        Ok(settings)
    }

    /// Loads a config file layered over the embedded default ([`Settings::over_defaults`]), or
    /// the embedded default when `path` is `None`, then the `CONCERTIM_BILLING_*` environment
    /// overrides (`CONCERTIM_BILLING_CONFIG` itself excepted).
    ///
    /// # Errors
    /// As [`Settings::from_toml`], or when the file cannot be read.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(path) => (
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?,
                path.display().to_string(),
            ),
            None => (DEFAULT_TOML.to_owned(), "(embedded default)".to_owned()),
        };
        Self::over_defaults(&text, &origin, env_overrides(std::env::vars()))
    }

    /// What is valid but probably not meant: no billed meter at all, or a meter Ceilometer
    /// emits under no such name (`vcpu` for `vcpus`), either of which bills no usage. `config
    /// check` prints them and `run` logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        self.billing
            .meters
            .keys()
            .filter(|m| !is_ceilometer_meter(m))
            .map(|m| {
                format!(
                    "billing.meters.\"{m}\": Ceilometer emits no meter by that name, so it bills nothing (its instance meters: {})",
                    INSTANCE_METERS.join(", ")
                )
            })
            .collect()
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }

    /// Every section checks itself; what spans sections (a backend and its section) is here.
    fn validate(&self) -> Result<(), String> {
        match self.billing.backend {
            BackendKind::Killbill => match &self.killbill {
                Some(kb) => kb.validate()?,
                None => return Err("billing.backend = \"killbill\" needs a [killbill] section (url, username, password, api_key, api_secret)".into()),
            },
            BackendKind::Hostbill => self.hostbill.clone().unwrap_or_default().validate(&self.billing)?,
            BackendKind::Ledger => {}
        }
        self.http.validate()?;
        self.api.validate()?;
        self.bus.validate()?;
        if let Some(c) = &self.concertim {
            c.validate()?;
        }
        if let Some(k) = &self.keystone {
            k.validate()?;
        }
        self.decode.validate()?;
        self.billing.time.validate()?;
        self.projects.validate()
    }
}

/// Merges `over` into `base` key by key: tables into tables (recursively), anything else
/// (values, arrays such as `[[bus.bindings]]`) replacing what `base` has.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        // A secret given from a file replaces the default's value, and the other way round.
        match key.strip_suffix("_file") {
            Some(secret) if secret::SECRET_FILE_KEYS.contains(&secret) => {
                base.remove(secret);
            }
            _ => {
                base.remove(&format!("{key}_file"));
            }
        }
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(value)) => merge(inner, value),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Defaults every outbound HTTP client (KillBill, HostBill, Concertim, Keystone) shares.
fn default_timeout_ms() -> u64 {
    10_000
}

fn default_connect_timeout_ms() -> u64 {
    3_000
}

/// Checks `<section>.ca_file` of an outbound client: a readable file holding a PEM
/// certificate, and not beside `tls_verify = false` (which would make it moot).
fn check_ca_file(section: &str, ca_file: Option<&str>, tls_verify: bool) -> Result<(), String> {
    let Some(ca_file) = ca_file else { return Ok(()) };
    if !tls_verify {
        return Err(format!("{section}.ca_file is set but {section}.tls_verify = false: drop one"));
    }
    let text =
        std::fs::read_to_string(ca_file).map_err(|e| format!("{section}.ca_file: cannot read {ca_file}: {e}"))?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{section}.ca_file: {ca_file} holds no PEM certificate"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rust_decimal::Decimal;

    use super::*;
    use crate::event::ProjectId;

    #[test]
    fn a_metered_meter_ceilometer_does_not_have_is_warned_about() {
        assert!(Settings::embedded().warnings().is_empty(), "{:?}", Settings::embedded().warnings());
        let typo = DEFAULT_TOML.replace(
            "[billing.meters]\n",
            "[billing.meters.vcpu]\nunit = \"u\"\nfactor = \"1\"\ncounter = \"delta\"\n",
        );
        let warnings = Settings::from_toml(&typo, "t").unwrap().warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("billing.meters.\"vcpu\""), "{warnings:?}");
    }

    fn with_env(file: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let vars = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        Settings::layered(file, "kb.toml", env_overrides(vars))
    }

    fn kb_file() -> String {
        format!("{DEFAULT_TOML}\n{KB_SECTION}").replace("backend = \"ledger\"", "backend = \"killbill\"")
    }

    const KB_SECTION: &str = "[killbill]\nurl = \"http://127.0.0.1:18080\"\nusername = \"admin\"\npassword = \"p\"\napi_key = \"k\"\napi_secret = \"s\"\n";

    #[test]
    fn secrets_from_the_environment_are_taken_literally_whatever_they_look_like() {
        for secret in ["83750291", "3.14159e7", "0xDEADBEEF", "\"Quoted-Pass\"", "true", "[1]"] {
            let settings = with_env(
                &kb_file(),
                &[("CONCERTIM_BILLING_KILLBILL__PASSWORD", secret), ("CONCERTIM_BILLING_KILLBILL__API_SECRET", secret)],
            )
            .unwrap();
            let kb = settings.killbill.unwrap();
            assert_eq!(kb.password.expose(), secret);
            assert_eq!(kb.api_secret.expose(), secret);
        }
    }

    #[test]
    fn a_wrong_value_from_the_environment_is_blamed_on_its_variable_and_never_echoed() {
        let err = with_env(&kb_file(), &[("CONCERTIM_BILLING_BUS__LANES", "\"Sekr1tLanes\"")]).unwrap_err().to_string();
        assert!(err.contains("CONCERTIM_BILLING_BUS__LANES (environment)"), "{err}");
        assert!(!err.contains("Sekr1tLanes") && !err.contains("kb.toml"), "{err}");
        let err = with_env(&kb_file(), &[("CONCERTIM_BILLING_BUS__PREFETCH", "98765.5")]).unwrap_err().to_string();
        assert!(err.contains("CONCERTIM_BILLING_BUS__PREFETCH") && !err.contains("98765"), "{err}");
    }

    #[test]
    fn a_wrong_value_in_the_file_is_named_by_its_key_without_the_value() {
        let err = Settings::from_toml(&kb_file().replace("password = \"p\"", "password = 83750291"), "kb.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kb.toml") && err.contains("killbill.password") && !err.contains("83750291"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_file_others_can_read_is_refused_saying_how_to_fix_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kb-password");
        std::fs::write(&file, "FromTheFile\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = kb_file().replace("password = \"p\"", &format!("password_file = {:?}", file.display().to_string()));
        let err = Settings::from_toml(&text, "kb.toml").unwrap_err().to_string();
        assert!(err.contains("killbill.password_file") && err.contains("0644") && err.contains("chmod 0600"), "{err}");
        assert!(!err.contains("FromTheFile"), "{err}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let kb = Settings::from_toml(&text, "kb.toml").unwrap().killbill.unwrap();
        assert_eq!(kb.password.expose(), "FromTheFile");
    }

    /// `ca_file` of KillBill, HostBill and Concertim, set in the file or the environment, is
    /// read at load: a missing file, or one without a PEM certificate, is refused naming the key.
    #[test]
    fn each_clients_ca_file_is_checked_at_load_naming_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let (pem, not_pem) = (dir.path().join("ca.pem"), dir.path().join("ca.txt"));
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
        std::fs::write(&not_pem, "not a certificate\n").unwrap();
        let billed = [
            "openstack-standard-monthly",
            "openstack-volume-monthly",
            "openstack-snapshot-monthly",
            "openstack-floating-ip-monthly",
            "openstack-image-monthly",
            "openstack-network-monthly",
        ];
        let hostbill = format!(
            "{DEFAULT_TOML}\n[hostbill]\nurl = \"https://hb\"\napi_id = \"x\"\napi_key = \"k\"\n\
             [hostbill.products]\n{}",
            billed.iter().map(|plan| format!("\"{plan}\" = \"1\"\n")).collect::<String>()
        )
        .replace("backend = \"ledger\"", "backend = \"hostbill\"");
        let concertim =
            format!("{DEFAULT_TOML}\n[concertim]\nurl = \"https://cm\"\nusername = \"u\"\npassword = \"p\"\n");
        for (section, file) in [("killbill", kb_file()), ("hostbill", hostbill), ("concertim", concertim.clone())] {
            let var = format!("CONCERTIM_BILLING_{}__CA_FILE", section.to_ascii_uppercase());
            let load = |path: &std::path::Path| with_env(&file, &[(var.as_str(), path.to_str().unwrap())]);
            assert!(load(&pem).is_ok(), "{section}: {:?}", load(&pem).err());
            let err = load(Path::new("/nonexistent.pem")).unwrap_err().to_string();
            assert!(err.contains(&format!("{section}.ca_file: cannot read /nonexistent.pem")), "{err}");
            let err = load(&not_pem).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{section}.ca_file: {} holds no PEM certificate", not_pem.display())),
                "{err}"
            );
        }
        let unverified = format!("{concertim}tls_verify = false\nca_file = {:?}\n", pem.to_str().unwrap());
        let err = Settings::from_toml(&unverified, "t.toml").unwrap_err().to_string();
        assert!(err.contains("concertim.ca_file is set but concertim.tls_verify = false"), "{err}");
    }

    #[test]
    fn a_hostbill_backend_names_every_missing_setting() {
        let text = format!("{DEFAULT_TOML}\n[hostbill]\napi_id = \"x\"\n")
            .replace("backend = \"ledger\"", "backend = \"hostbill\"");
        let err = Settings::from_toml(&text, "t.toml").unwrap_err().to_string();
        for missing in ["hostbill.url", "hostbill.api_key", "hostbill.products.\"openstack-standard-monthly\""] {
            assert!(err.contains(missing), "{missing}: {err}");
        }
        assert!(!err.contains("hostbill.api_id"), "{err}");
    }

    #[test]
    fn a_hostbill_backend_needs_a_product_for_every_resource_plan_and_loads_with_them() {
        let hostbill = |products: &str| {
            format!(
                "{DEFAULT_TOML}\n[billing.plans]\n\"m1.large\" = \"openstack-large-monthly\"\n\
                 [hostbill]\nurl = \"https://hb\"\napi_id = \"x\"\napi_key = \"k\"\n[hostbill.products]\n{products}"
            )
            .replace("backend = \"ledger\"", "backend = \"hostbill\"")
            .replace("[billing.plans]\n# \"m1.xlarge\" = \"openstack-large-monthly\"\n", "")
            .replace("# ssd = \"openstack-volume-premium-monthly\"", "ssd = \"openstack-volume-premium-monthly\"")
        };
        let err = Settings::from_toml(&hostbill("\"openstack-standard-monthly\" = \"1\"\n"), "t.toml")
            .unwrap_err()
            .to_string();
        for plan in [
            "openstack-large-monthly",
            "openstack-volume-monthly",
            "openstack-volume-premium-monthly",
            "openstack-snapshot-monthly",
            "openstack-floating-ip-monthly",
            "openstack-image-monthly",
            // Egress traffic is billed by default, on the network plan.
            "openstack-network-monthly",
        ] {
            assert!(err.contains(&format!("hostbill.products.\"{plan}\"")), "{plan}: {err}");
        }
        assert!(!err.contains("openstack-standard-monthly"), "{err}");
        let all: String = Settings::embedded()
            .billing
            .billed_plans()
            .into_iter()
            .map(|plan| plan.as_str())
            .chain(["openstack-large-monthly", "openstack-volume-premium-monthly"])
            .enumerate()
            .map(|(i, plan)| format!("\"{plan}\" = \"{i}\"\n"))
            .collect();
        let s = Settings::from_toml(&hostbill(&all), "t.toml").unwrap();
        assert_eq!(s.hostbill.unwrap().products.len(), 8);
    }

    #[test]
    fn the_billed_plans_and_units_cover_every_resource_kind_and_the_network_plan_only_with_traffic() {
        let s = Settings::embedded();
        let plans: Vec<&str> = s.billing.billed_plans().into_iter().map(|p| p.as_str()).collect();
        assert_eq!(
            plans,
            [
                "openstack-standard-monthly",
                "openstack-volume-monthly",
                "openstack-snapshot-monthly",
                "openstack-floating-ip-monthly",
                "openstack-image-monthly",
                "openstack-network-monthly"
            ]
        );
        assert_eq!(
            s.billing.billed_units(),
            [
                "openstack-instance-seconds",
                "openstack-vcpu-seconds",
                "openstack-memory-gib-seconds",
                "openstack-disk-gib-seconds",
                "openstack-volume-gib-seconds",
                "openstack-snapshot-gib-seconds",
                "openstack-floating-ip-seconds",
                "openstack-image-gib-seconds",
                "openstack-network-egress-gib"
            ]
        );
        let quiet = DEFAULT_TOML.replace("network_egress = true", "network_egress = false");
        let quiet = Settings::from_toml(&quiet, "t.toml").unwrap();
        assert!(!quiet.billing.billed_plans().iter().any(|p| p.as_str() == "openstack-network-monthly"));
        assert!(!quiet.billing.billed_units().iter().any(|u| u.starts_with("openstack-network-")));
    }

    #[test]
    fn environment_overrides_reach_nested_keys_with_their_types() {
        let vars = [
            ("CONCERTIM_BILLING_BUS__URL".to_owned(), "amqp://u:p@h:5672/v".to_owned()),
            ("CONCERTIM_BILLING_BUS__LANES".to_owned(), "3".to_owned()),
            ("CONCERTIM_BILLING_BUS__PREFIX".to_owned(), "test-".to_owned()),
            ("CONCERTIM_BILLING_CONFIG".to_owned(), "ignored.toml".to_owned()),
            ("OTHER".to_owned(), "x".to_owned()),
        ];
        let s = Settings::layered(DEFAULT_TOML, "t", env_overrides(vars)).unwrap();
        assert_eq!(s.bus.url.expose(), "amqp://u:p@h:5672/v");
        assert_eq!(s.bus.lanes, 3);
        assert_eq!(s.bus.prefix, "test-");
    }

    #[test]
    fn a_secret_can_come_from_a_file_and_its_errors_never_show_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kb-password");
        std::fs::write(&file, "Fr0m-A-File\n").unwrap();
        #[cfg(unix)]
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let section = |extra: &str| {
            format!(
                "{DEFAULT_TOML}\n[killbill]\nurl = \"http://kb\"\nusername = \"admin\"\napi_key = \"k\"\napi_secret = \"s\"\n{extra}\n"
            )
        };
        let text = section(&format!("password_file = \"{}\"", file.display()));
        let settings = Settings::from_toml(&text, "t").unwrap();
        assert_eq!(settings.killbill.as_ref().unwrap().password.expose(), "Fr0m-A-File");
        assert!(!settings.to_toml().contains("Fr0m-A-File"));
        // From the environment as well.
        let text = section("password = \"x\"");
        let env = [(vec!["bus".to_owned(), "url_file".to_owned()], file.display().to_string())];
        let error = Settings::layered(&text, "t", env.clone()).unwrap_err().to_string();
        assert!(error.contains("bus.url_file and bus.url are both set"), "{error}");
        let missing = section("password_file = \"/nonexistent/kb\"");
        let error = Settings::from_toml(&missing, "t").unwrap_err().to_string();
        assert!(error.contains("killbill.password_file: cannot read /nonexistent/kb"), "{error}");
    }

    #[test]
    fn a_password_with_slashes_colons_or_at_signs_never_shows() {
        for (url, shown) in [
            ("amqp://billing:Ab/cd+ef/gh==@rabbit:5672/%2f", "amqp://billing:***@rabbit:5672/%2f"),
            ("amqp://billing:p:a@ss@rabbit:5672/", "amqp://billing:***@rabbit:5672/"),
            ("amqp://rabbit:5672/", "amqp://rabbit:5672/"),
            ("billing:S3cret/x@rabbit:5672", "(not a URL: ***@rabbit:5672)"),
            ("billing:S3cret", "(not a URL)"),
        ] {
            let redacted = SecretUrl::new(url).redacted();
            assert_eq!(redacted, shown, "{url}");
            assert!(!redacted.contains("S3cret") && !redacted.contains("gh=="));
        }
    }

    #[test]
    fn passwords_never_show_in_debug_display_or_config_check() {
        let url = SecretUrl::new("amqps://billing:s3cret@rabbit.example:5671/openstack");
        for shown in [format!("{url:?}"), url.to_string()] {
            assert!(
                !shown.contains("s3cret") && shown.contains("billing:***@rabbit.example:5671/openstack"),
                "{shown}"
            );
        }
        let mut s = Settings::embedded();
        s.bus.url = url;
        assert!(!s.to_toml().contains("s3cret"));
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn the_effective_config_prints_as_toml_that_loads_again() {
        let s = Settings::embedded();
        let again = Settings::from_toml(&s.to_toml(), "printed").unwrap();
        assert_eq!(again.bus.queue, "concertim-billing");
        assert_eq!(again.billing.time.grace_s, 900);
        assert_eq!(again.state.claim_lease_s, 120);
    }

    #[test]
    fn a_bus_rule_violation_names_the_key() {
        let err = Settings::layered(DEFAULT_TOML, "t", [(vec!["bus".into(), "lanes".into()], "0".into())]).unwrap_err();
        assert!(err.to_string().contains("bus.lanes"), "{err}");
        let err =
            Settings::layered(DEFAULT_TOML, "t", [(vec!["bus".into(), "url".into()], "http://x".into())]).unwrap_err();
        assert!(err.to_string().contains("amqp://"), "{err}");
    }

    #[test]
    fn the_embedded_default_bills_instance_time_in_seconds_and_only_egress_traffic_as_metered_usage() {
        let s = Settings::embedded();
        assert_eq!(s.billing.default_plan.as_str(), "openstack-standard-monthly");
        let metered: Vec<&String> = s.billing.meters.keys().collect();
        assert_eq!(metered, ["network.outgoing.bytes"]);
        let egress = &s.billing.meters["network.outgoing.bytes"];
        assert_eq!((egress.unit.as_str(), egress.counter), ("openstack-network-egress-gib", Counter::Cumulative));
        assert_eq!(egress.resource, crate::event::ResourceKind::NetworkInterface);
        assert_eq!(s.billing.resources.floating_ip_billed, FloatingIpBilled::Allocated);
        assert_eq!(s.billing.time.unit_name(crate::timeline::Kind::MemoryGib), "openstack-memory-gib-seconds");
        assert_eq!(s.billing.time.period, crate::timeline::Period::Hour);
    }

    #[test]
    fn ingress_traffic_is_billed_when_switched_on_and_a_listed_meter_wins_over_the_built_in_rule() {
        let on =
            Settings::from_toml("[billing]\ndefault_plan = \"p\"\n[billing.resources]\nnetwork_ingress = true\n", "t")
                .unwrap();
        assert_eq!(on.billing.meters["network.incoming.bytes"].unit.as_str(), "openstack-network-ingress-gib");
        let listed = Settings::from_toml(
            "[billing]\ndefault_plan = \"p\"\n[billing.meters.\"network.outgoing.bytes\"]\nunit = \"mine\"\nfactor = \"1\"\ncounter = \"cumulative\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(listed.billing.meters["network.outgoing.bytes"].unit.as_str(), "mine");
    }

    /// Where the commented `[keystone]` example of the default configuration begins.
    const KEYSTONE_EXAMPLE: &str = "\n# Keystone (the identity API v3)";

    #[test]
    fn the_commented_keystone_example_loads_once_uncommented() {
        let start = DEFAULT_TOML.find(KEYSTONE_EXAMPLE).unwrap();
        let example: String = DEFAULT_TOML[start..]
            .lines()
            .filter(|l| l.starts_with("# ") && !l.starts_with("# #") && !l.starts_with("# Keystone"))
            .map(|l| format!("{}\n", &l[2..]))
            .skip_while(|l| !l.starts_with("[keystone]"))
            .collect();
        let s = Settings::from_toml(&format!("{}\n{example}", &DEFAULT_TOML[..start]), "t").unwrap();
        let k = s.keystone.unwrap();
        assert!(matches!(k.auth().unwrap(), KeystoneAuth::Password { project: "service", .. }));
        assert_eq!((k.url.as_str(), k.tls_verify, k.ca_file), ("https://keystone:5000/v3", true, None));
    }

    #[test]
    fn the_commented_concertim_example_loads_once_uncommented() {
        let start = DEFAULT_TOML.find("# [concertim]").unwrap();
        let end = DEFAULT_TOML.find(KEYSTONE_EXAMPLE).unwrap();
        let example: String = DEFAULT_TOML[start..end]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .map(|l| format!("{l}\n"))
            .collect();
        let s = Settings::from_toml(&format!("{}\n{example}", &DEFAULT_TOML[..start]), "t").unwrap();
        let c = s.concertim.unwrap();
        assert_eq!((c.metrics["cpu_util"].name.as_str(), c.metrics["cpu_util"].kind.as_str()), ("cpu_load", "double"));
        assert_eq!(c.max_attempts, 20);
        let bad = format!(
            "{}\n{}",
            &DEFAULT_TOML[..start],
            example.replace("units = \"%\"", "units = \"%\"\nslope = \"up\"")
        );
        assert!(Settings::from_toml(&bad, "t")
            .unwrap_err()
            .to_string()
            .contains("concertim.metrics.\"cpu_util\".slope"));
    }

    #[test]
    fn ratio_factors_stay_exact_until_rounding() {
        let sixth: Factor = "1/6".parse().unwrap();
        assert_eq!(sixth.apply(Decimal::from(6)).unwrap(), Decimal::ONE);
        assert_eq!(sixth.apply(Decimal::ONE).unwrap().to_string(), "0.166666667");
        let mb: Factor = "1/6144".parse().unwrap();
        assert_eq!(mb.apply(Decimal::from(6144)).unwrap(), Decimal::ONE);
    }

    #[test]
    fn bad_factors_are_rejected_with_the_reason() {
        for (text, reason) in [("1/0", "divides by zero"), ("-1", "negative"), ("x", "not a number")] {
            let err = text.parse::<Factor>().unwrap_err();
            assert!(err.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_naming_the_key() {
        let err = Settings::from_toml("[billing]\ndefault_plan = \"p\"\nplann = 1\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("plann"), "{err}");
    }

    #[test]
    fn the_plan_of_an_unlisted_flavor_is_the_default_plan() {
        let s = Settings::from_toml(
            "[billing]\ndefault_plan = \"std\"\n[billing.plans]\n\"m1.large\" = \"large\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(s.billing.plan_for(Some("m1.large")).as_str(), "large");
        assert_eq!(s.billing.plan_for(Some("m1.tiny")).as_str(), "std");
        assert_eq!(s.billing.plan_for(None).as_str(), "std");
    }

    #[test]
    fn exclude_wins_over_include_and_an_empty_include_admits_all() {
        let a = ProjectId::parse("a").unwrap();
        let b = ProjectId::parse("b").unwrap();
        assert!(ProjectFilter::default().admits(&a));
        let f = ProjectFilter { exclude: vec![b.clone()], ..ProjectFilter::default() };
        assert!(f.admits(&a) && !f.admits(&b));
        let f = ProjectFilter { include: vec![a.clone()], ..ProjectFilter::default() };
        assert!(f.admits(&a) && !f.admits(&b));
    }

    #[test]
    fn a_file_naming_only_the_bus_keeps_every_other_default() {
        let s = Settings::over_defaults("[bus]\nprefix = \"site-\"\n", "f", std::iter::empty()).unwrap();
        let d = Settings::embedded();
        assert_eq!(s.bus.prefix, "site-");
        assert_eq!(s.bus.bindings.len(), d.bus.bindings.len());
        assert_eq!(s.billing.default_plan, d.billing.default_plan);
        assert_eq!(s.http.listen, d.http.listen);
        assert_eq!(s.to_toml().replace("prefix = \"site-\"", "prefix = \"\""), d.to_toml());
    }

    #[test]
    fn a_table_is_merged_into_the_defaults_and_an_array_replaces_theirs() {
        let text = "[billing.plans]\n\"m1.large\" = \"openstack-large-monthly\"\n\n[[bus.bindings]]\nexchange = \"nova\"\nrouting_key = \"notifications.info\"\n";
        let s = Settings::over_defaults(text, "f", std::iter::empty()).unwrap();
        assert_eq!(s.billing.plans.len(), 1);
        assert_eq!(s.billing.default_plan, Settings::embedded().billing.default_plan);
        assert_eq!(s.billing.resources.volume_plan, Settings::embedded().billing.resources.volume_plan);
        assert_eq!(s.bus.bindings.len(), 1, "the file's bindings are the bindings");
    }

    #[test]
    fn a_secret_from_a_file_replaces_the_defaults_value() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        std::fs::write(&file, "amqp://billing:s3cret@rabbit:5672/%2f\n").unwrap();
        #[cfg(unix)]
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let text = format!("[bus]\nurl_file = {:?}\n", file.display().to_string());
        let s = Settings::over_defaults(&text, "f", std::iter::empty()).unwrap();
        assert_eq!(s.bus.url.expose(), "amqp://billing:s3cret@rabbit:5672/%2f");
    }
}

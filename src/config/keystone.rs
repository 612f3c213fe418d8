//! `[keystone]`: the identity service the OpenStack API client authenticates against, and how.

use serde::{Deserialize, Serialize};

use super::{concertim::default_true, *};

/// Keystone (the identity API, v3): project names and the role assignments that say which
/// projects Concertim manages. Authenticates with a password or an application credential.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeystoneSettings {
    /// The identity endpoint, with its version: `https://keystone:5000/v3`.
    pub url: String,
    /// Password auth: the user's name.
    #[serde(default)]
    pub username: Option<String>,
    /// Password auth: the name of the user's domain.
    #[serde(default = "default_domain")]
    pub user_domain: String,
    /// Password auth: the user's password (or `password_file`).
    #[serde(default)]
    pub password: Option<Secret>,
    /// Password auth: the name of the project the token is scoped to.
    #[serde(default)]
    pub project: Option<String>,
    /// Password auth: the name of that project's domain.
    #[serde(default = "default_domain")]
    pub project_domain: String,
    /// Application credential auth: the credential's id (it names its user and project).
    #[serde(default)]
    pub application_credential_id: Option<String>,
    /// Application credential auth: its secret (or `application_credential_secret_file`).
    #[serde(default)]
    pub application_credential_secret: Option<Secret>,
    /// Verify Keystone's TLS certificate (against `ca_file`, or the system roots).
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// A PEM bundle of the CAs Keystone's certificate is verified against, instead of the
    /// system roots (a private cloud's own CA).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Whole-request timeout (ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Connection timeout (ms).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

/// How the client proves who it is: one of the two forms Keystone v3 takes from a service.
#[derive(Debug, Clone, Copy)]
pub enum KeystoneAuth<'a> {
    /// A user's password, the token scoped to a project, each named within its domain.
    Password {
        /// The user's name.
        username: &'a str,
        /// The name of its domain.
        user_domain: &'a str,
        /// Its password.
        password: &'a Secret,
        /// The project's name.
        project: &'a str,
        /// The name of its domain.
        project_domain: &'a str,
    },
    /// An application credential, which carries its own user and project scope.
    ApplicationCredential {
        /// Its id.
        id: &'a str,
        /// Its secret.
        secret: &'a Secret,
    },
}

pub(super) fn default_domain() -> String {
    "Default".to_owned()
}

impl KeystoneSettings {
    /// The configured way to authenticate.
    ///
    /// # Errors
    /// When neither form is complete, or both are set; the message names the keys to set.
    pub fn auth(&self) -> Result<KeystoneAuth<'_>, String> {
        let password_keys = self.username.is_some() || self.password.is_some() || self.project.is_some();
        let credential_keys = self.application_credential_id.is_some() || self.application_credential_secret.is_some();
        match (password_keys, credential_keys) {
            (true, true) => Err("keystone: set either username, password and project (password auth) or \
                 application_credential_id and application_credential_secret, not both"
                .into()),
            (false, false) => Err("keystone needs credentials: username, password and project (password auth), \
                 or application_credential_id and application_credential_secret"
                .into()),
            (true, false) => {
                let missing: Vec<&str> = [
                    ("keystone.username", self.username.as_deref().is_none_or(str::is_empty)),
                    ("keystone.password", self.password.as_ref().is_none_or(|p| p.expose().is_empty())),
                    ("keystone.project", self.project.as_deref().is_none_or(str::is_empty)),
                ]
                .into_iter()
                .filter_map(|(key, missing)| missing.then_some(key))
                .collect();
                match (&self.username, &self.password, &self.project) {
                    (Some(username), Some(password), Some(project)) if missing.is_empty() => {
                        Ok(KeystoneAuth::Password {
                            username,
                            user_domain: &self.user_domain,
                            password,
                            project,
                            project_domain: &self.project_domain,
                        })
                    }
                    _ => Err(format!("keystone password auth needs {} set", missing.join(", "))),
                }
            }
            (false, true) => match (&self.application_credential_id, &self.application_credential_secret) {
                (Some(id), Some(secret)) if !id.is_empty() && !secret.expose().is_empty() => {
                    Ok(KeystoneAuth::ApplicationCredential { id, secret })
                }
                (Some(id), _) if !id.is_empty() => {
                    Err("keystone application credential auth needs keystone.application_credential_secret set".into())
                }
                _ => Err("keystone application credential auth needs keystone.application_credential_id set".into()),
            },
        }
    }

    pub(super) fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!(
                "keystone.url {:?} must start with http:// or https:// (the identity endpoint, e.g. https://keystone:5000/v3)",
                self.url
            ));
        }
        self.auth()?;
        if self.user_domain.is_empty() || self.project_domain.is_empty() {
            return Err(
                "keystone.user_domain and keystone.project_domain must not be empty (the default is \"Default\")"
                    .into(),
            );
        }
        check_ca_file("keystone", self.ca_file.as_deref(), self.tls_verify)?;
        if self.timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return Err("keystone.timeout_ms and keystone.connect_timeout_ms must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_keystone(section: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml(
            &format!("{DEFAULT_TOML}\n[keystone]\nurl = \"https://keystone:5000/v3\"\n{section}"),
            "t.toml",
        )
    }

    #[test]
    fn password_auth_defaults_both_domains_to_default_and_never_prints_the_password() {
        let settings =
            with_keystone("username = \"billing\"\npassword = \"Sekr1t-ks\"\nproject = \"service\"\n").unwrap();
        let keystone = settings.keystone.as_ref().unwrap();
        assert!(matches!(
            keystone.auth().unwrap(),
            KeystoneAuth::Password { user_domain: "Default", project_domain: "Default", .. }
        ));
        let printed = settings.to_toml();
        assert!(printed.contains("password = \"***\"") && !printed.contains("Sekr1t-ks"), "{printed}");
        assert!(!format!("{keystone:?}").contains("Sekr1t-ks"));
    }

    #[test]
    fn each_incomplete_or_mixed_auth_is_refused_naming_what_to_set() {
        let cases = [
            ("", "username, password and project"),
            ("username = \"u\"\n", "keystone.password, keystone.project"),
            ("username = \"u\"\npassword = \"p\"\n", "keystone.project"),
            ("application_credential_id = \"ac\"\n", "keystone.application_credential_secret"),
            ("application_credential_secret = \"s\"\n", "keystone.application_credential_id"),
            ("username = \"u\"\napplication_credential_id = \"ac\"\n", "not both"),
        ];
        for (section, expected) in cases {
            let err = with_keystone(section).unwrap_err().to_string();
            assert!(err.contains(expected), "case {section:?}: {err}");
        }
    }

    #[test]
    fn a_url_without_a_scheme_and_a_ca_file_without_verification_are_refused() {
        let auth = "application_credential_id = \"ac\"\napplication_credential_secret = \"s\"\n";
        let err = Settings::from_toml(&format!("{DEFAULT_TOML}\n[keystone]\nurl = \"keystone:5000\"\n{auth}"), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("keystone.url") && err.contains("https://"), "{err}");
        let err = with_keystone(&format!("{auth}tls_verify = false\nca_file = \"/nonexistent.pem\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("keystone.ca_file") && err.contains("tls_verify"), "{err}");
        let err = with_keystone(&format!("{auth}ca_file = \"/nonexistent.pem\"\n")).unwrap_err().to_string();
        assert!(err.contains("keystone.ca_file: cannot read /nonexistent.pem"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn the_application_credential_secret_may_come_from_a_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ac-secret");
        std::fs::write(&file, "FromTheFile\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let settings = with_keystone(&format!(
            "application_credential_id = \"ac\"\napplication_credential_secret_file = {:?}\n",
            file.display().to_string()
        ))
        .unwrap();
        let keystone = settings.keystone.unwrap();
        assert!(matches!(
            keystone.auth().unwrap(),
            KeystoneAuth::ApplicationCredential { id: "ac", secret } if secret.expose() == "FromTheFile"
        ));
    }
}

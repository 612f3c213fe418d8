//! The Keystone v3 client: the first piece of the OpenStack API client, for what the bus
//! cannot say (a project's name, which projects a user holds a role on).
//!
//! A token is issued by `POST {url}/auth/tokens` (password or application credential auth);
//! it comes back in the `X-Subject-Token` header and its expiry in `token.expires_at`. It is
//! reused until [`EXPIRY_MARGIN`] before that expiry, or until a call answers 401; then one new
//! token (shared by every caller that saw the same token fail) and the call again, whose answer
//! is the one used. A 401 to the token request itself is wrong credentials, permanent.
//!
//! Lists are read page by page along `links.next`, only while it stays on the origin of
//! `keystone.url`: a link elsewhere would carry the token to another host. Redirects are never
//! followed and bodies are read up to [`crate::outbound::MAX_BODY_BYTES`], as every outbound
//! client. It knows nothing of billing or of the bus.

use std::{
    collections::{BTreeSet, HashSet},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use reqwest::{StatusCode, Url};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Value};

use crate::{
    class::ErrorClass,
    config::{KeystoneAuth, KeystoneSettings},
    event::{ProjectId, RoleId, Timestamp, UserId},
};

/// How long before its `expires_at` a token is renewed rather than used: longer than a request
/// may take (the default timeout is 10 s), so a token never expires in flight.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

/// A Keystone failure.
#[derive(Debug, thiserror::Error)]
pub enum KeystoneError {
    /// Keystone could not be reached or did not answer in time.
    #[error("{what}: {source}")]
    Http {
        /// The operation.
        what: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// Keystone's TLS certificate is not signed by a trusted CA (or names another host).
    #[error("{what}: Keystone's TLS certificate was not trusted ({reason}); set keystone.ca_file to the PEM bundle of the CA that signed it")]
    Untrusted {
        /// The operation.
        what: String,
        /// The TLS verifier's verdict (`invalid peer certificate: UnknownIssuer`).
        reason: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The token request was refused: the configured credentials are wrong.
    #[error("{what}: Keystone refused the credentials (HTTP {status}); check {keys}: {body}")]
    Credentials {
        /// The operation.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The settings to check.
        keys: &'static str,
        /// Keystone's answer (bounded; it never holds the password).
        body: String,
    },
    /// Keystone refused; its answer is kept.
    #[error("{what}: HTTP {status}: {body}")]
    Status {
        /// The operation.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The response body (bounded).
        body: String,
    },
    /// Keystone answered with a redirect, which is never followed (it would carry the token
    /// elsewhere): `keystone.url` is not the identity endpoint itself.
    #[error("{what}: HTTP {status} redirecting to {location}: redirects are never followed; set keystone.url to the identity endpoint itself")]
    Redirected {
        /// The operation.
        what: String,
        /// The HTTP status.
        status: u16,
        /// Where it pointed.
        location: String,
    },
    /// A list's `links.next` points to another origin than `keystone.url`; it is not followed.
    #[error("{what}: the next page is on another origin ({next}) than keystone.url; not followed")]
    ForeignLink {
        /// The operation.
        what: String,
        /// The link.
        next: String,
    },
    /// Keystone answered something that is not its protocol.
    #[error("{what}: {detail}")]
    Protocol {
        /// The operation.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// The client cannot be built from the settings (an unreadable `ca_file`).
    #[error("keystone: {detail}")]
    Setup {
        /// What is wrong and which key to fix.
        detail: String,
    },
}

impl KeystoneError {
    /// The failure class: connection errors, 408, 429 and 5xx are transient; wrong
    /// credentials, an untrusted certificate, other refusals and unreadable answers permanent.
    pub fn class(&self) -> ErrorClass {
        match self {
            KeystoneError::Http { .. } => ErrorClass::Transient,
            KeystoneError::Status { status, .. } if *status >= 500 || *status == 429 || *status == 408 => {
                ErrorClass::Transient
            }
            KeystoneError::Status { .. }
            | KeystoneError::Untrusted { .. }
            | KeystoneError::Credentials { .. }
            | KeystoneError::Redirected { .. }
            | KeystoneError::ForeignLink { .. }
            | KeystoneError::Protocol { .. }
            | KeystoneError::Setup { .. } => ErrorClass::Permanent,
        }
    }
}

/// A Keystone project.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Project {
    /// Its id.
    pub id: ProjectId,
    /// Its name (unique within its domain).
    pub name: String,
    /// The id of its domain.
    pub domain_id: String,
}

/// A token and when it stops being valid.
#[derive(Clone, PartialEq, Eq)]
struct Token {
    value: String,
    /// `expires_at`, in seconds since the epoch.
    expires: i64,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a bearer credential: never in a log line.
        f.debug_struct("Token").field("value", &"***").field("expires", &self.expires).finish()
    }
}

impl Token {
    /// Usable at `now` (seconds since the epoch): not within [`EXPIRY_MARGIN`] of its expiry.
    fn is_fresh_at(&self, now: i64) -> bool {
        now.saturating_add(EXPIRY_MARGIN.as_secs() as i64) < self.expires
    }

    fn is_fresh(&self) -> bool {
        self.is_fresh_at(time::OffsetDateTime::now_utc().unix_timestamp())
    }
}

/// An answer: status and body.
struct Answer {
    status: StatusCode,
    body: String,
}

/// The Keystone v3 client. Cheap to share: one connection pool, one token.
#[derive(Debug)]
pub struct Keystone {
    http: reqwest::Client,
    /// `keystone.url` without a trailing slash; paths are appended to it.
    base: String,
    /// The origin every followed link must keep.
    origin: reqwest::Url,
    settings: KeystoneSettings,
    token: std::sync::Mutex<Option<Token>>,
    renewal: tokio::sync::Mutex<()>,
    issued: AtomicUsize,
}

impl Keystone {
    /// A client for the configured Keystone. Issues no token yet.
    ///
    /// # Errors
    /// When `keystone.url` is not a URL, `keystone.ca_file` cannot be read or holds no
    /// certificate, the credentials are incomplete, or the HTTP client cannot be built.
    pub fn new(settings: KeystoneSettings) -> Result<Self, KeystoneError> {
        settings.auth().map_err(|detail| KeystoneError::Setup { detail })?;
        let base = settings.url.trim_end_matches('/').to_owned();
        let origin = Url::parse(&base).map_err(|e| KeystoneError::Setup {
            detail: format!("keystone.url {:?} is not a URL: {e}", settings.url),
        })?;
        let builder = crate::outbound::client(
            Duration::from_millis(settings.timeout_ms),
            Duration::from_millis(settings.connect_timeout_ms),
        );
        let mut builder = crate::outbound::trusting(builder, "keystone.ca_file", settings.ca_file.as_deref())
            .map_err(|detail| KeystoneError::Setup { detail })?;
        if !settings.tls_verify {
            // Loud on purpose: the password and the tokens go to whoever answers.
            tracing::warn!(url = %settings.url, "keystone.tls_verify = false: Keystone's certificate is not verified");
            metrics::gauge!(crate::telemetry::TLS_UNVERIFIED).set(1.0);
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder.build().map_err(|source| KeystoneError::Setup {
            detail: format!("cannot build the HTTP client: {}", crate::class::chain(&source)),
        })?;
        Ok(Self {
            http,
            base,
            origin,
            settings,
            token: std::sync::Mutex::new(None),
            renewal: tokio::sync::Mutex::new(()),
            issued: AtomicUsize::new(0),
        })
    }

    /// Tokens issued so far (token requests Keystone accepted).
    pub fn tokens_issued(&self) -> usize {
        self.issued.load(Ordering::Relaxed)
    }

    /// The project `id`, or `None` when Keystone does not know it.
    ///
    /// # Errors
    /// When Keystone cannot be reached, refuses, or answers something unreadable.
    pub async fn project(&self, id: &ProjectId) -> Result<Option<Project>, KeystoneError> {
        #[derive(Deserialize)]
        struct Body {
            project: Project,
        }
        let what = format!("read Keystone project {id}");
        // A `ProjectId` holds only `[A-Za-z0-9._:@-]`: it is one path segment as it is.
        let url = self.url(&what, &format!("/projects/{id}"), &[])?;
        let answer = self.call(&what, url).await?;
        match answer.status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(Some(read::<Body>(&what, &answer.body)?.project)),
            s => Err(refused(&what, s, &answer.body)),
        }
    }

    /// Every project, or those named `name`, across all pages.
    ///
    /// # Errors
    /// As [`Keystone::project`], or when a page links to another origin.
    pub async fn projects(&self, name: Option<&str>) -> Result<Vec<Project>, KeystoneError> {
        let what = match name {
            Some(name) => format!("list Keystone projects named {name:?}"),
            None => "list Keystone projects".to_owned(),
        };
        let query: Vec<(&str, &str)> = name.map(|n| ("name", n)).into_iter().collect();
        let url = self.url(&what, "/projects", &query)?;
        self.list(&what, url, "projects").await
    }

    /// The id of the user `name` in the domain whose id is `domain_id` (`default` for the
    /// Default domain), or `None` when there is none.
    ///
    /// # Errors
    /// As [`Keystone::projects`].
    pub async fn user_id(&self, name: &str, domain_id: &str) -> Result<Option<UserId>, KeystoneError> {
        let what = format!("find Keystone user {name:?} in domain {domain_id:?}");
        let url = self.url(&what, "/users", &[("name", name), ("domain_id", domain_id)])?;
        let users: Vec<Named> = self.list(&what, url, "users").await?;
        users
            .into_iter()
            .find(|u| u.name == name)
            .map(|u| {
                UserId::parse(u.id).map_err(|e| KeystoneError::Protocol { what: what.clone(), detail: e.to_string() })
            })
            .transpose()
    }

    /// The id of the role `name`, or `None` when there is none. A global role is preferred to
    /// a domain's role of the same name.
    ///
    /// # Errors
    /// As [`Keystone::projects`].
    pub async fn role_id(&self, name: &str) -> Result<Option<RoleId>, KeystoneError> {
        let what = format!("find Keystone role {name:?}");
        let url = self.url(&what, "/roles", &[("name", name)])?;
        let mut roles: Vec<Named> = self.list(&what, url, "roles").await?;
        roles.retain(|r| r.name == name);
        roles.sort_by_key(|r| r.domain_id.is_some());
        roles
            .into_iter()
            .next()
            .map(|r| RoleId::parse(r.id))
            .transpose()
            .map_err(|e| KeystoneError::Protocol { what, detail: format!("a role id: {e}") })
    }

    /// `managed` with its user and role as ids: the names it gives resolved (`user_name` in
    /// `user_domain`, `role_name`).
    ///
    /// # Errors
    /// As [`Keystone::projects`]; [`KeystoneError::Setup`] naming the key when Keystone has no
    /// such user or role.
    pub async fn resolve(&self, managed: &crate::config::ManagedBy) -> Result<crate::config::ManagedBy, KeystoneError> {
        let mut resolved = managed.clone();
        if let (None, Some(name)) = (&managed.user, &managed.user_name) {
            let id = self.user_id(name, &managed.user_domain).await?.ok_or_else(|| KeystoneError::Setup {
                detail: format!(
                    "projects.managed_by.user_name: Keystone has no user {name:?} in domain {:?} (user_domain is the domain's id)",
                    managed.user_domain
                ),
            })?;
            resolved.user = Some(id);
            resolved.user_name = None;
        }
        if let (None, Some(name)) = (&managed.role, &managed.role_name) {
            let id = self.role_id(name).await?.ok_or_else(|| KeystoneError::Setup {
                detail: format!("projects.managed_by.role_name: Keystone has no role {name:?}"),
            })?;
            resolved.role = Some(id);
            resolved.role_name = None;
        }
        Ok(resolved)
    }

    /// The projects `scope` admits now: those on which its `managed_by` user holds its role,
    /// and those whose name matches its `include_names`, less what its include/exclude lists
    /// leave out; each once, in id order.
    ///
    /// # Errors
    /// As [`Keystone::projects`].
    pub async fn managed_projects(
        &self,
        scope: &crate::config::ProjectFilter,
    ) -> Result<Vec<ProjectId>, KeystoneError> {
        let mut projects = Vec::new();
        if let Some(managed) = &scope.managed_by {
            let managed = self.resolve(managed).await?;
            if let (Some(user), Some(role)) = (&managed.user, &managed.role) {
                projects.extend(self.role_assignments(user, role).await?);
            }
        }
        if !scope.include_names.is_empty() {
            projects
                .extend(self.projects(None).await?.into_iter().filter(|p| scope.name_admits(&p.name)).map(|p| p.id));
        }
        projects.sort();
        projects.dedup();
        projects.retain(|p| scope.admits(p));
        Ok(projects)
    }

    /// The projects on which `user` holds `role` directly, each once, in id order.
    ///
    /// FIXME(keystone): the query has no `effective`, so a role held through a group or
    /// inherited from a domain is not seen: such a project is not admitted.
    ///
    /// # Errors
    /// As [`Keystone::projects`], or when an assignment names an unreadable project id.
    pub async fn role_assignments(&self, user: &UserId, role: &RoleId) -> Result<Vec<ProjectId>, KeystoneError> {
        #[derive(Deserialize)]
        struct Assignment {
            #[serde(default)]
            scope: Option<Scope>,
        }
        #[derive(Deserialize)]
        struct Scope {
            #[serde(default)]
            project: Option<Id>,
        }
        #[derive(Deserialize)]
        struct Id {
            id: String,
        }
        let what = format!("list Keystone role assignments of user {user} with role {}", role.as_str());
        let url = self.url(&what, "/role_assignments", &[("user.id", user.as_str()), ("role.id", role.as_str())])?;
        let assignments: Vec<Assignment> = self.list(&what, url, "role_assignments").await?;
        let mut projects = BTreeSet::new();
        // Domain-scoped assignments carry no project: nothing to bill there.
        for id in assignments.into_iter().filter_map(|a| a.scope?.project) {
            let project = ProjectId::parse(id.id)
                .map_err(|e| KeystoneError::Protocol { what: what.clone(), detail: e.to_string() })?;
            projects.insert(project);
        }
        Ok(projects.into_iter().collect())
    }

    /// `{url}{path}?{query}`.
    fn url(&self, what: &str, path: &str, query: &[(&str, &str)]) -> Result<Url, KeystoneError> {
        let url = format!("{}{path}", self.base);
        // `parse_with_params` with no pairs would leave an empty `?` on the URL.
        let url = if query.is_empty() { Url::parse(&url) } else { Url::parse_with_params(&url, query) };
        url.map_err(|e| KeystoneError::Protocol { what: what.to_owned(), detail: format!("cannot build the URL: {e}") })
    }

    fn current(&self) -> Option<Token> {
        self.token.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// A usable token: the current one while fresh and not `failed`, else a new one. Callers
    /// that saw the same token fail wait for one renewal and share it.
    async fn token(&self, failed: Option<&Token>) -> Result<Token, KeystoneError> {
        let usable = |t: &Token| t.is_fresh() && Some(t) != failed;
        if let Some(token) = self.current().filter(usable) {
            return Ok(token);
        }
        let _one_at_a_time = self.renewal.lock().await;
        if let Some(token) = self.current().filter(usable) {
            return Ok(token);
        }
        let token = self.issue().await?;
        *self.token.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(token.clone());
        Ok(token)
    }

    /// `POST /auth/tokens`.
    async fn issue(&self) -> Result<Token, KeystoneError> {
        #[derive(Deserialize)]
        struct Body {
            token: Issued,
        }
        #[derive(Deserialize)]
        struct Issued {
            expires_at: String,
        }
        // `new` checked the credentials, so `auth` cannot fail here; it is matched anyway.
        let auth = self.settings.auth().map_err(|detail| KeystoneError::Setup { detail })?;
        let (what, keys) = match auth {
            KeystoneAuth::Password { username, user_domain, project, project_domain, .. } => (
                format!(
                    "issue a Keystone token for user {username} (domain {user_domain}) on project {project} (domain {project_domain})"
                ),
                "keystone.username, keystone.password, keystone.user_domain, keystone.project and keystone.project_domain",
            ),
            KeystoneAuth::ApplicationCredential { id, .. } => (
                format!("issue a Keystone token for application credential {id}"),
                "keystone.application_credential_id and keystone.application_credential_secret",
            ),
        };
        let url = self.url(&what, "/auth/tokens", &[])?;
        let response = self
            .http
            .post(url)
            .header("Accept", "application/json")
            .json(&auth_body(&auth))
            .send()
            .await
            .map_err(|source| http_error(&what, source))?;
        let status = response.status();
        if let Some(location) = crate::outbound::redirect_target(&response) {
            return Err(KeystoneError::Redirected { what, status: status.as_u16(), location });
        }
        let header = response.headers().get("x-subject-token").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = read_body(&what, response).await?;
        if status == StatusCode::UNAUTHORIZED {
            return Err(KeystoneError::Credentials { what, status: status.as_u16(), keys, body: bounded(&body) });
        }
        if !status.is_success() {
            return Err(refused(&what, status, &body));
        }
        let value = header.filter(|h| !h.is_empty()).ok_or_else(|| KeystoneError::Protocol {
            what: what.clone(),
            detail: format!("HTTP {status} without an X-Subject-Token header"),
        })?;
        let expires_at = read::<Body>(&what, &body)?.token.expires_at;
        let expires = Timestamp::parse(&expires_at)
            .map_err(|e| KeystoneError::Protocol { what: what.clone(), detail: format!("token.expires_at: {e}") })?
            .unix();
        self.issued.fetch_add(1, Ordering::Relaxed);
        Ok(Token { value, expires })
    }

    async fn send(&self, what: &str, url: Url, token: &Token) -> Result<Answer, KeystoneError> {
        let response = self
            .http
            .get(url)
            .header("Accept", "application/json")
            .header("X-Auth-Token", &token.value)
            .send()
            .await
            .map_err(|source| http_error(what, source))?;
        let status = response.status();
        if let Some(location) = crate::outbound::redirect_target(&response) {
            return Err(KeystoneError::Redirected { what: what.to_owned(), status: status.as_u16(), location });
        }
        let body = read_body(what, response).await?;
        Ok(Answer { status, body })
    }

    /// One authenticated `GET`; a 401 costs one new token and the call again, whose answer
    /// stands (a second 401 is permanent).
    async fn call(&self, what: &str, url: Url) -> Result<Answer, KeystoneError> {
        let token = self.token(None).await?;
        let answer = self.send(what, url.clone(), &token).await?;
        if answer.status != StatusCode::UNAUTHORIZED {
            return Ok(answer);
        }
        let token = self.token(Some(&token)).await?;
        let answer = self.send(what, url, &token).await?;
        if answer.status == StatusCode::UNAUTHORIZED {
            return Err(refused(&format!("{what} (with a token just issued)"), answer.status, &answer.body));
        }
        Ok(answer)
    }

    /// Every item under `key` of the list at `url` and of the pages after it.
    async fn list<T: DeserializeOwned>(&self, what: &str, url: Url, key: &str) -> Result<Vec<T>, KeystoneError> {
        let mut items = Vec::new();
        let mut read_pages = HashSet::new();
        let mut next = Some(url);
        while let Some(url) = next.take() {
            if !read_pages.insert(url.to_string()) {
                return Err(KeystoneError::Protocol {
                    what: what.to_owned(),
                    detail: format!("links.next leads back to a page already read ({url})"),
                });
            }
            let answer = self.call(what, url).await?;
            if !answer.status.is_success() {
                return Err(refused(what, answer.status, &answer.body));
            }
            let page = read_page::<T>(what, &answer.body, key)?;
            items.extend(page.items);
            next = page.next.map(|link| same_origin(&self.origin, what, &link)).transpose()?;
        }
        Ok(items)
    }
}

/// A user or a role as lists show them.
#[derive(Debug, Deserialize)]
struct Named {
    id: String,
    name: String,
    #[serde(default)]
    domain_id: Option<String>,
}

/// The v3 body of a token request for `auth`.
fn auth_body(auth: &KeystoneAuth<'_>) -> Value {
    match auth {
        KeystoneAuth::Password { username, user_domain, password, project, project_domain } => json!({
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {"user": {"name": username, "domain": {"name": user_domain}, "password": password.expose()}}
                },
                "scope": {"project": {"name": project, "domain": {"name": project_domain}}}
            }
        }),
        // An application credential is scoped already: a scope in the request is refused.
        KeystoneAuth::ApplicationCredential { id, secret } => json!({
            "auth": {
                "identity": {
                    "methods": ["application_credential"],
                    "application_credential": {"id": id, "secret": secret.expose()}
                }
            }
        }),
    }
}

/// One page of a list: its items and the link to the next page.
#[derive(Debug)]
struct Page<T> {
    items: Vec<T>,
    next: Option<String>,
}

fn read_page<T: DeserializeOwned>(what: &str, body: &str, key: &str) -> Result<Page<T>, KeystoneError> {
    #[derive(Deserialize, Default)]
    struct Links {
        #[serde(default)]
        next: Option<String>,
    }
    let protocol = |detail: String| KeystoneError::Protocol { what: what.to_owned(), detail };
    let mut body: serde_json::Map<String, Value> = read(what, body)?;
    let items = body.remove(key).ok_or_else(|| protocol(format!("the answer has no {key:?} list")))?;
    let items: Vec<T> = serde_json::from_value(items).map_err(|e| protocol(format!("unreadable {key:?} ({e})")))?;
    let links: Links = match body.remove("links") {
        Some(links) => serde_json::from_value(links).map_err(|e| protocol(format!("unreadable links ({e})")))?,
        None => Links::default(),
    };
    let next = links.next.filter(|n| !n.is_empty());
    // Keystone cuts a list at its `[DEFAULT] list_limit` and says so; what is missing would
    // silently be missing.
    if next.is_none() && body.get("truncated").and_then(Value::as_bool) == Some(true) {
        return Err(protocol(format!(
            "Keystone truncated the {key:?} list (its list_limit) without a next page: raise list_limit"
        )));
    }
    Ok(Page { items, next })
}

/// `link` resolved against `origin`, when it stays on that origin (scheme, host and port).
fn same_origin(origin: &Url, what: &str, link: &str) -> Result<Url, KeystoneError> {
    let next = origin.join(link).map_err(|e| KeystoneError::Protocol {
        what: what.to_owned(),
        detail: format!("links.next {link:?} is not a URL: {e}"),
    })?;
    if next.origin() != origin.origin() {
        return Err(KeystoneError::ForeignLink { what: what.to_owned(), next: link.chars().take(300).collect() });
    }
    Ok(next)
}

fn read<T: DeserializeOwned>(what: &str, body: &str) -> Result<T, KeystoneError> {
    serde_json::from_str(body).map_err(|e| KeystoneError::Protocol {
        what: what.to_owned(),
        detail: format!("unreadable answer ({e}): {}", body.chars().take(300).collect::<String>()),
    })
}

/// A connection error; an untrusted certificate is its own, permanent, error.
fn http_error(what: &str, source: reqwest::Error) -> KeystoneError {
    match crate::outbound::untrusted(&source) {
        Some(reason) => KeystoneError::Untrusted { what: what.to_owned(), reason, source },
        None => KeystoneError::Http { what: what.to_owned(), source },
    }
}

/// An answer's body, read up to the shared limit.
async fn read_body(what: &str, response: reqwest::Response) -> Result<String, KeystoneError> {
    crate::outbound::text(response, crate::outbound::MAX_BODY_BYTES).await.map_err(|e| match e {
        crate::outbound::BodyError::Http(source) => KeystoneError::Http { what: what.to_owned(), source },
        e @ crate::outbound::BodyError::TooLarge { .. } => {
            KeystoneError::Protocol { what: what.to_owned(), detail: e.to_string() }
        }
    })
}

fn bounded(body: &str) -> String {
    body.chars().take(2000).collect()
}

fn refused(what: &str, status: StatusCode, body: &str) -> KeystoneError {
    KeystoneError::Status { what: what.to_owned(), status: status.as_u16(), body: bounded(body) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn server_errors_and_429_are_transient_other_refusals_permanent() {
        let cases = [(500, ErrorClass::Transient), (503, ErrorClass::Transient), (429, ErrorClass::Transient)]
            .into_iter()
            .chain([(401, ErrorClass::Permanent), (403, ErrorClass::Permanent), (404, ErrorClass::Permanent)]);
        for (status, class) in cases {
            let e = refused("x", StatusCode::from_u16(status).unwrap(), "");
            assert_eq!(e.class(), class, "HTTP {status}");
        }
        let credentials = KeystoneError::Credentials { what: "x".into(), status: 401, keys: "k", body: String::new() };
        assert_eq!(credentials.class(), ErrorClass::Permanent);
        assert_eq!(KeystoneError::ForeignLink { what: "x".into(), next: "n".into() }.class(), ErrorClass::Permanent);
    }

    #[test]
    fn a_token_within_the_margin_of_its_expiry_is_not_fresh() {
        let token = Token { value: "t".into(), expires: 1_000 };
        let margin = EXPIRY_MARGIN.as_secs() as i64;
        assert!(token.is_fresh_at(1_000 - margin - 1));
        assert!(!token.is_fresh_at(1_000 - margin));
        assert!(!token.is_fresh_at(1_000));
        assert!(!format!("{token:?}").contains("\"t\""), "the token value is never printed");
    }

    #[test]
    fn keystones_expires_at_reads_as_a_timestamp() {
        let at = Timestamp::parse("2015-11-06T15:32:17.893769Z").unwrap();
        assert_eq!(at.unix(), 1_446_823_937);
    }

    #[test]
    fn password_auth_names_user_and_project_within_their_domains() {
        let password = Secret::new("p");
        let auth = KeystoneAuth::Password {
            username: "billing",
            user_domain: "Default",
            password: &password,
            project: "service",
            project_domain: "Ops",
        };
        let body = auth_body(&auth);
        assert_eq!(body["auth"]["identity"]["methods"], json!(["password"]));
        assert_eq!(
            body["auth"]["identity"]["password"]["user"],
            json!({"name": "billing", "domain": {"name": "Default"}, "password": "p"})
        );
        assert_eq!(body["auth"]["scope"], json!({"project": {"name": "service", "domain": {"name": "Ops"}}}));
    }

    #[test]
    fn application_credential_auth_carries_no_scope() {
        let secret = Secret::new("s");
        let body = auth_body(&KeystoneAuth::ApplicationCredential { id: "ac", secret: &secret });
        assert_eq!(
            body,
            json!({"auth": {"identity": {"methods": ["application_credential"], "application_credential": {"id": "ac", "secret": "s"}}}})
        );
    }

    #[test]
    fn paths_are_appended_to_the_endpoint_and_queries_encoded() {
        let settings: KeystoneSettings = toml::from_str(
            "url = \"https://keystone:5000/v3/\"\napplication_credential_id = \"ac\"\napplication_credential_secret = \"s\"\n",
        )
        .unwrap();
        let keystone = Keystone::new(settings).unwrap();
        assert_eq!(keystone.url("x", "/auth/tokens", &[]).unwrap().as_str(), "https://keystone:5000/v3/auth/tokens");
        assert_eq!(
            keystone.url("x", "/users", &[("name", "a b&c"), ("domain_id", "default")]).unwrap().as_str(),
            "https://keystone:5000/v3/users?name=a+b%26c&domain_id=default"
        );
    }

    #[test]
    fn a_next_link_is_followed_only_on_the_origin_of_the_endpoint() {
        let origin = Url::parse("https://keystone:5000/v3").unwrap();
        let cases = [
            ("https://keystone:5000/v3/projects?marker=a", true),
            ("/v3/projects?marker=a", true),
            ("https://elsewhere:5000/v3/projects?marker=a", false),
            ("http://keystone:5000/v3/projects?marker=a", false),
            ("https://keystone:5001/v3/projects?marker=a", false),
        ];
        for (link, followed) in cases {
            let next = same_origin(&origin, "list", link);
            assert_eq!(next.is_ok(), followed, "{link}: {next:?}");
            if !followed {
                assert!(matches!(next, Err(KeystoneError::ForeignLink { .. })), "{link}");
            }
        }
    }

    #[test]
    fn a_page_without_its_list_or_truncated_without_a_next_link_is_refused() {
        let first = read_page::<Named>("list", r#"{"roles": [], "links": {"next": null}}"#, "roles").unwrap();
        assert!(first.items.is_empty() && first.next.is_none());
        let missing = read_page::<Named>("list", r#"{"links": {}}"#, "roles").unwrap_err().to_string();
        assert!(missing.contains("no \"roles\" list"), "{missing}");
        let truncated =
            read_page::<Named>("list", r#"{"roles": [], "truncated": true}"#, "roles").unwrap_err().to_string();
        assert!(truncated.contains("list_limit"), "{truncated}");
    }
}

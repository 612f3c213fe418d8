//! The Concertim HTTP client: the Rails API (`/api/v1`) and the metric reporting daemon
//! (`/mrd`), as `reference/original-service.md` §4 describes them.
//!
//! Login is `POST /users/sign_in.json`; the JWT comes back in the `Authorization` response
//! header and is sent verbatim on every other call. The token is reused until its `exp` claim
//! passes or a call answers 401; then one re-login (shared by every caller that saw the same
//! token fail) and the call is made again, and that second answer is the one used.
//! Connection errors, timeouts, 408, 429 and 5xx are transient; other refusals are permanent,
//! with 422 "can't be blank" named as a missing field, and so is a certificate not trusted
//! (naming `concertim.ca_file`).

use std::time::Duration;

use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde::{de::DeserializeOwned, Deserialize, Deserializer};
use serde_json::Value;

use super::MetricValue;
use crate::{class::ErrorClass, config::ConcertimSettings};

/// A Concertim failure.
#[derive(Debug, thiserror::Error)]
pub enum ConcertimError {
    /// Concertim could not be reached or did not answer in time.
    #[error("{what}: {source}")]
    Http {
        /// The operation.
        what: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// Concertim's TLS certificate is not signed by a trusted CA (or names another host).
    #[error("{what}: Concertim's TLS certificate was not trusted ({reason}); set concertim.ca_file to the PEM bundle of the CA that signed it")]
    Untrusted {
        /// The operation.
        what: String,
        /// The TLS verifier's verdict (`invalid peer certificate: UnknownIssuer`).
        reason: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// Concertim refused; its answer is kept for the dead-letter reason.
    #[error("{what}: HTTP {status}: {body}")]
    Status {
        /// The operation.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The response body (bounded).
        body: String,
    },
    /// A 422 naming a blank field: the update lacks something Rails requires.
    #[error("{what}: a required field is missing (HTTP 422): {body}")]
    MissingField {
        /// The operation.
        what: String,
        /// The response body (bounded).
        body: String,
    },
    /// Concertim answered with a redirect, which is never followed (it would carry the login
    /// and the token elsewhere): `concertim.url` is not the app's own address.
    #[error("{what}: HTTP {status} redirecting to {location}: redirects are never followed; set concertim.url to the app's own address")]
    Redirected {
        /// The operation.
        what: String,
        /// The HTTP status.
        status: u16,
        /// Where it pointed.
        location: String,
    },
    /// Concertim answered something that is not its protocol.
    #[error("{what}: {detail}")]
    Protocol {
        /// The operation.
        what: String,
        /// What was wrong.
        detail: String,
    },
}

impl ConcertimError {
    /// The failure class, which decides between retry and dead-letter.
    pub fn class(&self) -> ErrorClass {
        match self {
            ConcertimError::Http { .. } => ErrorClass::Transient,
            ConcertimError::Status { status, .. } if *status >= 500 || *status == 429 || *status == 408 => {
                ErrorClass::Transient
            }
            ConcertimError::Status { .. }
            | ConcertimError::MissingField { .. }
            | ConcertimError::Protocol { .. }
            | ConcertimError::Untrusted { .. }
            | ConcertimError::Redirected { .. } => ErrorClass::Permanent,
        }
    }
}

/// A Rails record id (an integer; read leniently as text).
pub type RecordId = String;

fn record_id<'de, D: Deserializer<'de>>(d: D) -> Result<RecordId, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!("id {other} is neither a number nor a string"))),
    }
}

fn metadata_text(metadata: &Value, key: &str) -> Option<String> {
    match metadata.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// A team, as `GET /api/v1/teams` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct Team {
    /// The team's id.
    #[serde(deserialize_with = "record_id")]
    pub id: RecordId,
    /// The OpenStack project it is linked to.
    #[serde(default)]
    pub project_id: Option<String>,
    /// Its billing account.
    #[serde(default)]
    pub billing_acct_id: Option<String>,
}

/// A rack or a device: its id, status and metadata.
#[derive(Debug, Clone, Deserialize)]
pub struct Item {
    /// The record's id.
    #[serde(deserialize_with = "record_id")]
    pub id: RecordId,
    /// Its status.
    #[serde(default)]
    pub status: Option<String>,
    /// Its metadata (`openstack_instance_id`, `openstack_stack_id`, …).
    #[serde(default)]
    pub metadata: Value,
    /// Its cost as Concertim shows it: a device's decimal (`"12.5"`), a rack's `"%.2f"`. `None`
    /// when absent or unreadable, so that the next cost written replaces it.
    #[serde(default, deserialize_with = "lenient_cost")]
    pub cost: Option<rust_decimal::Decimal>,
    /// A device's place: the rack it is in.
    #[serde(default)]
    pub location: Option<Location>,
    /// A rack's owning team.
    #[serde(default)]
    pub owner: Option<Owner>,
}

/// Where a device is.
#[derive(Debug, Clone, Deserialize)]
pub struct Location {
    /// The rack's record id.
    #[serde(default, deserialize_with = "opt_record_id")]
    pub rack_id: Option<RecordId>,
}

/// Who owns a rack: its team, as `GET /api/v1/racks` renders it.
#[derive(Debug, Clone, Deserialize)]
pub struct Owner {
    /// The team's record id.
    #[serde(default, deserialize_with = "opt_record_id")]
    pub id: Option<RecordId>,
}

fn opt_record_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RecordId>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        Value::Number(n) => Ok(Some(n.to_string())),
        other => Err(serde::de::Error::custom(format!("id {other} is neither a number nor a string"))),
    }
}

fn lenient_cost<'de, D: Deserializer<'de>>(d: D) -> Result<Option<rust_decimal::Decimal>, D::Error> {
    let text = match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        _ => return Ok(None),
    };
    let text = text.trim();
    Ok(text.parse().ok().or_else(|| rust_decimal::Decimal::from_scientific(text).ok()))
}

impl Item {
    /// A metadata value as text, when set.
    pub fn metadata(&self, key: &str) -> Option<String> {
        metadata_text(&self.metadata, key)
    }
}

/// A Concertim client. Cheap to share: one connection pool, one token.
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    settings: ConcertimSettings,
    token: std::sync::Mutex<Option<Token>>,
    login: tokio::sync::Mutex<()>,
    logins: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    header: String,
    /// The `exp` claim, when the token carries one.
    expires: Option<i64>,
}

/// Seconds before `exp` at which a token is renewed rather than used.
const EXPIRY_MARGIN_S: i64 = 30;

impl Token {
    fn new(header: String) -> Self {
        let expires = header
            .trim_start_matches("Bearer ")
            .split('.')
            .nth(1)
            .and_then(|payload| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()
            })
            .and_then(|json| serde_json::from_slice::<Value>(&json).ok())
            .and_then(|claims| claims.get("exp")?.as_i64());
        Self { header, expires }
    }

    fn is_fresh(&self) -> bool {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.expires.is_none_or(|exp| exp - EXPIRY_MARGIN_S > now)
    }
}

/// An answer: status and body.
struct Answer {
    status: StatusCode,
    body: String,
}

impl Client {
    /// A client for the configured server.
    ///
    /// # Errors
    /// When `concertim.ca_file` cannot be read or holds no certificate (checked at config
    /// load), or the HTTP client cannot be built (TLS roots unavailable).
    pub fn new(settings: ConcertimSettings) -> Result<Self, ConcertimError> {
        if !settings.tls_verify {
            // Loud on purpose: the login password and the token go to whoever answers.
            tracing::warn!(url = %settings.url, "concertim.tls_verify = false: Concertim's certificate is not verified");
            metrics::gauge!(crate::telemetry::TLS_UNVERIFIED).set(1.0);
        }
        let http = crate::outbound::client(
            Duration::from_millis(settings.timeout_ms),
            Duration::from_millis(settings.connect_timeout_ms),
        );
        let http = crate::outbound::trusting(http, "concertim.ca_file", settings.ca_file.as_deref())
            .map_err(|detail| ConcertimError::Protocol { what: "configure Concertim".into(), detail })?
            .danger_accept_invalid_certs(!settings.tls_verify)
            .build()
            .map_err(|source| ConcertimError::Http { what: "building the HTTP client".into(), source })?;
        Ok(Self {
            http,
            base: settings.url.trim_end_matches('/').to_owned(),
            settings,
            token: std::sync::Mutex::new(None),
            login: tokio::sync::Mutex::new(()),
            logins: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Logins made so far.
    pub fn logins(&self) -> usize {
        self.logins.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn current(&self) -> Option<Token> {
        self.token.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// A usable token: the current one while fresh and not `failed`, else a new login. Callers
    /// that saw the same token fail share one login.
    async fn token(&self, failed: Option<&Token>) -> Result<Token, ConcertimError> {
        if let Some(token) = self.current().filter(|t| t.is_fresh() && Some(t) != failed) {
            return Ok(token);
        }
        let _one_at_a_time = self.login.lock().await;
        if let Some(token) = self.current().filter(|t| t.is_fresh() && Some(t) != failed) {
            return Ok(token);
        }
        let what = format!("log in to Concertim as {}", self.settings.username);
        let body =
            serde_json::json!({"user": {"login": self.settings.username, "password": self.settings.password.expose()}});
        let response = self
            .http
            .post(format!("{}/users/sign_in.json", self.base))
            .header("Accept", "application/json")
            .json(&body)
            .send()
            .await
            .map_err(|source| unanswered(&what, source))?;
        self.logins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let status = response.status();
        if let Some(location) = crate::outbound::redirect_target(&response) {
            return Err(ConcertimError::Redirected { what, status: status.as_u16(), location });
        }
        let header = response.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
        if !status.is_success() {
            let body = read_body(&what, response).await.unwrap_or_default();
            let what = match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    format!("{what} (check concertim.username and concertim.password)")
                }
                _ => what,
            };
            return Err(refused(&what, status, &body));
        }
        let token = Token::new(header.filter(|h| !h.is_empty()).ok_or_else(|| ConcertimError::Protocol {
            what: what.clone(),
            detail: format!("HTTP {status} without an Authorization header"),
        })?);
        *self.token.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(token.clone());
        Ok(token)
    }

    async fn send(
        &self,
        what: &str,
        method: &Method,
        path: &str,
        body: Option<&Value>,
        token: &Token,
    ) -> Result<Answer, ConcertimError> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .header("Accept", "application/json")
            .header("Authorization", &token.header);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|source| unanswered(what, source))?;
        let status = response.status();
        if let Some(location) = crate::outbound::redirect_target(&response) {
            return Err(ConcertimError::Redirected { what: what.to_owned(), status: status.as_u16(), location });
        }
        let body = read_body(what, response).await?;
        Ok(Answer { status, body })
    }

    /// One authenticated call; a 401 costs one re-login and the call again.
    async fn call(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ConcertimError> {
        let token = self.token(None).await?;
        let answer = self.send(what, &method, path, body, &token).await?;
        if answer.status != StatusCode::UNAUTHORIZED {
            return Ok(answer);
        }
        let token = self.token(Some(&token)).await?;
        self.send(what, &method, path, body, &token).await
    }

    async fn list<T: DeserializeOwned>(&self, what: &str, path: &str) -> Result<Vec<T>, ConcertimError> {
        let answer = self.call(what, Method::GET, path, None).await?;
        if !answer.status.is_success() {
            return Err(refused(what, answer.status, &answer.body));
        }
        serde_json::from_str(&answer.body).map_err(|e| ConcertimError::Protocol {
            what: what.to_owned(),
            detail: format!("unreadable list ({e}): {}", answer.body.chars().take(300).collect::<String>()),
        })
    }

    /// Every team.
    ///
    /// # Errors
    /// When Concertim cannot be reached or refuses.
    pub async fn teams(&self) -> Result<Vec<Team>, ConcertimError> {
        self.list("list Concertim teams", "/api/v1/teams").await
    }

    /// Every rack.
    ///
    /// # Errors
    /// As [`Client::teams`].
    pub async fn racks(&self) -> Result<Vec<Item>, ConcertimError> {
        self.list("list Concertim racks", "/api/v1/racks").await
    }

    /// Every device.
    ///
    /// # Errors
    /// As [`Client::teams`].
    pub async fn devices(&self) -> Result<Vec<Item>, ConcertimError> {
        self.list("list Concertim devices", "/api/v1/devices").await
    }

    /// `PATCH /api/v1/{kind}s/{id}` with `{kind: fields}`. `Ok(false)` when the record is gone.
    ///
    /// # Errors
    /// As [`Client::teams`].
    pub async fn update(&self, kind: &str, id: &str, fields: Value) -> Result<bool, ConcertimError> {
        let what = format!("update Concertim {kind} {id}");
        let body = serde_json::json!({ kind: fields });
        let answer = self.call(&what, Method::PATCH, &format!("/api/v1/{kind}s/{id}"), Some(&body)).await?;
        match answer.status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(refused(&what, s, &answer.body)),
        }
    }

    /// `DELETE /api/v1/{kind}s/{id}` (racks with everything in them). A record already gone is
    /// success.
    ///
    /// # Errors
    /// As [`Client::teams`].
    pub async fn delete(&self, kind: &str, id: &str) -> Result<(), ConcertimError> {
        let what = format!("delete Concertim {kind} {id}");
        let path = match kind {
            "rack" => format!("/api/v1/racks/{id}?recurse=true"),
            _ => format!("/api/v1/{kind}s/{id}"),
        };
        let answer = self.call(&what, Method::DELETE, &path, None).await?;
        match answer.status {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Ok(()),
            s => Err(refused(&what, s, &answer.body)),
        }
    }

    /// Pushes one value to the metric reporting daemon. `Ok(false)` when the daemon does not
    /// know the device yet (it refreshes its device map every 30 s; the value is dropped, the
    /// next sample brings a new one).
    ///
    /// # Errors
    /// As [`Client::teams`].
    pub async fn put_metric(&self, device: &str, metric: &MetricValue) -> Result<bool, ConcertimError> {
        let what = format!("push metric {} of device {device}", metric.name);
        let body = serde_json::to_value(metric).unwrap_or_default();
        let answer = self.call(&what, Method::PUT, &format!("/mrd/{device}/metrics"), Some(&body)).await?;
        match answer.status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(refused(&what, s, &answer.body)),
        }
    }
}

/// A connection error; an untrusted certificate is its own, permanent, error.
fn unanswered(what: &str, source: reqwest::Error) -> ConcertimError {
    match crate::outbound::untrusted(&source) {
        Some(reason) => ConcertimError::Untrusted { what: what.to_owned(), reason, source },
        None => ConcertimError::Http { what: what.to_owned(), source },
    }
}

/// An answer's body, read up to the shared limit.
async fn read_body(what: &str, response: reqwest::Response) -> Result<String, ConcertimError> {
    crate::outbound::text(response, crate::outbound::MAX_BODY_BYTES).await.map_err(|e| match e {
        crate::outbound::BodyError::Http(source) => ConcertimError::Http { what: what.to_owned(), source },
        e @ crate::outbound::BodyError::TooLarge { .. } => {
            ConcertimError::Protocol { what: what.to_owned(), detail: e.to_string() }
        }
    })
}

fn refused(what: &str, status: StatusCode, body: &str) -> ConcertimError {
    let body: String = body.chars().take(2000).collect();
    if status == StatusCode::UNPROCESSABLE_ENTITY && body.contains("blank") {
        return ConcertimError::MissingField { what: what.to_owned(), body };
    }
    ConcertimError::Status { what: what.to_owned(), status: status.as_u16(), body }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_knows_its_expiry_from_the_exp_claim() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"1","exp":100}"#);
        let token = Token::new(format!("Bearer h.{claims}.s"));
        assert_eq!(token.expires, Some(100));
        assert!(!token.is_fresh());
        let opaque = Token::new("Bearer opaque".into());
        assert_eq!(opaque.expires, None);
        assert!(opaque.is_fresh());
    }

    #[test]
    fn blank_422s_are_missing_fields_and_server_errors_are_transient() {
        let e = refused("x", StatusCode::UNPROCESSABLE_ENTITY, r#"{"name":["can't be blank"]}"#);
        assert!(matches!(e, ConcertimError::MissingField { .. }));
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert_eq!(refused("x", StatusCode::BAD_GATEWAY, "").class(), ErrorClass::Transient);
        assert_eq!(refused("x", StatusCode::FORBIDDEN, "").class(), ErrorClass::Permanent);
    }

    #[test]
    fn ids_read_as_numbers_or_strings() {
        let t: Team = serde_json::from_str(r#"{"id":7,"project_id":"p","billing_acct_id":null}"#).unwrap();
        assert_eq!(t.id, "7");
        let i: Item = serde_json::from_str(r#"{"id":"9","metadata":{"openstack_instance_id":"i-1"}}"#).unwrap();
        assert_eq!(i.metadata("openstack_instance_id").as_deref(), Some("i-1"));
    }

    #[test]
    fn a_devices_cost_and_rack_and_a_racks_cost_and_owner_are_read_as_rails_renders_them() {
        let device: Item =
            serde_json::from_str(r#"{"id":9,"cost":"12.5","location":{"rack_id":3,"start_u":1}}"#).unwrap();
        assert_eq!(
            (device.cost.map(|c| c.to_string()), device.location.and_then(|l| l.rack_id)),
            (Some("12.5".into()), Some("3".into()))
        );
        let rack: Item = serde_json::from_str(r#"{"id":3,"cost":"0.00","owner":{"id":7,"name":"t"}}"#).unwrap();
        assert_eq!(
            (rack.cost.map(|c| c.to_string()), rack.owner.and_then(|o| o.id)),
            (Some("0.00".into()), Some("7".into()))
        );
        // An unreadable cost is no cost: the next one written replaces it.
        let odd: Item = serde_json::from_str(r#"{"id":1,"cost":"n/a","location":null}"#).unwrap();
        assert_eq!(odd.cost, None);
    }
}

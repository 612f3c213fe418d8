//! The HTTP side: requests with the tenant's headers, answers, KillBill's error codes.

use super::KillBill;
use reqwest::{header::HeaderMap, Method, RequestBuilder, Response, StatusCode};
use serde::{de::DeserializeOwned, Deserialize};

use crate::billing::{BillingError, Context};

/// KillBill's error codes that mean "already done".
pub(super) const ACCOUNT_ALREADY_EXISTS: i64 = 3000;
pub(super) const ACCOUNT_NOT_FOUND_BY_KEY: i64 = 3003;
pub(super) const SUBSCRIPTION_NOT_FOUND_BY_KEY: i64 = 1083;
pub(super) const CANCEL_BAD_STATE: i64 = 1031;
pub(super) const CHANGE_NON_ACTIVE: i64 = 1021;
pub(super) const INVALID_REQUESTED_DATE: i64 = 1001;
pub(super) const BUNDLE_KEY_EXISTS: i64 = 1014;
pub(super) const BUNDLE_HAS_BASE: i64 = 1015;
pub(super) const CATALOG_INVALID_FOR_TENANT: i64 = 2080;
pub(super) const CUSTOM_FIELD_ALREADY_EXISTS: i64 = 9000;
pub(super) const TRACKING_ID_ALREADY_EXISTS: i64 = 50000;
pub(super) const TENANT_ALREADY_EXISTS: i64 = 20000;

/// An answer: status, body text.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) location: Option<String>,
    pub(super) body: String,
}

impl Answer {
    /// The usage call's answer to a record dated after the subscription's end: the resource
    /// returns a bare 400, which 0.24 sends with an empty body and 0.22 (through Jetty) with the
    /// container's `{"message":"Bad Request","url":…,"status":"400"}`: never KillBill's own error
    /// JSON, which names a `className`.
    pub(super) fn after_end(&self) -> bool {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct ContainerError {
            message: String,
            #[serde(default)]
            class_name: Option<String>,
        }
        let body = self.body.trim();
        body.is_empty()
            || serde_json::from_str::<ContainerError>(body)
                .is_ok_and(|e| e.class_name.is_none() && e.message == "Bad Request")
    }

    /// The KillBill error code of a JSON error body, when there is one.
    pub(super) fn code(&self) -> Option<i64> {
        #[derive(Deserialize)]
        struct ErrorBody {
            code: Option<i64>,
        }
        serde_json::from_str::<ErrorBody>(&self.body).ok()?.code
    }
}

impl KillBill {
    pub(super) fn request(&self, method: Method, path: &str, ctx: Option<Context<'_>>) -> RequestBuilder {
        let url = format!("{}{path}", self.settings.url.trim_end_matches('/'));
        let mut headers = HeaderMap::new();
        let mut put = |name: &'static str, value: &str| {
            if let Ok(value) = value.parse() {
                headers.insert(name, value);
            }
        };
        put("X-Killbill-ApiKey", &self.settings.api_key);
        put("X-Killbill-ApiSecret", self.settings.api_secret.expose());
        put("Accept", "application/json");
        if let Some(ctx) = ctx {
            put("X-Killbill-CreatedBy", &self.settings.created_by);
            // The audit log says which OpenStack event caused each write.
            put("X-Killbill-Reason", &ctx.meta.event_type);
            put("X-Killbill-Comment", &format!("OpenStack notification {}", ctx.meta.message_id));
        }
        self.http
            .request(method, url)
            .basic_auth(&self.settings.username, Some(self.settings.password.expose()))
            .headers(headers)
    }

    pub(super) async fn send(&self, what: &str, request: RequestBuilder) -> Result<Answer, BillingError> {
        let response: Response = request
            .send()
            .await
            .map_err(|source| BillingError::unanswered(what, "KillBill", "killbill.ca_file", source))?;
        let status = response.status();
        if let Some(location) = crate::outbound::redirect_target(&response) {
            return Err(BillingError::Redirected { what: what.to_owned(), status: status.as_u16(), location });
        }
        let location = response.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = crate::outbound::text(response, crate::outbound::MAX_BODY_BYTES)
            .await
            .map_err(|e| BillingError::from_body(what, status.as_u16(), e))?;
        Ok(Answer { status, location, body })
    }

    pub(super) fn refused(what: &str, answer: &Answer) -> BillingError {
        if answer.status.is_success() {
            return Self::not_the_answer(what, answer);
        }
        BillingError::Status {
            what: what.to_owned(),
            status: answer.status.as_u16(),
            body: answer.body.chars().take(2000).collect(),
        }
    }

    pub(super) fn parse<T: DeserializeOwned>(what: &str, answer: &Answer) -> Result<T, BillingError> {
        serde_json::from_str(&answer.body).map_err(|e| {
            BillingError::unexpected(what, answer.status.as_u16(), &format!("unreadable answer ({e})"), &answer.body)
        })
    }

    /// A 2xx that is not the one the call promises (a proxy's page, a login form).
    pub(super) fn not_the_answer(what: &str, answer: &Answer) -> BillingError {
        BillingError::unexpected(what, answer.status.as_u16(), "not the answer KillBill gives this call", &answer.body)
    }

    /// The id at the end of a `Location` header.
    pub(super) fn created_id(what: &str, answer: &Answer) -> Result<String, BillingError> {
        answer
            .location
            .as_deref()
            .and_then(|l| l.trim_end_matches('/').rsplit('/').next())
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| BillingError::Protocol {
                what: what.to_owned(),
                detail: "201 without a Location header".into(),
            })
    }
}

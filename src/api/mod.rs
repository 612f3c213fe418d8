//! The billing API Concertim's Rails app and its cluster builder call: the Python service's
//! billing routes (`reference/original-service.md` §4.3), with their bodies and answers, on a
//! listener of their own (`api.listen`).
//!
//! | route | request | answer (201) |
//! |---|---|---|
//! | `POST /credits` | `{credits{billing_acct_id, amount}}` | `{success, credits}` |
//! | `POST /get_credits` | `{credits{billing_account_id}}` | `{success, credits}` |
//! | `POST /get_draft_invoice` | `{invoice{billing_acct_id}}` | `{success, draft_invoice}` |
//! | `POST /list_paginated_invoices` | `{invoices{billing_acct_id, offset, limit}}` | `{success, total_invoices, invoices}` |
//! | `POST /get_account_invoice` | `{invoice{billing_acct_id, invoice_id}}` | `{success, invoice}` |
//! | `POST /create_order` | `{order{billing_account_id}}` | `{success, order}` |
//! | `POST /delete_order` | `{order{order_id}}` | `{success, order}` |
//! | `POST /add_order_tag` | `{tag{order_id, tag_name, tag_value}}` | `{success, tag}` |
//!
//! Every request carries `Authorization: Bearer <JWT>`, HS256 with the shared secret, checked
//! for its signature and its `exp` ([`jwt`]). Failures answer `{success: false, error,
//! message}` with their status: 400 a body that is not the route's, 401 a token refused, 402
//! credits at or below the threshold, 404 an unknown account, invoice, order or route, 405 a
//! method other than POST, 413 a body above `api.max_body_bytes`, 501 a backend without
//! accounts, 502/503 the billing application failing (503: try again).
//!
//! Writes are idempotent: each has a key, the `Idempotency-Key` header when the client sends
//! one, else a digest of the route, the token and the body. A request sent again as it was (a
//! client's retry resends the same token) is carried out once and answered the same; the
//! backends keep the key with what it made (see [`crate::billing::accounts`]).

pub mod jwt;

use std::sync::Arc;

use axum::{
    body::Body,
    extract::State,
    http::{header, HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{
    billing::{
        accounts::{Accounts, AccountsError},
        BillingError, ExactAmount,
    },
    class::ErrorClass,
    config::ApiSettings,
};

/// The routes served, in the order the module's table lists them.
pub const ROUTES: [&str; 8] = [
    "/credits",
    "/get_credits",
    "/get_draft_invoice",
    "/list_paginated_invoices",
    "/get_account_invoice",
    "/create_order",
    "/delete_order",
    "/add_order_tag",
];

/// The most invoices one page holds (the Python service's default page).
pub const MAX_PAGE: u64 = 100;

/// What the handler needs.
pub struct ApiState<A> {
    accounts: Arc<A>,
    settings: ApiSettings,
    threshold: Decimal,
    /// Decimal places of the currency: a deposit with more is refused.
    precision: u32,
}

impl<A> ApiState<A> {
    /// The API over `accounts`, configured by `settings`; `threshold` is
    /// `billing.credit_threshold`, `precision` the currency's decimal places.
    pub fn new(accounts: Arc<A>, settings: ApiSettings, threshold: Decimal, precision: u32) -> Self {
        Self { accounts, settings, threshold, precision }
    }
}

/// The API's routes over `state`.
pub fn router<A: Accounts + 'static>(state: Arc<ApiState<A>>) -> Router {
    Router::new().fallback(handle::<A>).with_state(state)
}

/// A failure, as the Python service answered them.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    error: &'static str,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        Self { status, error, message: message.into() }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }
}

impl From<AccountsError> for Failure {
    fn from(e: AccountsError) -> Self {
        match e {
            AccountsError::NotFound(m) => Self::new(StatusCode::NOT_FOUND, "NotFound", m),
            AccountsError::Invalid(m) => Self::new(StatusCode::CONFLICT, "Conflict", m),
            AccountsError::Unsupported(m) => Self::new(StatusCode::NOT_IMPLEMENTED, "NotSupported", m),
            AccountsError::Billing(e) => billing_failure(&e),
        }
    }
}

fn billing_failure(e: &BillingError) -> Failure {
    // Logged whole here; the caller gets the same words (they carry no secret: the clients
    // never put credentials in what they report).
    tracing::warn!(error.message = %e, "billing API: the billing application failed");
    match e.class() {
        ErrorClass::Transient => Failure::new(StatusCode::SERVICE_UNAVAILABLE, "BillingUnavailable", e.to_string()),
        _ => Failure::new(StatusCode::BAD_GATEWAY, "BillingFailed", e.to_string()),
    }
}

fn answer(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A success: `{"success": true, <name>: <value>}`, serialised straight to text (a
/// `serde_json::Value` would carry money as an f64).
#[derive(serde::Serialize)]
struct Success<'a, T: serde::Serialize> {
    success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_invoices: Option<u64>,
    #[serde(flatten)]
    value: std::collections::BTreeMap<&'a str, T>,
}

/// `{"success": true, name: value}` (and `total_invoices` when given) as JSON text.
fn success<T: serde::Serialize>(name: &str, value: T, total_invoices: Option<u64>) -> Result<String, Failure> {
    let body = Success { success: true, total_invoices, value: std::collections::BTreeMap::from([(name, value)]) };
    serde_json::to_string(&body).map_err(|e| {
        Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", format!("cannot write the answer: {e}"))
    })
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        answer(self.status, json!({"success": false, "error": self.error, "message": self.message}).to_string())
    }
}

async fn handle<A: Accounts + 'static>(
    State(state): State<Arc<ApiState<A>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let route = uri.path().to_owned();
    let result = serve(&state, &method, &route, &headers, body).await;
    let status = match &result {
        Ok(_) => StatusCode::CREATED,
        Err(f) => f.status,
    };
    let label = if ROUTES.contains(&route.as_str()) { route.clone() } else { "other".to_owned() };
    metrics::counter!(crate::telemetry::API_REQUESTS, "route" => label, "status" => status.as_str().to_owned())
        .increment(1);
    match result {
        Ok(body) => answer(StatusCode::CREATED, body),
        Err(failure) => {
            tracing::info!(route = %route, status = failure.status.as_u16(), error = failure.error, message = %failure.message, "billing API request refused");
            failure.into_response()
        }
    }
}

async fn serve<A: Accounts>(
    state: &ApiState<A>,
    method: &Method,
    route: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<String, Failure> {
    if !ROUTES.contains(&route) {
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route {route}; the billing API serves POST {}", ROUTES.join(", ")),
        ));
    }
    if method != Method::POST {
        return Err(Failure::new(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", format!("{route} takes POST")));
    }
    let token = bearer(headers).ok_or(jwt::TokenError::Missing);
    let secret = state.settings.jwt_secret.as_ref().map_or(&[][..], |s| s.expose().as_bytes());
    let now = time::OffsetDateTime::now_utc();
    token
        .and_then(|t| jwt::verify(t, secret, now.unix_timestamp()).map(|()| t))
        .map_err(|e| Failure::new(StatusCode::UNAUTHORIZED, "Unauthorized", e.to_string()))?;
    let limit = state.settings.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        Failure::new(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge", format!("the body is above {limit} bytes"))
    })?;
    let request: Value =
        serde_json::from_slice(&bytes).map_err(|e| Failure::bad(format!("the body is not JSON: {e}")))?;
    let key = idempotency_key(route, headers, &bytes);
    let today = now.date();
    let accounts = &state.accounts;
    match route {
        "/credits" => {
            let account = text(&request, "credits", &["billing_acct_id", "billing_account_id"])?;
            let amount = amount(&request, state)?;
            let credits = accounts.deposit(&account, amount, &key).await?;
            tracing::info!(account = %account, amount = %amount, "billing API: credits deposited");
            success("credits", ExactAmount(credits), None)
        }
        "/get_credits" => {
            let account = text(&request, "credits", &["billing_account_id", "billing_acct_id"])?;
            let credits = accounts.remaining_credits(&account, today).await?;
            success("credits", ExactAmount(credits), None)
        }
        "/get_draft_invoice" => {
            let account = text(&request, "invoice", &["billing_acct_id", "billing_account_id"])?;
            let draft = accounts.draft_invoice(&account, today).await?;
            success("draft_invoice", draft, None)
        }
        "/list_paginated_invoices" => {
            let account = text(&request, "invoices", &["billing_acct_id", "billing_account_id"])?;
            let offset = count(&request, "invoices", "offset", 0)?;
            let limit = count(&request, "invoices", "limit", MAX_PAGE)?.min(MAX_PAGE);
            let page = accounts.invoices(&account, offset, limit).await?;
            success("invoices", page.invoices, Some(page.total))
        }
        "/get_account_invoice" => {
            let account = text(&request, "invoice", &["billing_acct_id", "billing_account_id"])?;
            let invoice_id = text(&request, "invoice", &["invoice_id"])?;
            let invoice = accounts.invoice(&account, &invoice_id).await?;
            success("invoice", invoice, None)
        }
        "/create_order" => {
            let account = text(&request, "order", &["billing_account_id", "billing_acct_id"])?;
            // The credit guard (§1.2 step 3): refused at or below the threshold.
            let remaining = accounts.remaining_credits(&account, today).await?;
            if remaining <= state.threshold {
                return Err(Failure::new(
                    StatusCode::PAYMENT_REQUIRED,
                    "InsufficientCredits",
                    format!(
                        "account {account} has {remaining} in credits after its upcoming invoice, at or below the \
                         threshold of {} (billing.credit_threshold): deposit credits first",
                        state.threshold
                    ),
                ));
            }
            let order = accounts.create_order(&account, &key, &state.settings.order_plan).await?;
            tracing::info!(account = %account, order = %order, "billing API: order created");
            success("order", order, None)
        }
        "/delete_order" => {
            let order = text(&request, "order", &["order_id"])?;
            let order = accounts.delete_order(&order, &key).await?;
            tracing::info!(order = %order, "billing API: order deleted");
            success("order", order, None)
        }
        "/add_order_tag" => {
            let order = text(&request, "tag", &["order_id"])?;
            let name = text(&request, "tag", &["tag_name"])?;
            let value = text(&request, "tag", &["tag_value"])?;
            let tagged = accounts.tag_order(&order, &name, &value, &key).await?;
            success("tag", tagged, None)
        }
        _ => unreachable!("every route of ROUTES is matched above"),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim())
}

/// The request's idempotency key: its `Idempotency-Key` header, or its route, token and body.
fn idempotency_key(route: &str, headers: &HeaderMap, body: &[u8]) -> String {
    let mut digest = Sha256::new();
    digest.update(route.as_bytes());
    digest.update([0]);
    match headers.get("idempotency-key").map(axum::http::HeaderValue::as_bytes) {
        Some(key) => digest.update(key),
        None => {
            digest.update(bearer(headers).unwrap_or_default().as_bytes());
            digest.update([0]);
            digest.update(body);
        }
    }
    digest.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `request[object][one of names]` as text (a string, or a number written as text).
fn text(request: &Value, object: &str, names: &[&str]) -> Result<String, Failure> {
    let inner = request.get(object).filter(|v| v.is_object()).ok_or_else(|| {
        Failure::bad(format!("the body must be {{\"{object}\": {{\"{}\": …}}}}", names.join("\" or \"")))
    })?;
    let value = names.iter().find_map(|n| inner.get(*n).filter(|v| !v.is_null()));
    let text = match value {
        Some(Value::String(s)) => s.trim().to_owned(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err(Failure::bad(format!("{object}.{} must be a string", names[0]))),
        None => return Err(Failure::bad(format!("{object}.{} is missing", names[0]))),
    };
    if text.is_empty() || text.len() > 255 {
        return Err(Failure::bad(format!("{object}.{} must be 1 to 255 characters", names[0])));
    }
    Ok(text)
}

/// `request[object][name]` as a count, `default` when absent.
fn count(request: &Value, object: &str, name: &str, default: u64) -> Result<u64, Failure> {
    match request.get(object).and_then(|o| o.get(name)) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => {
            n.as_u64().ok_or_else(|| Failure::bad(format!("{object}.{name} must be a whole number ≥ 0")))
        }
        Some(Value::String(s)) => {
            s.trim().parse().map_err(|_| Failure::bad(format!("{object}.{name} must be a whole number ≥ 0")))
        }
        Some(_) => Err(Failure::bad(format!("{object}.{name} must be a whole number ≥ 0"))),
    }
}

/// The deposit's amount: positive, at most `api.max_deposit`, in the currency's precision.
fn amount<A>(request: &Value, state: &ApiState<A>) -> Result<Decimal, Failure> {
    let raw = match request.get("credits").and_then(|c| c.get("amount")) {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.trim().to_owned(),
        _ => return Err(Failure::bad("credits.amount is missing: a positive number")),
    };
    let amount = raw
        .parse::<Decimal>()
        .or_else(|_| Decimal::from_scientific(&raw))
        .map_err(|_| Failure::bad(format!("credits.amount {raw:?} is not a number")))?
        .normalize();
    if amount <= Decimal::ZERO {
        return Err(Failure::bad("credits.amount must be more than 0"));
    }
    if amount > state.settings.max_deposit {
        return Err(Failure::bad(format!(
            "credits.amount {amount} is above api.max_deposit ({})",
            state.settings.max_deposit
        )));
    }
    if amount.scale() > state.precision {
        return Err(Failure::bad(format!(
            "credits.amount {amount} has more than the currency's {} decimal places",
            state.precision
        )));
    }
    Ok(amount)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_with_the_same_token_and_body_has_the_same_key_and_anything_else_another() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer t1".parse().unwrap());
        let k = idempotency_key("/credits", &h, b"{}");
        assert_eq!(k, idempotency_key("/credits", &h, b"{}"));
        assert_ne!(k, idempotency_key("/credits", &h, b"{ }"));
        assert_ne!(k, idempotency_key("/create_order", &h, b"{}"));
        let mut other = HeaderMap::new();
        other.insert(header::AUTHORIZATION, "Bearer t2".parse().unwrap());
        assert_ne!(k, idempotency_key("/credits", &other, b"{}"));
        // A client's own key holds across tokens.
        h.insert("idempotency-key", "deposit-42".parse().unwrap());
        other.insert("idempotency-key", "deposit-42".parse().unwrap());
        assert_eq!(idempotency_key("/credits", &h, b"{}"), idempotency_key("/credits", &other, b"{\"x\":1}"));
    }

    #[test]
    fn money_is_answered_digit_for_digit_never_through_a_double() {
        let third = Decimal::ONE / Decimal::from(3);
        let body = success("credits", ExactAmount(third.round_dp(9)), None).unwrap();
        assert_eq!(body, r#"{"success":true,"credits":0.333333333}"#);
        let page = success("invoices", Vec::<u8>::new(), Some(0)).unwrap();
        assert_eq!(page, r#"{"success":true,"total_invoices":0,"invoices":[]}"#);
    }

    #[test]
    fn fields_are_read_by_either_spelling_and_a_wrong_shape_is_named() {
        let v = json!({"credits": {"billing_account_id": "acc-1"}});
        assert_eq!(text(&v, "credits", &["billing_acct_id", "billing_account_id"]).unwrap(), "acc-1");
        let e = text(&json!({"credit": {}}), "credits", &["billing_acct_id"]).unwrap_err();
        assert!(e.message.contains("{\"credits\""), "{}", e.message);
        let e = text(&json!({"credits": {"billing_acct_id": ["x"]}}), "credits", &["billing_acct_id"]).unwrap_err();
        assert!(e.message.contains("must be a string"), "{}", e.message);
    }

    #[test]
    fn a_deposit_must_be_positive_bounded_and_in_cents() {
        let state = ApiState::new(Arc::new(()), ApiSettings::default(), Decimal::from(25), 2);
        let of = |v: Value| amount(&json!({"credits": {"amount": v}}), &state);
        assert_eq!(of(json!(100)).unwrap(), Decimal::from(100));
        assert_eq!(of(json!("12.50")).unwrap(), Decimal::new(125, 1));
        for bad in [json!(0), json!(-5), json!("1e9"), json!(0.001), json!("abc"), json!(null), json!(true)] {
            assert!(of(bad.clone()).is_err(), "{bad}");
        }
    }
}

//! A fake Concertim: the Rails API and the metric reporting daemon, following
//! `../shared/reference/original-service.md` §4 and the Rails controllers it cites (VIZ
//! `app/controllers/api/v1/{devices,racks}_controller.rb`, `app/models/{device,volume,hw_rack}.rb`).
//!
//! - `POST /users/sign_in.json` `{"user":{"login","password"}}` answers the JWT in the
//!   `Authorization` response header (401 `{"error":"Invalid Login or password."}` otherwise);
//! - every `/api/v1` and MRD write call needs a live token (401 otherwise, as devise-jwt answers
//!   an expired or revoked one);
//! - teams, racks and devices (Instance and Volume, each with its OpenStack id in
//!   `metadata.openstack_instance_id`, as the original service creates them) are listed as Rails
//!   renders them; `PATCH` takes only the keys the controllers permit (others are dropped, as
//!   strong parameters do) and validates statuses per device type: a device answers 422
//!   `{"errors":{"status":["must be one of IN_PROGRESS, FAILED, ACTIVE or AVAILABLE"]}}` (the
//!   device controller wraps the model's errors), a rack 422 `{"status":["must be one of …"]}`
//!   (the rack controller does not); unknown ids are 404 `{"errors":{"record":["Not found"]}}`;
//!   `DELETE` answers 200 `{}`; a rack holding devices is deleted only with `recurse=true` (422
//!   `{"errors":"rack is not empty"}` otherwise);
//! - `PUT /mrd/{device}/metrics` validates name, value, type, slope and ttl (422), answers 404
//!   `Host Not Found` for a device it does not know, and `{"status":200}` otherwise.
//! - `set_down(true)` answers every request 503, as the reverse proxy does while Rails is away.
//!
//! - costs as Rails keeps them: a device's `cost` is a decimal column (default 0) rendered as
//!   Ruby renders a `BigDecimal` (`"0.0"`, `"12.5"`), a rack's is rendered `"%.2f"`; both are
//!   permitted in `PATCH`; a rack renders its team as `owner`, a device its rack as
//!   `location.rack_id`.
//!
//! What it cannot reproduce: a device is in a rack only when the test places it (`add_device`
//! and `add_volume` make devices in no rack, rendered with `location.rack_id` null, where Rails
//! has every listed device occupying rack units), devices carry no template or details (a
//! volume's `size`, `volume_type` … are absent from the list), and cannot be created (`POST
//! /api/v1/nodes` is 404 here); the cost column's scale (a cost with more than two decimals is
//! kept whole); the MRD's 30 s device-map refresh is not modelled (a device is known to it at
//! once); no status-action rules (they govern the IRV's requested actions, not API writes).

use std::sync::{Arc, Mutex};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use base64::Engine as _;
use concertim_billing::config::ConcertimSettings;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};

use super::fake_server::{self, Answers, Faults};

const LOGIN: &str = "admin";
const PASSWORD: &str = "concertim-secret";

/// A team row.
#[derive(Debug, Clone, PartialEq)]
pub struct Team {
    /// Record id.
    pub id: u64,
    /// Linked OpenStack project.
    pub project_id: String,
    /// Billing account id.
    pub billing_acct_id: Option<String>,
    /// `cost`, as sent.
    pub cost: Option<String>,
    /// `credits`, as sent.
    pub credits: Option<String>,
    /// `billing_period_start`, as sent.
    pub period_start: Option<String>,
    /// `billing_period_end`, as sent.
    pub period_end: Option<String>,
}

/// A rack or device row.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Record id.
    pub id: u64,
    /// `Instance`, `Volume`, `Network` for devices; `rack` for racks.
    pub kind: String,
    /// Status.
    pub status: String,
    /// The OpenStack id in its metadata.
    pub cloud_id: String,
    /// Its cost (Rails' default is zero).
    pub cost: Decimal,
    /// A device's rack, a rack's team (record ids), when placed.
    pub parent: Option<u64>,
}

impl Record {
    fn new(id: u64, kind: &str, status: &str, cloud_id: &str, parent: Option<u64>) -> Self {
        Record { id, kind: kind.into(), status: status.into(), cloud_id: cloud_id.into(), cost: Decimal::ZERO, parent }
    }

    /// `cost` as the API renders it: `"%.2f"` for a rack, a `BigDecimal`'s `to_s` for a device.
    pub fn cost_text(&self) -> String {
        if self.kind == "rack" {
            format!("{:.2}", self.cost)
        } else {
            ruby_decimal(self.cost)
        }
    }
}

/// Ruby's `BigDecimal#to_s` with ActiveSupport (plain notation, at least one decimal).
fn ruby_decimal(d: Decimal) -> String {
    let text = d.normalize().to_string();
    if text.contains('.') {
        text
    } else {
        format!("{text}.0")
    }
}

#[derive(Default)]
struct Fake {
    next_id: u64,
    next_token: u64,
    tokens: Vec<String>,
    logins: usize,
    teams: Vec<Team>,
    racks: Vec<Record>,
    devices: Vec<Record>,
    metrics: Vec<(u64, Value)>,
    team_figure_updates: usize,
    /// Team updates that carried `billing_acct_id`.
    team_account_updates: usize,
    status_updates: usize,
    cost_updates: usize,
    /// What happened to each device, by OpenStack id: the statuses set, then `removed`.
    device_history: Vec<(String, String)>,
}

/// The running fake.
#[derive(Clone)]
pub struct FakeConcertim {
    /// Its base URL.
    pub url: String,
    state: Arc<Mutex<Fake>>,
    faults: Faults,
}

/// What the reverse proxy in front of Rails answers while Rails is away.
fn proxy_unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [("content-type", "text/html")],
        "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>",
    )
        .into_response()
}

impl FakeConcertim {
    /// Starts the fake on a free port.
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(Fake { next_id: 100, ..Fake::default() }));
        let faults = Faults::new(Answers { unavailable: proxy_unavailable, ..Answers::EMPTY });
        let app = Router::new().fallback(handle).with_state(Arc::clone(&state));
        let url = fake_server::serve(app, &faults).await;
        Self { url, state, faults }
    }

    /// Settings for the service to talk to this fake, with short test intervals.
    pub fn settings(&self) -> ConcertimSettings {
        let mut settings: ConcertimSettings =
            toml::from_str(&format!("url = \"{}\"\nusername = \"{LOGIN}\"\npassword = \"{PASSWORD}\"\n", self.url))
                .unwrap();
        settings.team_refresh_interval_ms = 200;
        settings.relist_interval_ms = 0;
        settings.retry_delay_ms = 200;
        settings.backoff.initial_ms = 20;
        settings.backoff.max_ms = 100;
        settings.backoff.max_elapsed_ms = 300;
        settings
    }

    /// Adds a team for a project.
    pub fn add_team(&self, project: &str) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.next_id += 1;
        let id = s.next_id;
        s.teams.push(Team {
            id,
            project_id: project.to_owned(),
            billing_acct_id: None,
            cost: None,
            credits: None,
            period_start: None,
            period_end: None,
        });
        id
    }

    /// Adds a rack for a Heat stack, owned by no team.
    pub fn add_rack(&self, stack: &str, status: &str) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.next_id += 1;
        let id = s.next_id;
        s.racks.push(Record::new(id, "rack", status, stack, None));
        id
    }

    /// Adds a rack for a Heat stack, owned by the team of a project (which must exist).
    pub fn add_team_rack(&self, stack: &str, project: &str) -> u64 {
        let mut s = self.state.lock().unwrap();
        let team = s.teams.iter().find(|t| t.project_id == project).expect("the team exists").id;
        s.next_id += 1;
        let id = s.next_id;
        s.racks.push(Record::new(id, "rack", "ACTIVE", stack, Some(team)));
        id
    }

    /// Adds an Instance device for a Nova instance, in no rack.
    pub fn add_device(&self, instance: &str, status: &str) -> u64 {
        self.add(Record::new(0, "Instance", status, instance, None))
    }

    /// Adds an Instance device for a Nova instance in a rack.
    pub fn add_device_in(&self, instance: &str, rack: u64) -> u64 {
        self.add(Record::new(0, "Instance", "ACTIVE", instance, Some(rack)))
    }

    /// Adds a Volume device for a Cinder volume, in no rack.
    pub fn add_volume(&self, volume: &str, status: &str) -> u64 {
        self.add(Record::new(0, "Volume", status, volume, None))
    }

    fn add(&self, mut device: Record) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.next_id += 1;
        device.id = s.next_id;
        s.devices.push(device);
        s.next_id
    }

    /// Cost changes made to devices and racks.
    pub fn cost_updates(&self) -> usize {
        self.state.lock().unwrap().cost_updates
    }

    /// What happened to the device of an OpenStack id, in order: each status it was changed
    /// to, and `removed` when it was deleted.
    pub fn device_history(&self, cloud_id: &str) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.device_history.iter().filter(|(id, _)| id == cloud_id).map(|(_, what)| what.clone()).collect()
    }

    /// Every request is answered 503 while down.
    pub fn set_down(&self, down: bool) {
        self.faults.set_down(down);
    }

    /// Revokes every token: the next call with one is answered 401.
    pub fn expire_tokens(&self) {
        self.state.lock().unwrap().tokens.clear();
    }

    /// Successful logins so far.
    pub fn logins(&self) -> usize {
        self.state.lock().unwrap().logins
    }

    /// Requests served so far (503s included).
    pub fn requests(&self) -> usize {
        self.faults.requests()
    }

    /// Team updates that carried billing figures.
    pub fn team_figure_updates(&self) -> usize {
        self.state.lock().unwrap().team_figure_updates
    }

    /// Team updates that set a billing account id.
    pub fn team_account_updates(&self) -> usize {
        self.state.lock().unwrap().team_account_updates
    }

    /// Device and rack status changes made.
    pub fn status_updates(&self) -> usize {
        self.state.lock().unwrap().status_updates
    }

    /// Gives a project's team a billing account id, as a team linked by another service has.
    pub fn set_team_account(&self, project: &str, account: &str) {
        let mut s = self.state.lock().unwrap();
        if let Some(team) = s.teams.iter_mut().find(|t| t.project_id == project) {
            team.billing_acct_id = Some(account.to_owned());
        }
    }

    /// The team of a project, while it exists.
    pub fn team(&self, project: &str) -> Option<Team> {
        self.state.lock().unwrap().teams.iter().find(|t| t.project_id == project).cloned()
    }

    /// The device of an instance, while it exists.
    pub fn device(&self, instance: &str) -> Option<Record> {
        self.state.lock().unwrap().devices.iter().find(|d| d.cloud_id == instance).cloned()
    }

    /// The rack of a stack, while it exists.
    pub fn rack(&self, stack: &str) -> Option<Record> {
        self.state.lock().unwrap().racks.iter().find(|r| r.cloud_id == stack).cloned()
    }

    /// Metric values received, as (device id, body).
    pub fn metrics(&self) -> Vec<(u64, Value)> {
        self.state.lock().unwrap().metrics.clone()
    }
}

fn json_response(status: StatusCode, value: Value) -> Response {
    (status, [("content-type", "application/json; charset=utf-8")], value.to_string()).into_response()
}

fn not_found() -> Response {
    json_response(StatusCode::NOT_FOUND, json!({"errors": {"record": ["Not found"]}}))
}

fn unauthorized() -> Response {
    json_response(StatusCode::UNAUTHORIZED, json!({"error": "You need to sign in or sign up before continuing."}))
}

fn jwt(n: u64) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 86_400;
    let header = engine.encode(br#"{"alg":"HS256"}"#);
    let claims = engine.encode(format!(r#"{{"sub":"1","scp":"user","exp":{exp},"jti":"{n}"}}"#));
    format!("{header}.{claims}.c2lnbmF0dXJl")
}

fn team_json(t: &Team) -> Value {
    json!({"id": t.id, "name": format!("team-{}", t.id), "project_id": t.project_id, "billing_acct_id": t.billing_acct_id,
        "billing_period_start": t.period_start, "billing_period_end": t.period_end, "cost": t.cost, "credits": t.credits})
}

fn record_json(r: &Record, teams: &[Team]) -> Value {
    let key = if r.kind == "rack" { "openstack_stack_id" } else { "openstack_instance_id" };
    let mut value = json!({"id": r.id, "name": format!("{}-{}", r.kind, r.id), "status": r.status,
        "metadata": {key: r.cloud_id}, "cost": r.cost_text()});
    if r.kind == "rack" {
        value["owner"] = teams.iter().find(|t| Some(t.id) == r.parent).map_or(Value::Null, team_json);
    } else {
        value["type"] = json!(r.kind);
        value["location"] =
            json!({"rack_id": r.parent, "start_u": 1, "end_u": 1, "facing": "f", "depth": 1, "type": "RackTemplate"});
    }
    value
}

/// The statuses Rails accepts (VIZ `app/models/{instance,volume,network,hw_rack}.rb`).
fn accepted(kind: &str) -> &'static [&'static str] {
    match kind {
        "Instance" => &["IN_PROGRESS", "FAILED", "ACTIVE", "STOPPED", "SUSPENDED"],
        "Volume" => &["IN_PROGRESS", "FAILED", "ACTIVE", "AVAILABLE"],
        _ => &["IN_PROGRESS", "FAILED", "ACTIVE", "STOPPED"],
    }
}

/// The model's error for a status it does not accept, worded as Rails words it
/// (`to_sentence(last_word_connector: ' or ')`).
fn status_error(kind: &str) -> Value {
    let statuses = accepted(kind);
    let (last, rest) = statuses.split_last().expect("every kind accepts some status");
    json!({"status": [format!("must be one of {} or {last}", rest.join(", "))]})
}

async fn handle(
    State(state): State<Arc<Mutex<Fake>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut s = state.lock().unwrap();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"errors": [{"status": "400", "title": "Bad Request", "description": "body is not JSON"}]}),
                )
            }
        }
    };
    let path = uri.path().to_owned();
    if method == Method::POST && path == "/users/sign_in.json" {
        let user = &body["user"];
        if user["login"] != LOGIN || user["password"] != PASSWORD {
            return json_response(StatusCode::UNAUTHORIZED, json!({"error": "Invalid Login or password."}));
        }
        s.logins += 1;
        s.next_token += 1;
        let token = jwt(s.next_token);
        s.tokens.push(token.clone());
        let mut response = json_response(StatusCode::OK, json!({"id": 1, "login": LOGIN, "root": true}));
        response.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        return response;
    }
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if !bearer.is_some_and(|t| s.tokens.iter().any(|k| k == t)) {
        return unauthorized();
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let recurse = uri.query().is_some_and(|q| q.split('&').any(|p| p == "recurse=true"));
    match (&method, segments.as_slice()) {
        (&Method::GET, ["api", "v1", "teams"]) => {
            json_response(StatusCode::OK, Value::Array(s.teams.iter().map(team_json).collect()))
        }
        (&Method::GET, ["api", "v1", "racks"]) => {
            json_response(StatusCode::OK, Value::Array(s.racks.iter().map(|r| record_json(r, &s.teams)).collect()))
        }
        (&Method::GET, ["api", "v1", "devices"]) => {
            json_response(StatusCode::OK, Value::Array(s.devices.iter().map(|d| record_json(d, &s.teams)).collect()))
        }
        (&Method::PATCH, ["api", "v1", "teams", id]) => {
            let Some(fields) = body["team"].as_object().cloned() else {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"errors": [{"status": "400", "title": "Bad Request", "description": "param is missing or the value is empty: team"}]}),
                );
            };
            let (mut figures, mut account) = (false, false);
            let Some(team) = s.teams.iter_mut().find(|t| t.id.to_string() == *id) else { return not_found() };
            let text = |v: &Value| v.as_str().map(str::to_owned).or_else(|| (!v.is_null()).then(|| v.to_string()));
            for (key, value) in &fields {
                match key.as_str() {
                    "billing_acct_id" => {
                        team.billing_acct_id = text(value);
                        account = true;
                    }
                    "cost" => {
                        team.cost = text(value);
                        figures = true
                    }
                    "credits" => team.credits = text(value),
                    "billing_period_start" => team.period_start = text(value),
                    "billing_period_end" => team.period_end = text(value),
                    // Strong parameters drop what is not permitted.
                    _ => {}
                }
            }
            let json = team_json(team);
            if figures {
                s.team_figure_updates += 1;
            }
            if account {
                s.team_account_updates += 1;
            }
            json_response(StatusCode::OK, json)
        }
        (&Method::PATCH, ["api", "v1", kind @ ("devices" | "racks"), id]) => {
            let key = if *kind == "racks" { "rack" } else { "device" };
            let fields: Map<String, Value> = body[key].as_object().cloned().unwrap_or_default();
            let teams = s.teams.clone();
            let list = if *kind == "racks" { &mut s.racks } else { &mut s.devices };
            let Some(record) = list.iter_mut().find(|r| r.id.to_string() == *id) else { return not_found() };
            let mut changed = false;
            let mut cost_changed = false;
            if let Some(cost) = fields.get("cost") {
                // A decimal column: Rails casts a number or its text, and an unreadable one to 0.
                let cost = cost.as_str().map(str::to_owned).unwrap_or_else(|| cost.to_string());
                let cost = cost.trim().parse::<Decimal>().unwrap_or_default();
                cost_changed = record.cost != cost;
                record.cost = cost;
            }
            if let Some(status) = fields.get("status") {
                let status = status.as_str().unwrap_or_default();
                if !accepted(&record.kind).contains(&status) {
                    let errors = status_error(&record.kind);
                    // The device controller renders `{errors: model.errors}`, the rack
                    // controller the model's errors bare.
                    let body = if *kind == "racks" { errors } else { json!({ "errors": errors }) };
                    return json_response(StatusCode::UNPROCESSABLE_ENTITY, body);
                }
                changed = record.status != status;
                record.status = status.to_owned();
            }
            let json = record_json(record, &teams);
            let cloud_id = record.cloud_id.clone();
            if cost_changed {
                s.cost_updates += 1;
            }
            if changed {
                s.status_updates += 1;
                if *kind == "devices" {
                    let status = json["status"].as_str().unwrap_or_default().to_owned();
                    s.device_history.push((cloud_id, status));
                }
            }
            json_response(StatusCode::OK, json)
        }
        (&Method::DELETE, ["api", "v1", "devices", id]) => {
            let Some(at) = s.devices.iter().position(|d| d.id.to_string() == *id) else { return not_found() };
            let gone = s.devices.remove(at);
            s.device_history.push((gone.cloud_id, "removed".into()));
            json_response(StatusCode::OK, json!({}))
        }
        (&Method::DELETE, ["api", "v1", "racks", id]) => {
            if !s.racks.iter().any(|r| r.id.to_string() == *id) {
                return not_found();
            }
            // The recurse flag is required as Rails requires it for a rack with devices (the
            // fake asks for it of every rack, as the service always sends it).
            if !recurse {
                return json_response(StatusCode::UNPROCESSABLE_ENTITY, json!({"errors": "rack is not empty"}));
            }
            let rack: u64 = id.parse().unwrap_or_default();
            let (inside, kept): (Vec<Record>, Vec<Record>) =
                std::mem::take(&mut s.devices).into_iter().partition(|d| d.parent == Some(rack));
            s.devices = kept;
            s.device_history.extend(inside.into_iter().map(|d| (d.cloud_id, "removed".to_owned())));
            s.racks.retain(|r| r.id.to_string() != *id);
            json_response(StatusCode::OK, json!({}))
        }
        (&Method::PUT, ["mrd", device, "metrics"]) => {
            let Some(device) = s.devices.iter().find(|d| d.id.to_string() == *device).map(|d| d.id) else {
                return (StatusCode::NOT_FOUND, "Host Not Found").into_response();
            };
            const TYPES: [&str; 9] =
                ["string", "int8", "uint8", "int16", "uint16", "int32", "uint32", "float", "double"];
            const SLOPES: [&str; 5] = ["zero", "positive", "negative", "both", "derivative"];
            let valid = body["name"].as_str().is_some_and(|n| !n.is_empty())
                && body["value"].is_number()
                && body["type"].as_str().is_some_and(|t| TYPES.contains(&t))
                && body["slope"].as_str().is_some_and(|t| SLOPES.contains(&t))
                && body["ttl"].as_u64().is_some_and(|t| t >= 1);
            if !valid {
                return json_response(StatusCode::UNPROCESSABLE_ENTITY, json!({"error": "invalid metric"}));
            }
            s.metrics.push((device, body));
            json_response(StatusCode::OK, json!({"status": 200}))
        }
        _ => not_found(),
    }
}

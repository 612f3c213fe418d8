//! A fake Keystone, the identity API v3 as its API reference documents it
//! (docs.openstack.org/api-ref/identity/v3):
//!
//! - `POST /v3/auth/tokens` takes the `password` method (the user by `id`, or by `name` with its
//!   domain by `id` or `name`; the scope a project by `id`, or by `name` with its domain, on
//!   which the user must hold a role) or the `application_credential` method (by `id`, with no
//!   scope: a credential is scoped already). It answers 201 with the token in the
//!   `X-Subject-Token` header and `{"token": {"expires_at": …, "issued_at": …, "methods": …,
//!   "user": …, "project": …, "roles": …}}` (`expires_at` as Keystone writes it,
//!   `2015-11-06T15:32:17.893769Z`); a wrong credential, an unknown user, a scope the user has
//!   no role on, or a scope asked with an application credential is 401
//!   `{"error": {"code": 401, "title": "Unauthorized", "message": …}}`; a body that is not an
//!   auth request is 400.
//! - Every other call needs a live token in `X-Auth-Token`: a missing, unknown, revoked or
//!   expired one is the same 401.
//! - `GET /v3/projects/{id}` (404 `Could not find project: {id}.`), `GET /v3/projects?name=`,
//!   `GET /v3/users?name=&domain_id=`, `GET /v3/roles?name=` and
//!   `GET /v3/role_assignments?user.id=&role.id=` (each entry with `role`, `user`,
//!   `scope.project` and `links.assignment`). Lists carry `links` `self`, `previous` and `next`
//!   (full URLs, `null` at either end) and are cut in pages of `limit` (the query's, at most the
//!   page size a test sets) after `marker` (the last id of the page before).
//!
//! What it cannot reproduce: real Keystone paginates no list (it cuts a list at its
//! `[DEFAULT] list_limit` and says `"truncated": true`); the paging here stands for a proxy or a
//! later release that does, as the client must follow `links.next` wherever it appears.
//! Tokens are opaque counters, not Fernet tokens, and carry no catalog; there are no groups,
//! no inherited or domain-scoped assignments (so no `effective`), no `include_names`, no other
//! auth method (token, TOTP, receipts), and no policy: any live token may read everything.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use concertim_billing::config::KeystoneSettings;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::fake_server::{self, form_pairs, Answers, Faults};

/// The service user the settings of [`FakeKeystone::settings`] log in as.
pub const USER: &str = "billing";
/// Its password.
pub const PASSWORD: &str = "keystone-secret";
/// The project its tokens are scoped to.
pub const SERVICE_PROJECT: &str = "service";
/// The application credential of [`FakeKeystone::application_credential_settings`].
pub const APP_CREDENTIAL: &str = "ac-billing";
/// Its secret.
pub const APP_CREDENTIAL_SECRET: &str = "ac-secret";

struct User {
    id: String,
    name: String,
    domain_id: String,
    password: String,
}

struct Project {
    id: String,
    name: String,
    domain_id: String,
}

struct Role {
    id: String,
    name: String,
}

struct Assignment {
    user: String,
    role: String,
    project: String,
}

#[derive(Default)]
struct Fake {
    next_id: u64,
    domains: Vec<(String, String)>,
    users: Vec<User>,
    projects: Vec<Project>,
    roles: Vec<Role>,
    assignments: Vec<Assignment>,
    /// Application credentials: id → (secret, user id, project id).
    credentials: BTreeMap<String, (String, String, String)>,
    /// Live tokens and when each expires.
    tokens: BTreeMap<String, OffsetDateTime>,
    token_lifetime: Duration,
    issued: usize,
    unauthorized: usize,
    page_size: Option<usize>,
    pages: usize,
    /// Where `links` point instead of this fake's own origin, when a test says so.
    links_origin: Option<String>,
    /// `http` or `https`, as it is served: a handler does not see the scheme.
    scheme: &'static str,
}

impl Fake {
    fn id(&mut self, kind: &str) -> String {
        self.next_id += 1;
        // Keystone's ids are uuid4 hex; the kind keeps a test's failures readable.
        format!("{kind}{:0>28x}", self.next_id)
    }
}

/// The running fake.
#[derive(Clone)]
pub struct FakeKeystone {
    /// Its identity endpoint, `http://127.0.0.1:port/v3` (`https://…` when served over TLS).
    pub url: String,
    state: Arc<Mutex<Fake>>,
    faults: Faults,
}

impl FakeKeystone {
    /// Starts the fake on a free port, with the service user, its project and an application
    /// credential.
    pub async fn start() -> Self {
        let (state, faults, app) = Self::app("http");
        let url = format!("{}/v3", fake_server::serve(app, &faults).await);
        Self::seeded(url, state, faults)
    }

    /// Starts the fake over TLS, serving the PEM certificate chain `cert` with the key `key`.
    pub async fn start_tls(cert: &Path, key: &Path) -> Self {
        let (state, faults, app) = Self::app("https");
        let listener = super::tls::Listener::bind(cert, key).await;
        let url = format!("https://{}/v3", listener.local_addr());
        let app = fake_server::with_faults(app, &faults);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self::seeded(url, state, faults)
    }

    fn app(scheme: &'static str) -> (Arc<Mutex<Fake>>, Faults, Router) {
        let state = Arc::new(Mutex::new(Fake {
            scheme,
            domains: vec![("default".into(), "Default".into())],
            token_lifetime: Duration::from_secs(3600),
            ..Fake::default()
        }));
        let faults = Faults::new(Answers::EMPTY);
        let app = Router::new().fallback(handle).with_state(Arc::clone(&state));
        (state, faults, app)
    }

    fn seeded(url: String, state: Arc<Mutex<Fake>>, faults: Faults) -> Self {
        let fake = Self { url, state, faults };
        let user = fake.add_user(USER);
        let project = fake.add_project(SERVICE_PROJECT);
        let admin = fake.add_role("admin");
        fake.assign(&user, &admin, &project);
        fake.state
            .lock()
            .unwrap()
            .credentials
            .insert(APP_CREDENTIAL.into(), (APP_CREDENTIAL_SECRET.into(), user.clone(), project.clone()));
        fake
    }

    /// Password auth as the service user, on its project.
    pub fn settings(&self) -> KeystoneSettings {
        toml::from_str(&format!(
            "url = \"{}\"\nusername = \"{USER}\"\npassword = \"{PASSWORD}\"\nproject = \"{SERVICE_PROJECT}\"\n",
            self.url
        ))
        .unwrap()
    }

    /// Application credential auth.
    pub fn application_credential_settings(&self) -> KeystoneSettings {
        toml::from_str(&format!(
            "url = \"{}\"\napplication_credential_id = \"{APP_CREDENTIAL}\"\napplication_credential_secret = \"{APP_CREDENTIAL_SECRET}\"\n",
            self.url
        ))
        .unwrap()
    }

    /// Adds a user (password `PASSWORD`) to the Default domain; returns its id.
    pub fn add_user(&self, name: &str) -> String {
        let mut s = self.state.lock().unwrap();
        let id = s.id("u");
        s.users.push(User {
            id: id.clone(),
            name: name.into(),
            domain_id: "default".into(),
            password: PASSWORD.into(),
        });
        id
    }

    /// Adds a project to the Default domain; returns its id.
    pub fn add_project(&self, name: &str) -> String {
        let mut s = self.state.lock().unwrap();
        let id = s.id("p");
        s.projects.push(Project { id: id.clone(), name: name.into(), domain_id: "default".into() });
        id
    }

    /// Adds a global role; returns its id.
    pub fn add_role(&self, name: &str) -> String {
        let mut s = self.state.lock().unwrap();
        let id = s.id("r");
        s.roles.push(Role { id: id.clone(), name: name.into() });
        id
    }

    /// Grants `role` to `user` on `project` (ids).
    pub fn assign(&self, user: &str, role: &str, project: &str) {
        let assignment = Assignment { user: user.into(), role: role.into(), project: project.into() };
        self.state.lock().unwrap().assignments.push(assignment);
    }

    /// Lists are cut in pages of at most `size` items.
    pub fn set_page_size(&self, size: usize) {
        self.state.lock().unwrap().page_size = Some(size.max(1));
    }

    /// `links` point to `origin` (`http://host:port`) instead of this fake.
    pub fn set_links_origin(&self, origin: &str) {
        self.state.lock().unwrap().links_origin = Some(origin.trim_end_matches('/').to_owned());
    }

    /// Tokens issued from now on live this long.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state.lock().unwrap().token_lifetime = lifetime;
    }

    /// Revokes every token issued so far: a call with one is answered 401.
    pub fn revoke_tokens(&self) {
        self.state.lock().unwrap().tokens.clear();
    }

    /// Every token issued so far expires now.
    pub fn expire_tokens(&self) {
        let past = OffsetDateTime::now_utc() - Duration::from_secs(1);
        self.state.lock().unwrap().tokens.values_mut().for_each(|expires| *expires = past);
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.state.lock().unwrap().issued
    }

    /// Calls answered 401 for their token (token requests not counted).
    pub fn unauthorized(&self) -> usize {
        self.state.lock().unwrap().unauthorized
    }

    /// List pages served.
    pub fn pages(&self) -> usize {
        self.state.lock().unwrap().pages
    }

    /// Requests received, those a fault answered included.
    pub fn requests(&self) -> usize {
        self.faults.requests()
    }

    /// The next requests are answered with these statuses.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.faults.fail_next(statuses);
    }
}

fn error(status: StatusCode, title: &str, message: &str) -> Response {
    let body = json!({"error": {"code": status.as_u16(), "title": title, "message": message}});
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

fn unauthorized() -> Response {
    error(StatusCode::UNAUTHORIZED, "Unauthorized", "The request you have made requires authentication.")
}

fn keystone_time(at: OffsetDateTime) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    at.format(&format).unwrap()
}

async fn handle(
    State(state): State<Arc<Mutex<Fake>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut s = state.lock().unwrap();
    let path = uri.path().trim_end_matches('/').to_owned();
    if method == Method::POST && path == "/v3/auth/tokens" {
        return issue(&mut s, &body);
    }
    let token = headers.get("x-auth-token").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let live = s.tokens.get(token).is_some_and(|expires| *expires > OffsetDateTime::now_utc());
    if !live {
        s.unauthorized += 1;
        return unauthorized();
    }
    let origin = match (&s.links_origin, headers.get("host").and_then(|v| v.to_str().ok())) {
        (Some(origin), _) => origin.clone(),
        (None, Some(host)) => format!("{}://{host}", s.scheme),
        (None, None) => "http://localhost".into(),
    };
    let query = form_pairs(uri.query().unwrap_or_default());
    let filter = |key: &str, value: &str| query.get(key).is_none_or(|wanted| wanted == value);
    match (method, path.as_str()) {
        (Method::GET, "/v3/projects") => {
            let items: Vec<(String, Value)> = s
                .projects
                .iter()
                .filter(|p| filter("name", &p.name) && filter("domain_id", &p.domain_id))
                .map(|p| (p.id.clone(), project_json(p, &origin)))
                .collect();
            list(&mut s, &origin, &path, &query, "projects", items)
        }
        (Method::GET, "/v3/users") => {
            let items: Vec<(String, Value)> = s
                .users
                .iter()
                .filter(|u| filter("name", &u.name) && filter("domain_id", &u.domain_id))
                .map(|u| {
                    let link = format!("{origin}/v3/users/{}", u.id);
                    let user = json!({"id": u.id, "name": u.name, "domain_id": u.domain_id, "enabled": true,
                        "links": {"self": link}});
                    (u.id.clone(), user)
                })
                .collect();
            list(&mut s, &origin, &path, &query, "users", items)
        }
        (Method::GET, "/v3/roles") => {
            let items: Vec<(String, Value)> = s
                .roles
                .iter()
                .filter(|r| filter("name", &r.name))
                .map(|r| {
                    let link = format!("{origin}/v3/roles/{}", r.id);
                    (r.id.clone(), json!({"id": r.id, "name": r.name, "domain_id": null, "links": {"self": link}}))
                })
                .collect();
            list(&mut s, &origin, &path, &query, "roles", items)
        }
        (Method::GET, "/v3/role_assignments") => {
            let items: Vec<(String, Value)> = s
                .assignments
                .iter()
                .filter(|a| filter("user.id", &a.user) && filter("role.id", &a.role))
                .filter(|a| filter("scope.project.id", &a.project))
                .map(|a| {
                    let link = format!("{origin}/v3/projects/{}/users/{}/roles/{}", a.project, a.user, a.role);
                    let entry = json!({"role": {"id": a.role}, "user": {"id": a.user},
                        "scope": {"project": {"id": a.project}}, "links": {"assignment": link}});
                    (format!("{}/{}/{}", a.project, a.user, a.role), entry)
                })
                .collect();
            list(&mut s, &origin, &path, &query, "role_assignments", items)
        }
        (Method::GET, p) if p.starts_with("/v3/projects/") => {
            let id = &p["/v3/projects/".len()..];
            match s.projects.iter().find(|project| project.id == id) {
                Some(project) => {
                    let body = json!({"project": project_json(project, &origin)});
                    (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response()
                }
                None => error(StatusCode::NOT_FOUND, "Not Found", &format!("Could not find project: {id}.")),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "Not Found", "The resource could not be found."),
    }
}

fn project_json(p: &Project, origin: &str) -> Value {
    json!({"id": p.id, "name": p.name, "domain_id": p.domain_id, "enabled": true, "is_domain": false,
        "parent_id": p.domain_id, "description": "", "links": {"self": format!("{origin}/v3/projects/{}", p.id)}})
}

/// One page of `items` (each with its marker key) after the query's `marker`, with its links.
fn list(
    s: &mut Fake,
    origin: &str,
    path: &str,
    query: &BTreeMap<String, String>,
    key: &str,
    items: Vec<(String, Value)>,
) -> Response {
    s.pages += 1;
    let start = match query.get("marker") {
        Some(marker) => match items.iter().position(|(k, _)| k == marker) {
            Some(at) => at + 1,
            None => return error(StatusCode::BAD_REQUEST, "Bad Request", &format!("Marker {marker} not found.")),
        },
        None => 0,
    };
    let wanted = query.get("limit").and_then(|l| l.parse::<usize>().ok());
    let limit = match (wanted, s.page_size) {
        (Some(w), Some(p)) => w.min(p).max(1),
        (Some(one), None) | (None, Some(one)) => one.max(1),
        (None, None) => items.len().max(1),
    };
    let end = (start + limit).min(items.len());
    let others: Vec<(&String, &String)> = query.iter().filter(|(k, _)| *k != "marker" && *k != "limit").collect();
    let link = |marker: Option<&str>| {
        let mut pairs: Vec<String> = others.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if s.page_size.is_some() || wanted.is_some() {
            pairs.push(format!("limit={limit}"));
        }
        if let Some(marker) = marker {
            pairs.push(format!("marker={marker}"));
        }
        if pairs.is_empty() {
            format!("{origin}{path}")
        } else {
            format!("{origin}{path}?{}", pairs.join("&"))
        }
    };
    let marker_before = |at: usize| (at > 0).then(|| items[at - 1].0.as_str());
    let next = (end < items.len()).then(|| link(marker_before(end)));
    let previous = (start > 0).then(|| link(marker_before(start.saturating_sub(limit))));
    let page: Vec<&Value> = items[start.min(end)..end].iter().map(|(_, v)| v).collect();
    let body = json!({key: page, "links": {"self": link(marker_before(start)), "previous": previous, "next": next}});
    (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response()
}

/// `POST /v3/auth/tokens`.
fn issue(s: &mut Fake, body: &[u8]) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return error(StatusCode::BAD_REQUEST, "Bad Request", "Expecting to find auth in request body.");
    };
    let auth = &request["auth"];
    let methods: Vec<&str> =
        auth["identity"]["methods"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let (user, project, method) = match methods.as_slice() {
        ["password"] => {
            let u = &auth["identity"]["password"]["user"];
            let domain = domain_id(s, &u["domain"]);
            let Some(user) = s.users.iter().find(|user| {
                Some(user.id.as_str()) == u["id"].as_str()
                    || (Some(user.name.as_str()) == u["name"].as_str() && domain.as_deref() == Some(&user.domain_id))
            }) else {
                return unauthorized();
            };
            if u["password"].as_str() != Some(user.password.as_str()) {
                return unauthorized();
            }
            let p = &auth["scope"]["project"];
            let domain = domain_id(s, &p["domain"]);
            let Some(project) = s.projects.iter().find(|project| {
                Some(project.id.as_str()) == p["id"].as_str()
                    || (Some(project.name.as_str()) == p["name"].as_str()
                        && domain.as_deref() == Some(&project.domain_id))
            }) else {
                return unauthorized();
            };
            if !s.assignments.iter().any(|a| a.user == user.id && a.project == project.id) {
                return unauthorized();
            }
            (user.id.clone(), project.id.clone(), "password")
        }
        ["application_credential"] => {
            let c = &auth["identity"]["application_credential"];
            let Some((secret, user, project)) = c["id"].as_str().and_then(|id| s.credentials.get(id)) else {
                return unauthorized();
            };
            if c["secret"].as_str() != Some(secret.as_str()) || !auth["scope"].is_null() {
                return unauthorized();
            }
            (user.clone(), project.clone(), "application_credential")
        }
        _ => return error(StatusCode::BAD_REQUEST, "Bad Request", "Expecting to find identity methods in auth."),
    };
    s.issued += 1;
    let value = format!("gAAAAAfake-{}", s.issued);
    let now = OffsetDateTime::now_utc();
    let expires = now + s.token_lifetime;
    s.tokens.insert(value.clone(), expires);
    let body = json!({"token": {
        "methods": [method],
        "user": {"id": user, "domain": {"id": "default", "name": "Default"}},
        "project": {"id": project, "domain": {"id": "default", "name": "Default"}},
        "roles": [{"id": "admin", "name": "admin"}],
        "audit_ids": [format!("audit-{}", s.issued)],
        "issued_at": keystone_time(now),
        "expires_at": keystone_time(expires),
    }});
    (StatusCode::CREATED, [("content-type", "application/json"), ("x-subject-token", value.as_str())], body.to_string())
        .into_response()
}

/// A `domain` object's id: given, or found by its name.
fn domain_id(s: &Fake, domain: &Value) -> Option<String> {
    if let Some(id) = domain["id"].as_str() {
        return Some(id.to_owned());
    }
    let name = domain["name"].as_str()?;
    s.domains.iter().find(|(_, n)| n == name).map(|(id, _)| id.clone())
}

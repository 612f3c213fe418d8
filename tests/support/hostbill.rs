//! A fake HostBill Admin API following `../shared/reference/billing-apis.md` §2: one endpoint,
//! form-encoded calls with `api_id`/`api_key`/`call`, replies in the `{"success", "call",
//! "server_time"}` envelope with ids as strings, `sorter` pagination (25 per page), errors as
//! `{"success": false, "error": [..]}` with HTTP 200 (the case the reference marks unverified).
//! `getClientDetails` answers the client with its `credit` as a string (`"25.00"`, set by the
//! test); `meteredGetUsage` prices each entry at the test's price of its variable (zero
//! without one): every value's `charge` is qty × price and the variable's `charge` the sum of its
//! values', both JSON numbers as in the reference's examples (`"charge": 5`), where ids and
//! quantities are strings.
//!
//! What it cannot reproduce: billing periods (it keeps and charges every period's usage, where
//! real HostBill's `meteredGetUsage` shows the current one), pricing schemes other than a flat
//! price per unit (tiers, volume brackets, free quantities), HostBill's rounding of charges
//! (the fake charges qty × price exactly), and a client's credit moving when invoices are paid.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::{Arc, Mutex},
};

use axum::{
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    Router,
};
use concertim_billing::config::{HostBillSettings, Secret};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::fake_server::{self, form_pairs, Answers, Faults};

const API_ID: &str = "concertim";
const API_KEY: &str = "s3cr3t-key";
const PER_PAGE: usize = 25;

#[derive(Default)]
struct Fake {
    next_id: u64,
    clients: Vec<Client>,
    accounts: Vec<Account>,
    usage: Vec<Usage>,
    refuse_next: VecDeque<String>,
    /// Price per unit of each metered variable.
    prices: BTreeMap<String, Decimal>,
}

struct Client {
    id: String,
    email: String,
    lastname: String,
    credit: Decimal,
}

struct Account {
    id: String,
    order_id: String,
    client_id: String,
    product_id: String,
    domain: String,
    status: &'static str,
}

struct Usage {
    account_id: String,
    variable: String,
    qty: Decimal,
    rawoutput: String,
    date_created: String,
}

/// The running fake.
#[derive(Clone)]
pub struct FakeHostBill {
    /// Its base URL.
    pub url: String,
    state: Arc<Mutex<Fake>>,
    faults: Faults,
}

/// What HostBill holds, in comparable terms.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostBillState {
    /// Project ids of the clients.
    pub clients: BTreeSet<String>,
    /// Instance uuid → (product of the live or newest account, live?).
    pub accounts: BTreeMap<String, (String, bool)>,
    /// (instance uuid, variable) → total quantity.
    pub usage: BTreeMap<(String, String), Decimal>,
}

fn reply(call: &str, mut extra: Value) -> Response {
    let body = extra.as_object_mut().unwrap();
    body.insert("success".into(), json!(true));
    body.insert("call".into(), json!(call));
    body.insert("server_time".into(), json!(1_764_000_000));
    (StatusCode::OK, [("content-type", "application/json")], Value::Object(body.clone()).to_string()).into_response()
}

fn refuse(call: &str, error: &str) -> Response {
    let body = json!({"success": false, "call": call, "server_time": 1_764_000_000, "error": [error]});
    (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response()
}

fn sorter(total: usize, page: usize) -> Value {
    json!({"perpage": PER_PAGE, "totalpages": total.div_ceil(PER_PAGE).max(1), "sorterrecords": total.to_string(), "sorterpage": page})
}

impl FakeHostBill {
    /// Starts the fake on a free port.
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(Fake { next_id: 10, ..Fake::default() }));
        // A failing HostBill answers the web server's HTML error page.
        let failed = |status| (status, "<html><body>Service Unavailable</body></html>").into_response();
        let faults = Faults::new(Answers { failed, ..Answers::EMPTY });
        let app = Router::new().fallback(handle).with_state(Arc::clone(&state));
        let url = fake_server::serve(app, &faults).await;
        Self { url, state, faults }
    }

    /// Settings for the backend; `products` maps plan names to product ids.
    pub fn settings(&self, products: &[(&str, &str)]) -> HostBillSettings {
        HostBillSettings {
            url: Some(self.url.clone()),
            api_id: Some(API_ID.into()),
            api_key: Some(Secret::new(API_KEY)),
            products: products.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            client_email_domain: "openstack.invalid".into(),
            cycle: "m".into(),
            ca_file: None,
            timeout_ms: 5_000,
            connect_timeout_ms: 1_000,
        }
    }

    /// The next requests get these HTTP statuses with an HTML error page.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.faults.fail_next(statuses);
    }

    /// The next call answers `success: false` with this error.
    pub fn refuse_next(&self, error: &str) {
        self.state.lock().unwrap().refuse_next.push_back(error.to_owned());
    }

    /// Prices usage of `variable` at `price` per unit, in every charge from now on.
    pub fn set_price(&self, variable: &str, price: Decimal) {
        self.state.lock().unwrap().prices.insert(variable.to_owned(), price);
    }

    /// Gives the client of a project (which must exist) this credit balance.
    pub fn set_credit(&self, project: &str, credit: Decimal) {
        let mut s = self.state.lock().unwrap();
        s.clients.iter_mut().find(|c| c.lastname == project).expect("the client exists").credit = credit;
    }

    /// What the usage of each resource (an account's domain) costs at the test's prices.
    pub fn charges(&self) -> BTreeMap<String, Decimal> {
        let s = self.state.lock().unwrap();
        let mut out = BTreeMap::new();
        for u in &s.usage {
            let domain = s.accounts.iter().find(|a| a.id == u.account_id).unwrap().domain.clone();
            *out.entry(domain).or_default() += u.qty * s.prices.get(&u.variable).copied().unwrap_or_default();
        }
        out
    }

    /// Usage entries stored.
    pub fn usage_rows(&self) -> usize {
        self.state.lock().unwrap().usage.len()
    }

    /// Everything, in comparable terms.
    pub fn state(&self) -> HostBillState {
        let s = self.state.lock().unwrap();
        let mut out =
            HostBillState { clients: s.clients.iter().map(|c| c.lastname.clone()).collect(), ..Default::default() };
        for a in &s.accounts {
            let live = a.status != "Terminated";
            let better = match out.accounts.get(&a.domain) {
                None => true,
                Some((_, was_live)) => live || !was_live,
            };
            if better {
                out.accounts.insert(a.domain.clone(), (a.product_id.clone(), live));
            }
        }
        for u in &s.usage {
            let domain = s.accounts.iter().find(|a| a.id == u.account_id).unwrap().domain.clone();
            *out.usage.entry((domain, u.variable.clone())).or_default() += u.qty;
        }
        out
    }
}

async fn handle(State(state): State<Arc<Mutex<Fake>>>, body: Bytes) -> Response {
    let mut s = state.lock().unwrap();
    let f = form_pairs(&String::from_utf8_lossy(&body));
    let call = f.get("call").cloned().unwrap_or_default();
    if f.get("api_id").map(String::as_str) != Some(API_ID) || f.get("api_key").map(String::as_str) != Some(API_KEY) {
        return refuse(&call, "API authorization failed");
    }
    if let Some(error) = s.refuse_next.pop_front() {
        return refuse(&call, &error);
    }
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    let page: usize = get("page").parse().unwrap_or(1).max(1);
    match call.as_str() {
        "addClient" => {
            let (email, password, password2) = (get("email"), get("password"), get("password2"));
            if email.is_empty() || password.is_empty() || password2.is_empty() {
                return refuse(&call, "Required fields: email, password, password2");
            }
            if password != password2 {
                return refuse(&call, "Passwords do not match");
            }
            if s.clients.iter().any(|c| c.email.eq_ignore_ascii_case(&email)) {
                return refuse(&call, "Email address is already in use");
            }
            s.next_id += 1;
            let id = s.next_id.to_string();
            s.clients.push(Client { id: id.clone(), email, lastname: get("lastname"), credit: Decimal::ZERO });
            reply(&call, json!({"client_id": id, "info": ["New client account created"]}))
        }
        "getClients" => {
            let total = s.clients.len();
            let rows: Vec<Value> = s
                .clients
                .iter()
                .skip((page - 1) * PER_PAGE)
                .take(PER_PAGE)
                .map(|c| {
                    let services = s.accounts.iter().filter(|a| a.client_id == c.id).count();
                    json!({"id": c.id, "firstname": "OpenStack project", "lastname": c.lastname, "datecreated": "2025-01-01", "email": c.email, "companyname": c.lastname, "services": services})
                })
                .collect();
            reply(&call, json!({"clients": rows, "sorter": sorter(total, page)}))
        }
        "addOrder" => {
            for k in ["client_id", "product", "cycle", "confirm", "invoice_generate", "invoice_info"] {
                if !f.contains_key(k) {
                    return refuse(&call, &format!("Missing parameter: {k}"));
                }
            }
            if !s.clients.iter().any(|c| c.id == get("client_id")) {
                return refuse(&call, "Client not found");
            }
            s.next_id += 1;
            let order_id = s.next_id.to_string();
            s.next_id += 1;
            let id = s.next_id.to_string();
            let account = Account {
                id,
                order_id: order_id.clone(),
                client_id: get("client_id"),
                product_id: get("product"),
                domain: get("domain"),
                status: "Pending",
            };
            s.accounts.push(account);
            reply(&call, json!({"order_id": order_id, "info": ["New Order created"]}))
        }
        "setOrderActive" => match s.accounts.iter_mut().find(|a| a.order_id == get("id")) {
            Some(a) => {
                a.status = "Active";
                let id = a.order_id.clone();
                reply(&call, json!({"id": id, "info": [format!("Order #{id} activated")]}))
            }
            None => refuse(&call, "Order not found"),
        },
        "getClientDetails" => match s.clients.iter().find(|c| c.id == get("id")) {
            Some(c) => reply(
                &call,
                json!({"client": {"id": c.id, "client_id": c.id, "email": c.email, "status": "Active", "parent_id": "0",
                    "firstname": "OpenStack project", "lastname": c.lastname, "companyname": c.lastname,
                    "datecreated": "2025-01-01", "language": "english", "credit": format!("{:.2}", c.credit),
                    "taxexempt": "0", "currency_id": "1", "country": "GB", "countryname": "United Kingdom"}}),
            ),
            None => refuse(&call, "Client not found"),
        },
        "getAccounts" => {
            let domain = f.get("filter[domain]");
            let list = get("list");
            let matching: Vec<&Account> = s
                .accounts
                .iter()
                .filter(|a| domain.is_none_or(|d| &a.domain == d))
                .filter(|a| match list.as_str() {
                    "all_active" => a.status == "Active",
                    "all_terminated" => a.status == "Terminated",
                    _ => true,
                })
                .collect();
            let total = matching.len();
            let rows: Vec<Value> = matching
                .into_iter()
                .skip((page - 1) * PER_PAGE)
                .take(PER_PAGE)
                .map(|a| {
                    let client = s.clients.iter().find(|c| c.id == a.client_id).unwrap();
                    json!({"id": a.id, "manual": "0", "domain": a.domain, "billingcycle": "Monthly", "status": a.status, "total": "0.00", "next_due": "2025-04-01", "name": format!("Product {}", a.product_id), "type": "Other", "lastname": client.lastname, "firstname": "OpenStack project"})
                })
                .collect();
            reply(&call, json!({"accounts": rows, "sorter": sorter(total, page)}))
        }
        "getAccountDetails" => match s.accounts.iter().find(|a| a.id == get("id")) {
            Some(a) => reply(
                &call,
                json!({"details": {"id": a.id, "client_id": a.client_id, "order_id": a.order_id, "product_id": a.product_id, "domain": a.domain, "status": a.status, "billingcycle": "Monthly", "paytype": "Metered", "total": "0.00"}}),
            ),
            None => refuse(&call, "Account not found"),
        },
        "accountTerminate" => match s.accounts.iter_mut().find(|a| a.id == get("id")) {
            Some(a) if a.status == "Terminated" => refuse(&call, "Account is already terminated"),
            Some(a) => {
                a.status = "Terminated";
                reply(&call, json!({"info": ["Account terminated"]}))
            }
            None => refuse(&call, "Account not found"),
        },
        "meteredAddUsageBulk" => {
            let account_id = get("account_id");
            if !s.accounts.iter().any(|a| a.id == account_id) {
                return refuse(&call, "Account not found");
            }
            let names: BTreeSet<String> = f
                .keys()
                .filter_map(|k| k.strip_prefix("variables[")?.split_once(']').map(|(n, _)| n.to_owned()))
                .collect();
            let mut ids = serde_json::Map::new();
            for name in names {
                let field = |x: &str| f.get(&format!("variables[{name}][{x}]")).cloned().unwrap_or_default();
                let Ok(qty) = field("qty").parse::<Decimal>() else { return refuse(&call, "Invalid qty") };
                if field("date_created") != field("date_updated") {
                    return refuse(&call, "date_updated must equal date_created");
                }
                s.next_id += 1;
                ids.insert(name.clone(), json!(s.next_id.to_string()));
                let usage = Usage {
                    account_id: account_id.clone(),
                    variable: name.clone(),
                    qty,
                    rawoutput: field("rawoutput"),
                    date_created: field("date_created"),
                };
                s.usage.push(usage);
            }
            reply(&call, json!({"usage_ids": ids}))
        }
        "meteredGetUsage" => {
            let account_id = get("account_id");
            let Some(account) = s.accounts.iter().find(|a| a.id == account_id) else {
                return refuse(&call, "Account not found");
            };
            let price = |name: &str| s.prices.get(name).copied().unwrap_or_default();
            // A charge as HostBill's examples write it: a JSON number.
            let number = |d: Decimal| -> Value { serde_json::from_str(&d.normalize().to_string()).unwrap() };
            let mut variables = serde_json::Map::new();
            for (i, name) in s
                .usage
                .iter()
                .filter(|u| u.account_id == account_id)
                .map(|u| u.variable.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .enumerate()
            {
                let values: Vec<Value> = s
                    .usage
                    .iter()
                    .filter(|u| u.account_id == account_id && u.variable == name)
                    .map(|u| json!({"id": "1", "variable_name": u.variable, "unit_name": u.variable, "cycle": "monthly", "date_created": u.date_created, "name": u.variable, "date_updated": u.date_created, "charge": number(u.qty * price(&u.variable)), "qty": u.qty.to_string(), "output": "", "rawoutput": u.rawoutput, "variable_id": (i + 1).to_string(), "scheme": "", "options": []}))
                    .collect();
                let (usage, charge): (Decimal, Decimal) = s
                    .usage
                    .iter()
                    .filter(|u| u.account_id == account_id && u.variable == name)
                    .fold((Decimal::ZERO, Decimal::ZERO), |(q, c), u| (q + u.qty, c + u.qty * price(&name)));
                variables.insert(
                    (i + 1).to_string(),
                    json!({"id": (i + 1).to_string(), "product_id": account.product_id, "name": name, "variable_name": name, "unit_name": name, "cycle": "monthly", "scheme": "", "options": [], "usage": usage.normalize().to_string(), "charge": number(charge), "values": values}),
                );
            }
            reply(&call, json!({"variables": variables}))
        }
        _ => refuse(&call, "Unknown API call"),
    }
}

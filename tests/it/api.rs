//! The billing API as Concertim and its cluster builder call it (`reference/original-service.md`
//! §4.3): every route's request and answer, over the embedded ledger and over KillBill (the
//! real server when `CONCERTIM_BILLING_KILLBILL_URL` is set, as in CI, else the fake); Rails-signed tokens
//! accepted, forged and expired ones refused; retried writes not doubled; the credit guard.

use std::time::Duration;

use concertim_billing::{
    api::jwt,
    billing::{accounts::Accounts, Billing, KillBill, Ledger},
    event::ProjectId,
    fixture::FixtureDelivery,
};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::support::{
    bus::{spawn_app_with_api, TestApp, TestBus, API_SECRET},
    deliveries,
    killbill_server::KillBillServer,
    wait::eventually,
};

fn now() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// A token as Concertim's job runner signs it: HS256, `{"exp": now + 60}`.
fn rails_token(secret: &str) -> String {
    jwt::sign(&json!({"exp": now() + 60}), secret.as_bytes())
}

/// POSTs `body` to `route` with `token`: the status and the JSON answer.
async fn post(url: &str, route: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(format!("{url}{route}")).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{route}: {e}: {text}")))
}

/// A failure as the Python service answered them: `{success: false, error, message}`.
fn assert_failure(answer: &(u16, Value), status: u16, error: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["success"], json!(false), "{}", answer.1);
    assert_eq!(answer.1["error"], json!(error), "{}", answer.1);
    assert!(answer.1["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", answer.1);
}

/// A success: 201 and `success: true`.
fn assert_success(answer: &(u16, Value)) -> &Value {
    assert_eq!(answer.0, 201, "{}", answer.1);
    assert_eq!(answer.1["success"], json!(true), "{}", answer.1);
    &answer.1
}

fn money(v: &Value) -> Decimal {
    v.to_string().parse().unwrap_or_else(|_| panic!("{v} is not an amount"))
}

/// A Keystone `project.created` for `project`, and a Nova `create.end` for `instance` launched
/// three hours ago, so the settlement bills its hours at once.
fn lifecycle(project: &str, instance: &str) -> Vec<FixtureDelivery> {
    let find = |event: &str| {
        deliveries("nova-legacy")
            .into_iter()
            .find(|d| String::from_utf8_lossy(&d.body).contains(&format!("\\\"event_type\\\": \\\"{event}\\\"")))
            .unwrap_or_else(|| panic!("fixtures/nova-legacy has {event}"))
    };
    let rewrite = |template: FixtureDelivery, id: &str, edit: &dyn Fn(&mut Value)| {
        let envelope: Value = serde_json::from_slice(&template.body).unwrap();
        let mut message: Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
        message["message_id"] = json!(id);
        edit(&mut message);
        let body = json!({"oslo.version": "2.0", "oslo.message": message.to_string()});
        FixtureDelivery { body: serde_json::to_vec(&body).unwrap(), ..template }
    };
    let launched = concertim_billing::event::Timestamp::from_unix(now() - 3 * 3_600).unwrap().to_rfc3339();
    vec![
        rewrite(find("identity.project.created"), &format!("api-project-{project}"), &|m| {
            m["payload"]["resource_info"] = json!(project);
        }),
        rewrite(find("compute.instance.create.end"), &format!("api-create-{instance}"), &|m| {
            m["timestamp"] = json!(launched);
            m["payload"]["launched_at"] = json!(launched);
            m["payload"]["instance_id"] = json!(instance);
            m["payload"]["tenant_id"] = json!(project);
        }),
    ]
}

/// Publishes the lifecycle of `project` and waits for its account: its id in the backend.
async fn account_of<B: Billing + 'static>(bus: &TestBus, app: &TestApp<B>, project: &str, instance: &str) -> String {
    for delivery in lifecycle(project, instance) {
        bus.publish(&delivery).await;
    }
    let project = ProjectId::parse(project).unwrap();
    eventually("the project's account", Duration::from_secs(60), || async {
        app.executor.billing().account_ref(&project).await.ok().flatten()
    })
    .await
}

/// Every route, as §4.3 says, on the account of `project` (with an instance billed by the
/// hour); `other` is an account of another project.
async fn every_route_answers_as_section_4_3_says<B: Billing + Accounts + 'static>(test: &str, billing: B) {
    let mut bus = TestBus::new(test).await;
    bus.settings.billing.time.settle_every_s = 1;
    bus.settings.billing.time.grace_s = 0;
    let (app, url) = spawn_app_with_api(&bus, billing).await;
    let suffix: String = test.chars().filter(char::is_ascii_alphanumeric).take(8).collect();
    let project = format!("{suffix:0<8}000000000000000000000001");
    let other_project = format!("{suffix:0<8}000000000000000000000002");
    let instance = "00000000-0000-4000-8000-00000000c001";
    let account = account_of(&bus, &app, &project, instance).await;
    let other = account_of(&bus, &app, &other_project, "00000000-0000-4000-8000-00000000c002").await;
    let token = rails_token(API_SECRET);
    let t = Some(token.as_str());

    // The hours are billed: the upcoming invoice shows the instance's cost.
    let draft = eventually("the upcoming invoice to show the instance's hours", Duration::from_secs(90), || async {
        let answer = post(
            &url,
            "/get_draft_invoice",
            t,
            &json!({"invoice": {"billing_acct_id": account, "target_date": "2026-12-31"}}),
        )
        .await;
        let draft = assert_success(&answer)["draft_invoice"].clone();
        (draft.is_object() && money(&draft["amount"]) > Decimal::ZERO).then_some(draft)
    })
    .await;
    for field in
        ["invoice_id", "account_id", "amount", "balance", "credit_adj", "refund_adj", "currency", "status", "items"]
    {
        assert!(draft.get(field).is_some(), "draft_invoice.{field}: {draft}");
    }
    let lines: Vec<&Value> = draft["items"].as_object().unwrap().values().collect();
    assert!(
        lines.iter().any(|l| l["type"] == "cost" && l["resource_id"] == json!(instance)),
        "a cost line of the instance: {draft}"
    );
    let upcoming = money(&draft["amount"]);

    // No credits: the cluster builder's order is refused, as a clean answer.
    let credits = post(&url, "/get_credits", t, &json!({"credits": {"billing_account_id": account}})).await;
    // Credits less the upcoming invoice, which only grows as hours are billed.
    assert!(money(&assert_success(&credits)["credits"]) <= -upcoming, "{}", credits.1);
    let refused = post(&url, "/create_order", t, &json!({"order": {"billing_account_id": account}})).await;
    assert_failure(&refused, 402, "InsufficientCredits");

    // A deposit, sent twice as a retry sends it (same token, same body): credited once.
    let deposit = json!({"credits": {"billing_acct_id": account, "amount": 100}});
    for _ in 0..2 {
        let answer = post(&url, "/credits", t, &deposit).await;
        assert_eq!(money(&assert_success(&answer)["credits"]), Decimal::from(100));
    }
    let credits = post(&url, "/get_credits", t, &json!({"credits": {"billing_account_id": account}})).await;
    let remaining = money(&assert_success(&credits)["credits"]);
    // The hours go on being billed meanwhile: never more than 100 less the first draft.
    assert!(remaining <= Decimal::from(100) - upcoming && remaining > Decimal::from(90), "{remaining}");

    // Now the order is accepted; a retry answers the same order.
    let order_request = json!({"order": {"billing_account_id": account}});
    let order = post(&url, "/create_order", t, &order_request).await;
    let order_id = assert_success(&order)["order"].as_str().expect("the order id is a string").to_owned();
    let again = post(&url, "/create_order", t, &order_request).await;
    assert_eq!(assert_success(&again)["order"], json!(order_id));
    // Another token is another request: another order.
    let later = jwt::sign(&json!({"exp": now() + 61}), API_SECRET.as_bytes());
    let second = post(&url, "/create_order", Some(&later), &order_request).await;
    assert_ne!(assert_success(&second)["order"], json!(order_id));

    // The cluster builder tags it with its stack, twice on a retry.
    for (name, value) in [("openstack_stack_id", "stack-0001"), ("openstack_stack_name", "hpc-1")] {
        let tag = json!({"tag": {"order_id": order_id, "tag_name": name, "tag_value": value}});
        for _ in 0..2 {
            let answer = post(&url, "/add_order_tag", t, &tag).await;
            assert_eq!(assert_success(&answer)["tag"], json!(order_id));
        }
    }
    let retag = json!({"tag": {"order_id": order_id, "tag_name": "openstack_stack_id", "tag_value": "stack-0002"}});
    assert_failure(&post(&url, "/add_order_tag", t, &retag).await, 409, "Conflict");

    // The deposit is an invoice of the account, with its credits line.
    let listed = post(
        &url,
        "/list_paginated_invoices",
        t,
        &json!({"invoices": {"billing_acct_id": account, "offset": 0, "limit": 100}}),
    )
    .await;
    let listed = assert_success(&listed);
    let invoices = listed["invoices"].as_array().unwrap();
    assert_eq!(listed["total_invoices"], json!(invoices.len()));
    let credit_invoice = invoices
        .iter()
        .find(|i| {
            i["items"]
                .as_object()
                .unwrap()
                .values()
                .any(|l| l["type"] == "credits" && money(&l["amount"]) == Decimal::from(100))
        })
        .unwrap_or_else(|| panic!("an invoice with the deposit's credits line: {listed}"));
    assert_eq!(credit_invoice["account_id"], json!(account));
    let id = credit_invoice["invoice_id"].as_str().unwrap();
    let one =
        post(&url, "/get_account_invoice", t, &json!({"invoice": {"billing_acct_id": account, "invoice_id": id}}))
            .await;
    assert_eq!(assert_success(&one)["invoice"]["invoice_id"], json!(id));
    // Never served for another account.
    let stolen =
        post(&url, "/get_account_invoice", t, &json!({"invoice": {"billing_acct_id": other, "invoice_id": id}})).await;
    assert_failure(&stolen, 404, "NotFound");
    let empty = post(
        &url,
        "/list_paginated_invoices",
        t,
        &json!({"invoices": {"billing_acct_id": other, "offset": 5, "limit": 1}}),
    )
    .await;
    assert_eq!(assert_success(&empty)["invoices"], json!([]));

    // The cluster failed: the order is deleted, twice on a retry.
    for _ in 0..2 {
        let answer = post(&url, "/delete_order", t, &json!({"order": {"order_id": order_id}})).await;
        assert_eq!(assert_success(&answer)["order"], json!(order_id));
    }
    // A resource's own subscription is not an order: never cancelled through the API.
    let unknown =
        post(&url, "/delete_order", t, &json!({"order": {"order_id": "00000000-0000-4000-8000-000000000000"}})).await;
    assert_failure(&unknown, 404, "NotFound");
    let nobody = post(&url, "/get_credits", t, &json!({"credits": {"billing_account_id": "no-such-account"}})).await;
    assert_failure(&nobody, 404, "NotFound");

    refusals(&url, &account).await;
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

/// What is refused, and how.
async fn refusals(url: &str, account: &str) {
    let body = json!({"credits": {"billing_account_id": account}});
    let expired = jwt::sign(&json!({"exp": now() - 3_600}), API_SECRET.as_bytes());
    let forged = rails_token("another-secret-than-concertims-0123456789");
    for token in [None, Some(expired.as_str()), Some(forged.as_str()), Some("not.a.jwt")] {
        assert_failure(&post(url, "/get_credits", token, &body).await, 401, "Unauthorized");
    }
    let token = rails_token(API_SECRET);
    let t = Some(token.as_str());
    assert_failure(&post(url, "/get_credits", t, &json!({"credit": {}})).await, 400, "BadRequest");
    for amount in [json!(-5), json!(0), json!("lots"), json!(1e12), json!(0.001)] {
        let deposit = json!({"credits": {"billing_acct_id": account, "amount": amount}});
        assert_failure(&post(url, "/credits", t, &deposit).await, 400, "BadRequest");
    }
    assert_failure(&post(url, "/statistics", t, &body).await, 404, "NotFound");
    let huge = json!({"credits": {"billing_account_id": account, "pad": "x".repeat(100_000)}});
    assert_failure(&post(url, "/get_credits", t, &huge).await, 413, "PayloadTooLarge");
    let response = reqwest::Client::new().get(format!("{url}/get_credits")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let text = response.text().await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["success"], json!(false), "{text}");
    let not_json = reqwest::Client::new()
        .post(format!("{url}/get_credits"))
        .bearer_auth(&token)
        .body("{credits:")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status().as_u16(), 400);
}

#[tokio::test]
async fn every_route_answers_as_the_python_service_did_with_the_ledger() {
    every_route_answers_as_section_4_3_says("api-ledger", Ledger::in_memory()).await;
}

#[tokio::test]
async fn every_route_answers_as_the_python_service_did_with_killbill() {
    let server = KillBillServer::start().await;
    if let KillBillServer::Fake(fake) = &server {
        // The real server prices from its catalog; the fake from the test's list.
        for (unit, price) in [("openstack-instance-seconds", "0.000001"), ("openstack-vcpu-seconds", "0.00001")] {
            fake.set_price(unit, price.parse().unwrap());
        }
    }
    every_route_answers_as_section_4_3_says("api-killbill", KillBill::new(server.settings()).unwrap()).await;
}

//! The billing API over the real KillBill on its test clock: a project's November invoiced, then
//! what Concertim's pages and the cluster builder see through the API: the invoice with its
//! instance's cost line equal to KillBill's own items, the credit guard refusing an order, a
//! deposit (sent twice) credited once, and the order accepted after it.

use std::sync::Arc;

use concertim_billing::{
    api::{self, jwt, ApiState},
    billing::KillBill,
    config::{ApiSettings, Secret},
};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::{
    helpers::{bill_november, decimal, invoiced, print_invoices, set_clock, CLOCK},
    month::{nova_in, settings, Vm, SMALL},
    support::killbill_server::{real_url, RealKillBill},
};

const PROJECT: &str = "a91c0d9b8f4e2a8c6d4b2a0f1e3d5c7e";
const VM: Vm = Vm { id: "1a000000-0000-4000-8000-00000000001a", name: "api-vm" };
const SECRET: &str = "the-secret-concertim-signs-with-0123456789";

async fn post(url: &str, route: &str, token: &str, body: &Value) -> (u16, Value) {
    let response =
        reqwest::Client::new().post(format!("{url}{route}")).bearer_auth(token).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{route}: {e}: {text}")))
}

#[tokio::test]
async fn through_the_api_an_invoice_is_killbills_a_deposit_counts_once_and_an_order_waits_for_credits() {
    let Some(url) = real_url() else {
        eprintln!("skipped: no real KillBill (CONCERTIM_BILLING_KILLBILL_URL); deploy/dev/test.sh starts one");
        return;
    };
    let _clock = CLOCK.lock().await;
    let real = RealKillBill::start(&url).await;
    let vm = |event: &str, sent: &str, state: &str, times| nova_in(PROJECT, &VM, SMALL, event, sent, state, times).body;
    // Ten days on m1.small, cancelled on the 11th: invoiced at its cancellation.
    let deliveries = vec![
        (vm("create.end", "11-01 00:00:00.100000", "active", ["11-01 00:00:00", "", ""]), false),
        (vm("delete.end", "11-11 00:00:02", "deleted", ["11-01 00:00:00", "11-11 00:00:00", "11-11 00:00:01"]), false),
    ];
    let account = bill_november(&real, settings(), &deliveries, PROJECT).await;
    let (items, totals) = invoiced(&real, &account).await;
    print_invoices(&items, &totals);
    let billed: Decimal = totals.iter().map(|(_, amount, _)| *amount).sum();
    assert!(billed > Decimal::ZERO, "KillBill invoiced the ten days");

    let settings = ApiSettings { jwt_secret: Some(Secret::new(SECRET)), ..ApiSettings::default() };
    let state = ApiState::new(Arc::new(KillBill::new(real.settings()).unwrap()), settings, Decimal::from(25), 2);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(concertim_billing::http::serve(listener, api::router(Arc::new(state)), stop.clone()));
    // Rails signs with the wall clock, which the API checks: KillBill's test clock is not it.
    let now =
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap();
    let token = jwt::sign(&json!({"exp": now + 60}), SECRET.as_bytes());

    // The invoice as Concertim's page reads it: KillBill's amount, one cost line of the instance.
    let (status, listed) =
        post(&api_url, "/list_paginated_invoices", &token, &json!({"invoices": {"billing_acct_id": account}})).await;
    assert_eq!(status, 201, "{listed}");
    let invoices = listed["invoices"].as_array().unwrap();
    assert_eq!(listed["total_invoices"], json!(totals.len()), "{listed}");
    let shown: Decimal = invoices.iter().map(|i| decimal(&i["amount"])).sum();
    assert_eq!(shown, billed, "{listed}");
    let line: Decimal = invoices
        .iter()
        .flat_map(|i| i["items"].as_object().unwrap().values())
        .filter(|l| l["type"] == "cost" && l["resource_id"] == json!(VM.id))
        .map(|l| decimal(&l["amount"]))
        .sum();
    let items_of_vm: Decimal = items.iter().filter(|i| i.resource == VM.id).map(|i| i.amount).sum();
    assert_eq!(line, items_of_vm, "the instance's cost line is KillBill's items");
    let first = invoices.iter().find(|i| decimal(&i["amount"]) > Decimal::ZERO).unwrap();
    let id = first["invoice_id"].as_str().unwrap();
    let (status, one) = post(
        &api_url,
        "/get_account_invoice",
        &token,
        &json!({"invoice": {"billing_acct_id": account, "invoice_id": id}}),
    )
    .await;
    assert_eq!((status, &one["invoice"]), (201, first), "{one}");

    // Nothing deposited: the order is refused at the threshold.
    let (status, credits) =
        post(&api_url, "/get_credits", &token, &json!({"credits": {"billing_account_id": account}})).await;
    assert_eq!(status, 201, "{credits}");
    assert!(decimal(&credits["credits"]) <= Decimal::from(25), "{credits}");
    let order = json!({"order": {"billing_account_id": account}});
    let (status, refused) = post(&api_url, "/create_order", &token, &order).await;
    assert_eq!((status, &refused["error"]), (402, &json!("InsufficientCredits")), "{refused}");

    // 100 deposited, the request sent twice: credited once.
    let deposit = json!({"credits": {"billing_acct_id": account, "amount": "100.00"}});
    for _ in 0..2 {
        let (status, answer) = post(&api_url, "/credits", &token, &deposit).await;
        assert_eq!((status, decimal(&answer["credits"])), (201, Decimal::from(100)), "{answer}");
    }
    let (_, credits) =
        post(&api_url, "/get_credits", &token, &json!({"credits": {"billing_account_id": account}})).await;
    let credits = decimal(&credits["credits"]);
    let (_, listed) =
        post(&api_url, "/list_paginated_invoices", &token, &json!({"invoices": {"billing_acct_id": account}})).await;
    set_clock(&real, None).await;
    eprintln!("credits after the deposit: {credits}; invoices: {listed}");
    // KillBill pays the unpaid invoice from the new credit: what is left is 100 less it.
    assert_eq!(credits, Decimal::from(100) - billed, "{listed}");
    let deposits = listed["invoices"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["items"].as_object().unwrap().values())
        .filter(|l| l["type"] == "credits" && decimal(&l["amount"]) == Decimal::from(100))
        .count();
    assert_eq!(deposits, 1, "one deposit: {listed}");

    let (status, accepted) = post(&api_url, "/create_order", &token, &order).await;
    assert_eq!(status, 201, "{accepted}");
    assert!(accepted["order"].as_str().is_some_and(|o| !o.is_empty()), "{accepted}");
    stop.cancel();
}

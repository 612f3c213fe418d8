//! The Keystone client against the fake Keystone: tokens (renewal on a 401, before expiry, one
//! renewal for concurrent callers), paging, TLS verification and wrong credentials.

use std::{path::Path, sync::Arc};

use concertim_billing::{
    class::ErrorClass,
    event::ProjectId,
    keystone::{Keystone, KeystoneError, EXPIRY_MARGIN},
};

use crate::support::keystone::{FakeKeystone, SERVICE_PROJECT};

fn project_id(id: &str) -> ProjectId {
    ProjectId::parse(id).unwrap()
}

/// A revoked token costs exactly one new token, and the project read is the retried call's
/// answer (the first was a 401).
#[tokio::test]
async fn a_revoked_token_costs_one_new_token_and_the_call_is_answered_by_its_retry() {
    let fake = FakeKeystone::start().await;
    let id = fake.add_project("cm-alpha");
    let keystone = Keystone::new(fake.settings()).unwrap();
    keystone.project(&project_id(&id)).await.unwrap();
    assert_eq!((fake.tokens_issued(), fake.unauthorized()), (1, 0));

    fake.revoke_tokens();
    let project = keystone.project(&project_id(&id)).await.unwrap().expect("the project exists");

    assert_eq!(
        (project.id.as_str(), project.name.as_str(), project.domain_id.as_str()),
        (id.as_str(), "cm-alpha", "default")
    );
    assert_eq!((fake.tokens_issued(), fake.unauthorized(), keystone.tokens_issued()), (2, 1, 2));
}

/// Eight calls that all meet a revoked token share one renewal.
#[tokio::test]
async fn concurrent_calls_that_meet_a_revoked_token_share_one_renewal() {
    let fake = FakeKeystone::start().await;
    let id = project_id(&fake.add_project("cm-alpha"));
    let keystone = Arc::new(Keystone::new(fake.settings()).unwrap());
    keystone.project(&id).await.unwrap();
    fake.revoke_tokens();

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (keystone, id) = (Arc::clone(&keystone), id.clone());
        calls.spawn(async move { keystone.project(&id).await });
    }
    while let Some(answer) = calls.join_next().await {
        assert_eq!(answer.unwrap().unwrap().map(|p| p.name), Some("cm-alpha".into()));
    }

    assert_eq!(fake.tokens_issued(), 2, "one token, then exactly one renewal");
    assert!((1..=8).contains(&fake.unauthorized()), "{} calls were refused", fake.unauthorized());
}

/// A token that expires within the margin is replaced before it is used: no call meets a 401.
/// One that lives longer is reused.
#[tokio::test]
async fn a_token_expiring_within_the_margin_is_renewed_before_use_without_a_401() {
    let fake = FakeKeystone::start().await;
    let id = project_id(&fake.add_project("cm-alpha"));
    fake.set_token_lifetime(EXPIRY_MARGIN / 2);
    let keystone = Keystone::new(fake.settings()).unwrap();

    keystone.project(&id).await.unwrap();
    fake.set_token_lifetime(EXPIRY_MARGIN * 10);
    keystone.project(&id).await.unwrap();
    keystone.project(&id).await.unwrap();

    assert_eq!(fake.tokens_issued(), 2, "the short-lived token was renewed once, the long-lived one reused");
    assert_eq!(fake.unauthorized(), 0);
}

/// A token that expired in Keystone (its clock, not ours) is a 401 like a revoked one.
#[tokio::test]
async fn a_token_keystone_expired_early_is_renewed_on_its_401() {
    let fake = FakeKeystone::start().await;
    let keystone = Keystone::new(fake.application_credential_settings()).unwrap();
    assert_eq!(keystone.projects(Some(SERVICE_PROJECT)).await.unwrap().len(), 1);
    fake.expire_tokens();
    assert_eq!(keystone.projects(Some(SERVICE_PROJECT)).await.unwrap().len(), 1);
    assert_eq!((fake.tokens_issued(), fake.unauthorized()), (2, 1));
}

/// Projects and role assignments are read across every page of `links.next`.
#[tokio::test]
async fn projects_and_role_assignments_are_read_across_pages() {
    let fake = FakeKeystone::start().await;
    let manager = fake.add_user("concertim");
    let other = fake.add_user("someone");
    let managed_role = fake.add_role("cm-manager");
    let member = fake.add_role("member");
    let mut managed = Vec::new();
    for n in 0..5 {
        let project = fake.add_project(&format!("cm-{n}"));
        fake.assign(&manager, &managed_role, &project);
        fake.assign(&manager, &member, &project);
        fake.assign(&other, &managed_role, &project);
        managed.push(project_id(&project));
    }
    fake.assign(&manager, &member, &fake.add_project("not-managed"));
    fake.set_page_size(2);
    let keystone = Keystone::new(fake.settings()).unwrap();

    let projects = keystone.projects(None).await.unwrap();
    let names: Vec<&str> = projects.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, [SERVICE_PROJECT, "cm-0", "cm-1", "cm-2", "cm-3", "cm-4", "not-managed"]);
    assert_eq!(fake.pages(), 4, "7 projects in pages of 2");

    let user = keystone.user_id("concertim", "default").await.unwrap().expect("the user exists");
    let role = keystone.role_id("cm-manager").await.unwrap().expect("the role exists");
    assert_eq!((user.as_str(), role.as_str()), (manager.as_str(), managed_role.as_str()));
    let pages_before = fake.pages();
    let assigned = keystone.role_assignments(&user, &role).await.unwrap();

    assert_eq!(assigned, managed, "each managed project once, no other role's, no other user's");
    assert_eq!(fake.pages() - pages_before, 3, "5 assignments in pages of 2");
    assert_eq!(keystone.projects(Some("cm-3")).await.unwrap().len(), 1);
    assert_eq!(keystone.user_id("nobody", "default").await.unwrap(), None);
    assert_eq!(keystone.role_id("nothing").await.unwrap(), None);
    assert_eq!(keystone.project(&project_id("p-unknown")).await.unwrap(), None);
}

/// A `links.next` to another host is refused, and that host never sees a request (the token
/// would have gone with it).
#[tokio::test]
async fn a_next_link_to_another_host_is_refused_not_followed() {
    let fake = FakeKeystone::start().await;
    let elsewhere = FakeKeystone::start().await;
    fake.add_project("cm-0");
    fake.set_page_size(1);
    fake.set_links_origin(elsewhere.url.trim_end_matches("/v3"));
    let keystone = Keystone::new(fake.settings()).unwrap();

    let err = keystone.projects(None).await.unwrap_err();

    assert!(matches!(err, KeystoneError::ForeignLink { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert!(err.to_string().contains(&elsewhere.url), "{err}");
    assert_eq!(elsewhere.requests(), 0, "the other host was never asked");
}

/// Keystone unavailable (503) and throttling (429) are transient; a refusal is permanent.
#[tokio::test]
async fn unavailable_and_throttled_answers_are_transient_a_refusal_permanent() {
    let fake = FakeKeystone::start().await;
    let keystone = Keystone::new(fake.settings()).unwrap();
    keystone.projects(None).await.unwrap();
    for (status, class) in [(503, ErrorClass::Transient), (429, ErrorClass::Transient), (403, ErrorClass::Permanent)] {
        fake.fail_next(&[status]);
        let err = keystone.projects(None).await.unwrap_err();
        assert_eq!(err.class(), class, "HTTP {status}: {err}");
    }
}

/// A wrong password is a permanent error that says which settings to check and never shows
/// the password.
#[tokio::test]
async fn a_wrong_password_is_permanent_and_never_printed() {
    let fake = FakeKeystone::start().await;
    let mut settings = fake.settings();
    settings.password = Some(concertim_billing::config::Secret::new("Wr0ng-Sekr1t"));
    let keystone = Keystone::new(settings).unwrap();

    let err = keystone.projects(None).await.unwrap_err();

    assert!(matches!(err, KeystoneError::Credentials { status: 401, .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Permanent);
    let text = format!("{err} {err:?}");
    assert!(text.contains("keystone.password") && !text.contains("Wr0ng-Sekr1t"), "{text}");
    assert_eq!(fake.tokens_issued(), 0);
}

/// Keystone over TLS with a certificate from a private CA: refused without `ca_file` (saying
/// the certificate was not trusted and naming the setting), accepted with it.
#[tokio::test]
async fn a_private_ca_is_trusted_only_through_keystone_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = crate::support::certificates(dir.path());
    let fake = FakeKeystone::start_tls(Path::new(&cert), Path::new(&key)).await;

    let err = Keystone::new(fake.settings()).unwrap().projects(None).await.unwrap_err();
    assert!(matches!(err, KeystoneError::Untrusted { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("certificate was not trusted") && text.contains("keystone.ca_file"), "{text}");
    assert!(text.contains("UnknownIssuer"), "the verifier's reason is shown: {text}");
    assert_eq!(err.class(), ErrorClass::Permanent);

    let settings = concertim_billing::config::KeystoneSettings { ca_file: Some(ca), ..fake.settings() };
    let projects = Keystone::new(settings).unwrap().projects(None).await.unwrap();
    assert_eq!(projects.len(), 1);
    assert_eq!(fake.tokens_issued(), 1, "only the trusting client got a token");
}

/// A Keystone that refuses connections is a transient failure.
#[tokio::test]
async fn an_unreachable_keystone_is_transient() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v3", listener.local_addr().unwrap());
    drop(listener);
    let fake = FakeKeystone::start().await;
    let settings = concertim_billing::config::KeystoneSettings { url, ..fake.settings() };
    let err = Keystone::new(settings).unwrap().projects(None).await.unwrap_err();
    assert!(matches!(err, KeystoneError::Http { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Transient);
}

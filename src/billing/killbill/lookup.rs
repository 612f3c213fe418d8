//! Finding objects by key, and the ids remembered once seen.
//!
//! A project's account is the one whose `externalKey` is the project id (the accounts this
//! service makes), else the one the Python service made for it (`reference/original-service.md`
//! §1.1): that one has no key of ours (KillBill keyed it by its own id) but carries the project
//! id in a custom field, `project_cloud_id` (or, from its older releases, `openstack_project_id`).
//! It is found through KillBill's custom-field search and adopted: remembered, and given this
//! service's field, so that the team in Concertim keeps the account id it has and no second
//! account is ever made for the project.

use super::client::{ACCOUNT_NOT_FOUND_BY_KEY, CUSTOM_FIELD_ALREADY_EXISTS, SUBSCRIPTION_NOT_FOUND_BY_KEY};
use super::wire::{AccountJson, FoundFieldJson, NewCustomField, SubscriptionJson};
use super::{KillBill, FIELD_PROJECT};
use reqwest::{Method, StatusCode};

use crate::billing::BillingError;
use crate::{
    event::{InstanceId, ProjectId, Timestamp},
    plan::SubscriptionSpec,
};

/// Ids of objects seen to exist. Accounts and subscriptions are never deleted in KillBill
/// (closing and cancelling keep them), so an id once seen stays right; remembering it saves the
/// lookup by key that every usage call would otherwise start with.
#[derive(Debug, Default)]
pub(super) struct Known {
    pub(super) accounts: std::collections::HashMap<ProjectId, String>,
    pub(super) subscriptions: std::collections::HashMap<InstanceId, KnownSubscription>,
}

/// A subscription seen to exist, with its start and end as last seen: usage dated before the
/// start is moved to it, where KillBill invoices it, and usage after the end is late (KillBill
/// 0.22 compares days, so it would bill the rest of the end's day).
#[derive(Debug, Clone)]
pub(super) struct KnownSubscription {
    pub(super) id: String,
    /// The account it belongs to, when the answer said.
    pub(super) account_id: Option<String>,
    pub(super) start: Option<Timestamp>,
    // FIXME(billing): an end set by another replica after this one remembered the
    // subscription is not seen here; on KillBill 0.22 usage later that same day is then billed.
    pub(super) end: Option<Timestamp>,
}

/// Beyond this many remembered ids the memory is cleared and refilled on demand.
pub(super) const KNOWN_MAX: usize = 200_000;

/// The custom field the Python service puts the project id in, on the accounts it makes
/// (`KillbillClient.PROJECT_BILLING_ID_FIELD`).
pub(super) const FIELD_PYTHON_PROJECT: &str = "project_cloud_id";

/// The custom fields that name an account's project. The Python service's older releases (V11)
/// wrote `openstack_project_id`, which is [`FIELD_PROJECT`], the field this service writes
/// itself: an account of theirs already carries ours.
pub(super) const PROJECT_FIELDS: [&str; 2] = [FIELD_PROJECT, FIELD_PYTHON_PROJECT];

/// Hits asked for per page of the search: KillBill's default page.
const SEARCH_PAGE: usize = 100;

/// Pages of one search read at most. Every subscription this service makes carries the project
/// id too, so an adopted project with years of instances has many hits; a server that never
/// ends its pages is a protocol error, not a loop.
const SEARCH_PAGES_MAX: usize = 1_000;

/// What the service would do about a project's account ([`KillBill::account_preview`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountPreview {
    /// Use the account keyed by the project id (one this service made).
    Keyed(String),
    /// Adopt the account the Python service made, found by these fields.
    Adopt {
        /// The account.
        account_id: String,
        /// The fields naming the project on it.
        fields: Vec<String>,
    },
    /// Create one.
    Create,
}

/// An account found through a custom field that names its project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Named {
    pub(super) account_id: String,
    /// The fields that name the project on it, in the order found.
    pub(super) fields: Vec<String>,
}

impl Named {
    /// Whether it carries this service's own field already.
    fn has_ours(&self) -> bool {
        self.fields.iter().any(|f| f == FIELD_PROJECT)
    }
}

/// The accounts a search answer names as `project`'s: fields of an `ACCOUNT` named as in
/// [`PROJECT_FIELDS`] whose value is the project id exactly. KillBill's search matches the key
/// anywhere in a field's object id, type, name or value (SQL `LIKE`, where `_` is a wildcard),
/// so every other hit is noise: a subscription's fields, a longer id that contains this one.
pub(super) fn accounts_naming(hits: &[FoundFieldJson], project: &str) -> Vec<Named> {
    let mut named: Vec<Named> = Vec::new();
    let naming = hits.iter().filter(|f| {
        f.object_type.as_deref() == Some("ACCOUNT")
            && PROJECT_FIELDS.contains(&f.name.as_str())
            && f.value == project
            && !f.object_id.is_empty()
    });
    for field in naming {
        match named.iter_mut().find(|n| n.account_id == field.object_id) {
            Some(n) if !n.fields.contains(&field.name) => n.fields.push(field.name.clone()),
            Some(_) => {}
            None => named.push(Named { account_id: field.object_id.clone(), fields: vec![field.name.clone()] }),
        }
    }
    named
}

/// The project's account among those that name it: none, the only one, or an error naming
/// them all.
pub(super) fn the_one(project: &ProjectId, mut named: Vec<Named>) -> Result<Option<Named>, BillingError> {
    if named.len() > 1 {
        return Err(BillingError::AmbiguousAccount {
            project: project.clone(),
            accounts: named.into_iter().map(|n| n.account_id).collect(),
        });
    }
    Ok(named.pop())
}

impl KillBill {
    pub(super) fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn remember_account(&self, project: &ProjectId, id: &str) {
        let mut known = self.known();
        if known.accounts.len() >= KNOWN_MAX {
            known.accounts.clear();
        }
        known.accounts.insert(project.clone(), id.to_owned());
    }

    /// Refuses a subscription spec whose project is not the account that owns the instance.
    pub(super) async fn check_owner(&self, spec: &SubscriptionSpec, owner_account: &str) -> Result<(), BillingError> {
        if self.account_id(&spec.project).await?.as_deref() == Some(owner_account) {
            return Ok(());
        }
        Err(BillingError::ProjectMismatch {
            instance: spec.instance.clone(),
            owner: format!("KillBill account {owner_account}"),
            claimed: spec.project.clone(),
        })
    }

    pub(super) fn remember_subscription(&self, instance: &InstanceId, found: &SubscriptionJson) {
        let mut known = self.known();
        if known.subscriptions.len() >= KNOWN_MAX {
            known.subscriptions.clear();
        }
        let entry = KnownSubscription {
            id: found.subscription_id.clone(),
            account_id: found.account_id.clone(),
            start: found.start(),
            end: found.end(),
        };
        known.subscriptions.insert(instance.clone(), entry);
    }

    /// Records an end this client set, on the subscription it remembers.
    pub(super) fn remember_end(&self, subscription_id: &str, at: Timestamp) {
        let mut known = self.known();
        if let Some(entry) = known.subscriptions.values_mut().find(|k| k.id == subscription_id) {
            entry.end = Some(entry.end.map_or(at, |end| end.min(at)));
        }
    }

    /// The subscription's id and start: remembered, or looked up by key.
    pub(super) async fn known_subscription(&self, instance: &InstanceId) -> Result<KnownSubscription, BillingError> {
        if let Some(known) = self.known().subscriptions.get(instance) {
            return Ok(known.clone());
        }
        let found = self.existing_subscription(instance).await?;
        self.remember_subscription(instance, &found);
        Ok(KnownSubscription {
            id: found.subscription_id.clone(),
            account_id: found.account_id.clone(),
            start: found.start(),
            end: found.end(),
        })
    }

    /// The project's account: remembered, found by key, or found by a field that names the
    /// project and adopted. `None` when KillBill has none.
    ///
    /// The search runs only when the key finds nothing, so it costs one search per project per
    /// process start for an adopted account (and one before each new project's account is
    /// made); the adoption is not written to the state store, since the search finds it again.
    ///
    /// # Errors
    /// Transient when KillBill cannot be reached; permanent when several accounts name the
    /// project ([`BillingError::AmbiguousAccount`]) or KillBill refuses.
    // FIXME(killbill): a project that already has an account keyed by its id and also one made
    // by the Python service (a second account made before adoption existed) keeps the keyed
    // one, and its team in Concertim keeps naming the other (counted as a conflict there).
    pub(super) async fn account_id(&self, project: &ProjectId) -> Result<Option<String>, BillingError> {
        if let Some(id) = self.known().accounts.get(project) {
            return Ok(Some(id.clone()));
        }
        if let Some(id) = self.account_by_key(project).await? {
            self.remember_account(project, &id);
            return Ok(Some(id));
        }
        let Some(adopted) = self.python_account(project).await? else { return Ok(None) };
        self.adopt(project, &adopted).await?;
        self.remember_account(project, &adopted.account_id);
        Ok(Some(adopted.account_id))
    }

    /// What the service would do about `project`'s account, found without writing anything (the
    /// take-over check, `replay --check-accounts`): use the account keyed by the project, adopt
    /// the one the Python service made, or create one.
    ///
    /// # Errors
    /// When KillBill refuses or several accounts name the project.
    pub async fn account_preview(&self, project: &ProjectId) -> Result<AccountPreview, BillingError> {
        if let Some(id) = self.account_by_key(project).await? {
            return Ok(AccountPreview::Keyed(id));
        }
        Ok(match self.python_account(project).await? {
            Some(named) => AccountPreview::Adopt { account_id: named.account_id, fields: named.fields },
            None => AccountPreview::Create,
        })
    }

    /// The account whose externalKey is the project id: the ones this service makes.
    async fn account_by_key(&self, project: &ProjectId) -> Result<Option<String>, BillingError> {
        let what = format!("find account {project}");
        let answer = self
            .send(
                &what,
                self.request(Method::GET, "/1.0/kb/accounts", None).query(&[("externalKey", project.as_str())]),
            )
            .await?;
        match answer.status {
            StatusCode::OK => Ok(Some(Self::parse::<AccountJson>(&what, &answer)?.account_id)),
            StatusCode::NOT_FOUND if answer.code() == Some(ACCOUNT_NOT_FOUND_BY_KEY) => Ok(None),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    /// The account the Python service made for the project, found by KillBill's custom-field
    /// search (`GET /1.0/kb/customFields/search/{project}`, every page, filtered here as
    /// [`accounts_naming`] says). Several is an error: picking one would bill the project to
    /// an account an operator may not mean.
    async fn python_account(&self, project: &ProjectId) -> Result<Option<Named>, BillingError> {
        let what = format!("search the custom fields naming project {project}");
        let path = format!("/1.0/kb/customFields/search/{}", project.as_str());
        let mut hits: Vec<FoundFieldJson> = Vec::new();
        for page in 0..SEARCH_PAGES_MAX {
            let offset = (page * SEARCH_PAGE).to_string();
            let limit = SEARCH_PAGE.to_string();
            let request = self.request(Method::GET, &path, None).query(&[("offset", &offset), ("limit", &limit)]);
            let answer = self.send(&what, request).await?;
            if answer.status != StatusCode::OK {
                return Err(Self::refused(&what, &answer));
            }
            let found: Vec<FoundFieldJson> = Self::parse(&what, &answer)?;
            let last = found.len() < SEARCH_PAGE;
            hits.extend(found);
            if last {
                return the_one(project, accounts_naming(&hits, project.as_str()));
            }
        }
        Err(BillingError::Protocol { what, detail: format!("more than {SEARCH_PAGES_MAX} pages of hits") })
    }

    /// Adopts an account the Python service made: adds this service's field when it lacks it,
    /// so that the account says whose it is in this service's words too, and says so in the
    /// log. The account is adopted whatever its state: one the Python service closed stays the
    /// project's (KillBill keeps closed accounts, and a second account would split the team's
    /// invoices).
    // FIXME(killbill): KillBill refuses a subscription starting after an account's closing
    // (400/6000), so an instance launched in a project whose Python-made account was closed is
    // dead-lettered as permanent until an operator reopens or replaces the account.
    async fn adopt(&self, project: &ProjectId, adopted: &Named) -> Result<(), BillingError> {
        let account = &adopted.account_id;
        if !adopted.has_ours() {
            let what = format!("add custom field {FIELD_PROJECT} to adopted account {account}");
            let path = format!("/1.0/kb/accounts/{account}/customFields");
            let fields = [NewCustomField { name: FIELD_PROJECT, value: project.as_str() }];
            let request = self.writing(Method::POST, &path, "Account of the Python service adopted").json(&fields);
            let answer = self.send(&what, request).await?;
            match answer.status {
                StatusCode::CREATED => {}
                StatusCode::BAD_REQUEST if answer.code() == Some(CUSTOM_FIELD_ALREADY_EXISTS) => {}
                _ => return Err(Self::refused(&what, &answer)),
            }
        }
        tracing::info!(
            project = %project, account = %account, field = %adopted.fields.join(","),
            "adopted the KillBill account the Python service made for the project"
        );
        Ok(())
    }

    pub(super) async fn subscription(&self, instance: &InstanceId) -> Result<Option<SubscriptionJson>, BillingError> {
        let what = format!("find subscription {instance}");
        let answer = self
            .send(
                &what,
                self.request(Method::GET, "/1.0/kb/subscriptions", None).query(&[("externalKey", instance.as_str())]),
            )
            .await?;
        match answer.status {
            StatusCode::OK => Ok(Some(Self::parse(&what, &answer)?)),
            StatusCode::NOT_FOUND if answer.code() == Some(SUBSCRIPTION_NOT_FOUND_BY_KEY) => Ok(None),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    pub(super) async fn subscription_by_id(&self, id: &str) -> Result<SubscriptionJson, BillingError> {
        let what = format!("read subscription {id}");
        let answer = self.send(&what, self.request(Method::GET, &format!("/1.0/kb/subscriptions/{id}"), None)).await?;
        match answer.status {
            StatusCode::OK => Self::parse(&what, &answer),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    pub(super) async fn existing_subscription(&self, instance: &InstanceId) -> Result<SubscriptionJson, BillingError> {
        self.subscription(instance).await?.ok_or_else(|| BillingError::NoSubscription(instance.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::class::ErrorClass;

    const PROJECT: &str = "e89cb74df0069d478e26645ca53ab73f";

    fn hit(object_id: &str, object_type: &str, name: &str, value: &str) -> FoundFieldJson {
        FoundFieldJson {
            object_id: object_id.into(),
            object_type: Some(object_type.into()),
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn an_accounts_project_cloud_id_or_openstack_project_id_equal_to_the_project_names_it() {
        for name in ["project_cloud_id", "openstack_project_id"] {
            let named = accounts_naming(&[hit("a1", "ACCOUNT", name, PROJECT)], PROJECT);
            assert_eq!(named, [Named { account_id: "a1".into(), fields: vec![name.into()] }], "{name}");
        }
    }

    #[test]
    fn search_hits_that_are_not_an_accounts_project_field_with_exactly_the_id_name_nothing() {
        let cases = [
            ("a subscription's field", hit("s1", "SUBSCRIPTION", "openstack_project_id", PROJECT)),
            ("a field of another name", hit("a1", "ACCOUNT", "openstack_stack_id", PROJECT)),
            ("a value that contains the id", hit("a1", "ACCOUNT", "project_cloud_id", &format!("{PROJECT}0"))),
            ("a value the id contains", hit("a1", "ACCOUNT", "project_cloud_id", &PROJECT[..31])),
            ("a value in another case", hit("a1", "ACCOUNT", "project_cloud_id", &PROJECT.to_uppercase())),
            ("no object type", FoundFieldJson { object_type: None, ..hit("a1", "", "project_cloud_id", PROJECT) }),
        ];
        for (case, hit) in cases {
            assert_eq!(accounts_naming(&[hit], PROJECT), [], "{case}");
        }
    }

    #[test]
    fn an_account_with_both_fields_is_one_account_that_carries_ours_already() {
        let hits = [
            hit("a1", "ACCOUNT", "project_cloud_id", PROJECT),
            hit("s1", "SUBSCRIPTION", "openstack_project_id", PROJECT),
            hit("a1", "ACCOUNT", "openstack_project_id", PROJECT),
        ];
        let named = accounts_naming(&hits, PROJECT);
        assert_eq!(named.len(), 1, "{named:?}");
        assert!(named[0].has_ours());
        assert!(!accounts_naming(&hits[..1], PROJECT)[0].has_ours());
    }

    #[test]
    fn two_accounts_naming_the_project_are_a_permanent_error_naming_both() {
        let project = ProjectId::parse(PROJECT).unwrap();
        let hits =
            [hit("a1", "ACCOUNT", "project_cloud_id", PROJECT), hit("a2", "ACCOUNT", "openstack_project_id", PROJECT)];
        let error = the_one(&project, accounts_naming(&hits, PROJECT)).unwrap_err();
        assert!(matches!(&error, BillingError::AmbiguousAccount { accounts, .. } if accounts == &["a1", "a2"]));
        assert_eq!(error.class(), ErrorClass::Permanent);
        let text = error.to_string();
        assert!(text.contains("a1, a2") && text.contains(PROJECT), "{text}");
    }

    #[test]
    fn no_account_naming_the_project_is_none_and_one_is_that_one() {
        let project = ProjectId::parse(PROJECT).unwrap();
        assert_eq!(the_one(&project, Vec::new()).unwrap(), None);
        let one = Named { account_id: "a1".into(), fields: vec!["project_cloud_id".into()] };
        assert_eq!(the_one(&project, vec![one.clone()]).unwrap(), Some(one));
    }

    #[test]
    fn a_search_hit_reads_as_killbill_writes_it() {
        let json = r#"[{"customFieldId":"0ad6","objectId":"1122cc5e-a0e2-40ed-a460-44725d0b9e76","objectType":"ACCOUNT",
            "name":"project_cloud_id","value":"e89cb74df0069d478e26645ca53ab73f","auditLogs":[]}]"#;
        let hits: Vec<FoundFieldJson> = serde_json::from_str(json).unwrap();
        assert_eq!(accounts_naming(&hits, PROJECT)[0].account_id, "1122cc5e-a0e2-40ed-a460-44725d0b9e76");
    }
}

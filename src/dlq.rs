//! Dead-letter queue tools: list, show, export, requeue, purge.
//!
//! Reading is non-destructive: messages are fetched with `basic.get` without acknowledging them
//! and, when the channel closes, the broker puts every unacknowledged one back in its place (the
//! dead-letter queue is a classic queue, which requeues in position and has no delivery limit).
//! So `list` twice shows the same messages in the same order. `requeue` and `purge` acknowledge a
//! dead letter only after acting on it: a requeued message is acknowledged after the broker
//! confirmed its republish, so a crash in between duplicates it (harmless: every effect is
//! idempotent) and never loses it.

use std::{borrow::Cow, time::Duration};

use serde::Serialize;
use time::OffsetDateTime;

use crate::{
    bus::{
        ack,
        dead::{DeadLetters, Fetched},
        BusError,
    },
    config::Settings,
    event::Timestamp,
    fixture::FixtureDelivery,
    notification::{decode, DecodeLimits},
    redact::{printable, redact},
};

/// One dead letter, as the tools show it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// A stable id: a hash of the body and of its failure headers (reason, first and last
    /// failure), so two letters with the same body failed at different times differ.
    pub id: String,
    /// The notification's event type, when the body decodes.
    pub event_type: Option<String>,
    /// `invalid`, `transient`, `permanent`, or `broker` for messages the broker dead-lettered
    /// itself (delivery limit).
    pub class: String,
    /// Why it failed.
    pub reason: String,
    /// Processing attempts.
    pub attempts: u32,
    /// When it last failed (RFC 3339), when known.
    pub last_failure: Option<String>,
    /// Seconds since it last failed, when known.
    pub age_seconds: Option<i64>,
    /// Where it was first published.
    pub original_exchange: String,
    /// Its first routing key.
    pub original_routing_key: String,
}

/// Which dead letters a command applies to.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// These ids only (any of them).
    pub ids: Vec<String>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this class.
    pub class: Option<String>,
    /// Only reasons containing this text.
    pub reason_contains: Option<String>,
    /// Only messages that failed longer ago than this.
    pub older_than: Option<Duration>,
    /// At most this many.
    pub limit: Option<usize>,
}

impl Selector {
    /// Whether no criterion is given (a destructive command then needs `--all`).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.event_type.is_none()
            && self.class.is_none()
            && self.reason_contains.is_none()
            && self.older_than.is_none()
    }

    fn matches(&self, d: &DeadLetter) -> bool {
        (self.ids.is_empty() || self.ids.iter().any(|id| d.id.starts_with(id.as_str())))
            && self.event_type.as_ref().is_none_or(|t| d.event_type.as_ref() == Some(t))
            && self.class.as_ref().is_none_or(|c| &d.class == c)
            && self.reason_contains.as_ref().is_none_or(|r| d.reason.contains(r.as_str()))
            && self.older_than.is_none_or(|min| {
                d.age_seconds.is_some_and(|age| age >= i64::try_from(min.as_secs()).unwrap_or(i64::MAX))
            })
    }
}

/// 64-bit FNV-1a: a stable, dependency-free hash for ids an operator types, continued from
/// `state` (start with [`FNV_START`]).
fn fnv(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// FNV-1a's offset basis.
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// A dead letter's id: 48 bits of a hash of its body and failure headers.
fn letter_id(body: &[u8], header: impl Fn(&str) -> Option<String>) -> String {
    // Hashed piece by piece: a large body is not copied.
    let mut hash = fnv(FNV_START, body);
    for name in [ack::REASON, ack::FIRST_FAILURE, ack::LAST_FAILURE] {
        hash = fnv(hash, &[0]);
        hash = fnv(hash, header(name).unwrap_or_default().as_bytes());
    }
    format!("{:012x}", hash >> 16)
}

impl DeadLetter {
    fn from_letter(letter: &Fetched, limits: DecodeLimits, now: OffsetDateTime) -> Self {
        let body = letter.body();
        let reason = letter.header(ack::REASON);
        let last_failure = letter.header(ack::LAST_FAILURE);
        let age_seconds =
            last_failure.as_deref().and_then(|t| Timestamp::parse(t).ok()).map(|t| now.unix_timestamp() - t.unix());
        let death = letter.first_death();
        let (original_exchange, original_routing_key) =
            match (letter.header(ack::ORIGINAL_EXCHANGE), letter.header(ack::ORIGINAL_ROUTING_KEY)) {
                (Some(e), Some(k)) => (e, k),
                _ => death.clone().unwrap_or_default(),
            };
        Self {
            id: letter_id(body, |name| letter.header(name)),
            // Concertim updates are shown as `concertim <event type>`.
            event_type: decode(body, limits).ok().map(|n| n.meta.event_type).or_else(|| {
                // Concertim work is small: a body over the decode limit is not parsed at all.
                (body.len() <= limits.max_body_bytes)
                    .then(|| serde_json::from_slice::<crate::concertim::Work>(body).ok())
                    .flatten()
                    .map(|w| format!("concertim {}", w.event_type))
            }),
            class: letter.header(ack::CLASS).unwrap_or_else(|| "broker".to_owned()),
            reason: reason.unwrap_or_else(|| {
                if death.is_some() {
                    "dead-lettered by the broker (delivery limit reached: the consumer crashed on it repeatedly)".into()
                } else {
                    "(no reason recorded)".into()
                }
            }),
            attempts: letter.attempts(),
            last_failure,
            age_seconds,
            original_exchange,
            original_routing_key,
        }
    }
}

/// One dead letter as read from the queue: what the tools show, and its body and properties,
/// held only while a command looks at it (so `list` and `export` stay small however large the
/// queue).
pub struct Letter<'a> {
    /// What the tools show.
    pub meta: DeadLetter,
    /// The message body, as the broker holds it.
    pub body: &'a [u8],
    letter: &'a Fetched,
}

impl Letter<'_> {
    /// The message as a fixture delivery (to its original route), credentials redacted unless
    /// `raw`.
    pub fn to_fixture(&self, raw: bool) -> FixtureDelivery {
        FixtureDelivery {
            exchange: Some(self.meta.original_exchange.clone()),
            routing_key: Some(self.meta.original_routing_key.clone()),
            properties: Some(self.letter.properties_json()),
            redelivered: false,
            body: if raw { self.body.to_vec() } else { redact(self.body).into_owned() },
        }
    }

    /// Everything about one dead letter, for `dlq show`: every field written safe for a
    /// terminal (control characters escaped), the body redacted unless `raw`.
    pub fn describe(&self, settings: &Settings, raw: bool) -> String {
        let meta = &self.meta;
        let mut out = String::new();
        let line = |out: &mut String, k: &str, v: &str| out.push_str(&format!("{k:<22} {}\n", printable(v)));
        line(&mut out, "id", &meta.id);
        line(&mut out, "class", &meta.class);
        line(&mut out, "reason", &meta.reason);
        line(&mut out, "attempts", &meta.attempts.to_string());
        line(&mut out, "last failure", meta.last_failure.as_deref().unwrap_or("-"));
        line(&mut out, "original route", &format!("{} / {}", meta.original_exchange, meta.original_routing_key));
        line(&mut out, "properties", &self.letter.properties_json());
        let body = if raw { Cow::Borrowed(self.body) } else { redact(self.body) };
        let limits = settings.decode;
        // Pretty JSON escapes control characters itself; its own newlines are kept.
        let block = |out: &mut String, k: &str, v: String| {
            out.push_str(&format!("{k:<22} {}\n", v.replace('\n', "\n                       ")));
        };
        match (decode(&body, limits), serde_json::from_slice::<crate::concertim::Work>(&body)) {
            (Ok(n), _) => block(&mut out, "notification", serde_json::to_string_pretty(&n).unwrap_or_default()),
            (Err(_), Ok(work)) => {
                block(&mut out, "concertim work", serde_json::to_string_pretty(&work).unwrap_or_default());
            }
            (Err(e), Err(_)) => line(&mut out, "decode error", &crate::class::chain(&e)),
        }
        line(&mut out, "body", &String::from_utf8_lossy(&body));
        out
    }
}

/// Hands every dead letter matching `selector` to `each`, in queue order, one at a time,
/// leaving the queue as it was. Returns how many it handed over. Only one body is held at a
/// time: the broker keeps the others (fetched and not acknowledged).
///
/// # Errors
/// When the broker cannot be reached, the dead-letter queue does not exist, or `each` fails
/// (then the letters seen so far are back in the queue too).
pub async fn scan<E: From<BusError>>(
    settings: &Settings,
    selector: &Selector,
    mut each: impl FnMut(Letter<'_>) -> Result<(), E>,
) -> Result<usize, E> {
    let reader = DeadLetters::open(&settings.bus).await?;
    let limits = settings.decode;
    let now = OffsetDateTime::now_utc();
    let mut seen = 0;
    let result = async {
        while let Some(letter) = reader.next().await? {
            let meta = DeadLetter::from_letter(&letter, limits, now);
            if selector.matches(&meta) {
                seen += 1;
                each(Letter { meta, body: letter.body(), letter: &letter })?;
                if selector.limit.is_some_and(|l| seen >= l) {
                    break;
                }
            }
        }
        Ok(seen)
    }
    .await;
    reader.close().await;
    result
}

/// Every dead letter matching `selector` (without its body), in queue order, leaving the
/// queue as it was.
///
/// # Errors
/// When the broker cannot be reached or the dead-letter queue does not exist.
pub async fn list(settings: &Settings, selector: &Selector) -> Result<Vec<DeadLetter>, BusError> {
    let mut out = Vec::new();
    scan(settings, selector, |letter| {
        out.push(letter.meta);
        Ok::<(), BusError>(())
    })
    .await?;
    Ok(out)
}

/// Why a `dlq` command stopped: the operator is to say more, or the broker failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// `requeue` or `purge` without a selection and without `--all`.
    #[error("{verb} what? give --id or a filter, or --all")]
    NothingSelected {
        /// The command.
        verb: &'static str,
    },
    /// `purge` of more than one letter without `--yes`.
    #[error("this would delete {count} dead letters: add --yes to confirm (or see them first with dlq list)")]
    NeedsConfirmation {
        /// How many would go.
        count: usize,
    },
    /// `show` of an id no letter has.
    #[error("no dead letter has an id starting with {id:?} (see dlq list)")]
    NoMatch {
        /// The id asked for.
        id: String,
    },
    /// `show` of an id prefix several letters share.
    #[error("{id:?} matches {count} dead letters: give more of the id")]
    Ambiguous {
        /// The id asked for.
        id: String,
        /// How many letters it matches.
        count: usize,
    },
    /// The export file could not be written.
    #[error("cannot write the export: {0}")]
    Write(#[from] std::io::Error),
    /// The broker failed.
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl DlqError {
    /// Whether the command line was at fault (exit status 1), not the broker or the disk.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            DlqError::NothingSelected { .. }
                | DlqError::NeedsConfirmation { .. }
                | DlqError::NoMatch { .. }
                | DlqError::Ambiguous { .. }
        )
    }

    /// The broker's error, when it was the broker.
    pub fn bus(&self) -> Option<&BusError> {
        match self {
            DlqError::Bus(e) => Some(e),
            _ => None,
        }
    }
}

/// What `dlq show ID` prints: the one letter whose id starts with `id`, described (secrets
/// redacted unless `no_redact`).
///
/// # Errors
/// [`DlqError::NoMatch`] or [`DlqError::Ambiguous`] unless exactly one letter matches; the
/// broker's errors.
pub async fn show(settings: &Settings, id: &str, no_redact: bool) -> Result<String, DlqError> {
    let selector = Selector { ids: vec![id.to_owned()], ..Selector::default() };
    // Only the first match's body is kept: the others are only counted.
    let mut first: Option<String> = None;
    let mut distinct = std::collections::BTreeSet::new();
    scan(settings, &selector, |letter| {
        if first.is_none() {
            first = Some(letter.describe(settings, no_redact));
        }
        distinct.insert(letter.meta.id);
        Ok::<(), BusError>(())
    })
    .await?;
    match (first, distinct.len()) {
        (None, _) => Err(DlqError::NoMatch { id: id.to_owned() }),
        (Some(first), 1) => Ok(first),
        (Some(_), count) => Err(DlqError::Ambiguous { id: id.to_owned(), count }),
    }
}

/// Writes the selected dead letters to `out` as fixture lines (secrets redacted unless
/// `no_redact`), one body in memory at a time; returns how many.
///
/// # Errors
/// [`DlqError::Write`] when `out` fails; the broker's errors.
pub async fn export(
    settings: &Settings,
    selector: &Selector,
    out: &mut impl std::io::Write,
    no_redact: bool,
) -> Result<usize, DlqError> {
    let exported = scan(settings, selector, |letter| {
        writeln!(out, "{}", crate::fixture::to_line(&letter.to_fixture(no_redact))).map_err(DlqError::Write)
    })
    .await?;
    out.flush()?;
    Ok(exported)
}

/// Requeues the selected dead letters (or lists them with `dry_run`); an empty selection
/// needs `all`.
///
/// # Errors
/// [`DlqError::NothingSelected`]; as [`apply`].
pub async fn requeue(
    settings: &Settings,
    selector: &Selector,
    all: bool,
    action: Action,
    dry_run: bool,
) -> Result<Moved, DlqError> {
    if selector.is_empty() && !all {
        return Err(DlqError::NothingSelected { verb: "requeue" });
    }
    Ok(apply(settings, selector, action, dry_run).await?)
}

/// Deletes the selected dead letters: an empty selection needs `all`, more than one letter
/// needs `yes`. Exactly the letters counted go; letters that arrived since stay.
///
/// # Errors
/// [`DlqError::NothingSelected`], [`DlqError::NeedsConfirmation`]; as [`apply`].
pub async fn purge(settings: &Settings, selector: &Selector, all: bool, yes: bool) -> Result<Moved, DlqError> {
    if selector.is_empty() && !all {
        return Err(DlqError::NothingSelected { verb: "purge" });
    }
    let selected = list(settings, selector).await?;
    if selected.len() > 1 && !yes {
        return Err(DlqError::NeedsConfirmation { count: selected.len() });
    }
    if selected.is_empty() {
        return Ok(Moved::default());
    }
    let exact = Selector {
        ids: selected.iter().map(|d| d.id.clone()).collect(),
        limit: Some(selected.len()),
        ..Selector::default()
    };
    Ok(apply(settings, &exact, Action::Purge, false).await?)
}

/// What `requeue` or `purge` does to each selected dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Republish to our own queue it failed in: the main queue for a notification from
    /// upstream, the queue named by its route when that route is ours (the Concertim queue).
    Requeue,
    /// Republish straight to our main queue.
    RequeueToQueue,
    /// Republish to its original exchange and routing key (upstream: every consumer bound
    /// there gets it again).
    RequeueToOriginal,
    /// Remove it.
    Purge,
}

/// Applies `action` to the selected dead letters (all of them when `selector` is empty), or
/// only lists them with `dry_run`. Returns the ones acted on.
///
/// # Errors
/// When the broker cannot be reached or refuses a republish; what was done until then stays
/// done, and the rest stays in the dead-letter queue.
pub async fn apply(settings: &Settings, selector: &Selector, action: Action, dry_run: bool) -> Result<Moved, BusError> {
    if dry_run {
        return Ok(Moved { done: list(settings, selector).await?, stuck: Vec::new() });
    }
    let reader = DeadLetters::open(&settings.bus).await?;
    let limits = settings.decode;
    let now = OffsetDateTime::now_utc();
    let mut done = Vec::new();
    let mut stuck = Vec::new();
    let result = async {
        while let Some(letter) = reader.next().await? {
            let dead = DeadLetter::from_letter(&letter, limits, now);
            if !selector.matches(&dead) {
                continue;
            }
            if action != Action::Purge {
                let (exchange, routing_key) = match action {
                    Action::RequeueToOriginal => (dead.original_exchange.clone(), dead.original_routing_key.clone()),
                    // Ours already (through the default exchange): back to that queue.
                    Action::Requeue if dead.original_exchange.is_empty() => {
                        (String::new(), dead.original_routing_key.clone())
                    }
                    _ => (String::new(), reader.main_queue().to_owned()),
                };
                match reader.republish(&letter, &exchange, &routing_key).await {
                    Ok(()) => {}
                    // No queue for it: it stays (unacknowledged, it goes back in its place when
                    // this channel closes), and the others are still moved.
                    Err(e @ BusError::NotConfirmed { .. }) => {
                        stuck.push((dead, e.to_string()));
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            reader.remove(letter).await?;
            done.push(dead);
            if selector.limit.is_some_and(|l| done.len() >= l) {
                break;
            }
        }
        Ok::<(), BusError>(())
    }
    .await;
    reader.close().await;
    result.map(|()| Moved { done, stuck })
}

/// What `requeue` or `purge` did.
#[derive(Debug, Default)]
pub struct Moved {
    /// The dead letters acted on.
    pub done: Vec<DeadLetter>,
    /// The dead letters that could not be requeued (their route leads to no queue), with why:
    /// they stay in the dead-letter queue.
    pub stuck: Vec<(DeadLetter, String)>,
}

/// The table `dlq list` prints (control characters in any field escaped).
pub fn table(letters: &[DeadLetter]) -> String {
    let mut out = format!(
        "{:<12}  {:>7}  {:<28}  {:<9}  {:>3}  {:<34}  {}\n",
        "id", "age", "event type", "class", "att", "original route", "reason"
    );
    for d in letters {
        let age = d.age_seconds.map_or_else(|| "-".to_owned(), human_age);
        let route = format!("{}/{}", d.original_exchange, d.original_routing_key);
        let reason: String = d.reason.chars().take(100).collect();
        out.push_str(&format!(
            "{:<12}  {:>7}  {:<28}  {:<9}  {:>3}  {:<34}  {}\n",
            d.id,
            age,
            printable(d.event_type.as_deref().unwrap_or("-")),
            printable(&d.class),
            d.attempts,
            printable(&route),
            printable(&reason)
        ));
    }
    out.push_str(&format!("{} dead letter(s)\n", letters.len()));
    out
}

fn human_age(seconds: i64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Parses `30s`, `15m`, `2h`, `7d` (or plain seconds).
///
/// # Errors
/// When the text is not such a duration.
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let (number, unit) =
        text.trim().split_at(text.trim().find(|c: char| !c.is_ascii_digit()).unwrap_or(text.trim().len()));
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration such as 30s, 15m, 2h or 7d"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?} is not a duration such as 30s, 15m, 2h or 7d")),
    };
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_an_operator_writes_them() {
        assert_eq!(parse_age("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_age("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_age("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_age("soon").is_err() && parse_age("5y").is_err());
    }

    #[test]
    fn two_letters_with_one_body_have_two_ids_and_a_letter_keeps_its_id() {
        let failed_at = |last: &'static str| move |name: &str| (name == ack::LAST_FAILURE).then(|| last.to_owned());
        let (a, b) = (failed_at("2025-03-03T09:00:00Z"), failed_at("2025-03-03T10:00:00Z"));
        assert_ne!(letter_id(b"{}", a), letter_id(b"{}", b));
        assert_eq!(letter_id(b"{}", a), letter_id(b"{}", a));
    }

    #[test]
    fn ids_are_stable_hashes_of_the_body() {
        assert_eq!(fnv(FNV_START, b"a"), fnv(FNV_START, b"a"));
        assert_ne!(fnv(FNV_START, b"a"), fnv(FNV_START, b"b"));
        assert_eq!(fnv(FNV_START, b""), 0xcbf2_9ce4_8422_2325);
    }
}

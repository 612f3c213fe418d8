//! The one wait-on-state helper of the tests: polling observable state (a queue depth, a fake's
//! rows, a ledger file, an HTTP answer) until it is as expected. The state lives in another
//! process, the broker or a fake server, which offer nothing to await; tests never sleep to
//! synchronise, they wait here.

use std::{
    fmt::Debug,
    future::Future,
    time::{Duration, Instant},
};

/// How often [`eventually`] and [`eventually_with`] look.
const EVERY: Duration = Duration::from_millis(20);

/// Calls `check` every `every` until it returns `Ok`, and returns that; once `limit` has passed
/// since the first call, returns the last `Err` instead.
pub async fn poll<T, E, F, Fut>(limit: Duration, every: Duration, mut check: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(last) if start.elapsed() >= limit => return Err(last),
            Err(_) => {}
        }
        // The poll interval of this helper, not a synchronising sleep: see the module's doc.
        tokio::time::sleep(every).await;
    }
}

/// Waits until `check` returns `Some`, polling the observable state; panics naming `what`
/// after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let checked = poll(limit, EVERY, || {
        let next = check();
        async move { next.await.ok_or(()) }
    });
    checked.await.unwrap_or_else(|()| panic!("timed out after {limit:?} waiting for {what}"))
}

/// Waits until `check` returns `Ok`, polling the observable state; after `limit`, panics naming
/// `what` and showing the last `Err`: what still differs.
pub async fn eventually_with<T, E, F, Fut>(what: &str, limit: Duration, check: F) -> T
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    poll(limit, EVERY, check)
        .await
        .unwrap_or_else(|left| panic!("timed out after {limit:?} waiting for {what}: {left:#?}"))
}

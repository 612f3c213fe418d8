//! What every outbound HTTP client of the service shares (KillBill, HostBill, Concertim): no
//! redirect is followed, and no answer is read past a size limit.
//!
//! A followed redirect would carry credentials that are not in `Authorization` (KillBill's
//! `X-Killbill-ApiSecret`, HostBill's form `api_key`, Concertim's login body) to another host,
//! and take that host's answer for the billing application's. A redirect is therefore an answer
//! of its own, which each client turns into an error naming the target. A body read whole
//! whatever its size lets one huge answer (a proxy's, a misbehaving server's) take the process's
//! memory, times the lanes.

use std::time::Duration;

use reqwest::{redirect::Policy, Client, ClientBuilder, Response};

/// The largest answer body read from a billing application or Concertim. KillBill's largest
/// answers (an account's bundles, a catalog) stay well under it.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// A client builder with the shared policy: the given timeouts and no redirects.
pub fn client(timeout: Duration, connect_timeout: Duration) -> ClientBuilder {
    Client::builder().timeout(timeout).connect_timeout(connect_timeout).redirect(Policy::none())
}

/// Where a redirect answer points (its `Location`, or a note that it names none); `None` for
/// any other answer.
pub fn redirect_target(response: &Response) -> Option<String> {
    response.status().is_redirection().then(|| {
        response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| "(no Location header)".to_owned(), |l| l.chars().take(300).collect())
    })
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The connection failed while reading.
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    /// The body is larger than the limit; what was read is dropped.
    #[error("the answer is larger than {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
}

/// The body as text (lossy UTF-8), read chunk by chunk and refused past `limit` bytes.
///
/// # Errors
/// When reading fails, or the body is larger than `limit`.
pub async fn text(mut response: Response, limit: usize) -> Result<String, BodyError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

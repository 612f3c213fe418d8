//! What every outbound HTTP client of the service shares (KillBill, HostBill, Concertim,
//! Keystone): no redirect is followed, no answer is read past a size limit, and a configured
//! `ca_file` is the only trust for that server's certificate.
//!
//! A followed redirect would carry credentials that are not in `Authorization` (KillBill's
//! `X-Killbill-ApiSecret`, HostBill's form `api_key`, Concertim's login body) to another host,
//! and take that host's answer for the billing application's. A redirect is therefore an answer
//! of its own, which each client turns into an error naming the target. A body read whole
//! whatever its size lets one huge answer (a proxy's, a misbehaving server's) take the process's
//! memory, times the lanes.
//!
//! A private CA's bundle replaces the system roots rather than joining them: the CA is trusted
//! for that one server, and nothing else signs for it. A certificate the client does not trust
//! is told apart from other connection errors ([`untrusted`]), so each client can say which
//! `ca_file` to set rather than retry a handshake that cannot succeed.

use std::time::Duration;

use reqwest::{redirect::Policy, Certificate, Client, ClientBuilder, Response};

/// The largest answer body read from a billing application or Concertim. KillBill's largest
/// answers (an account's bundles, a catalog) stay well under it.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// A client builder with the shared policy: the given timeouts and no redirects.
pub fn client(timeout: Duration, connect_timeout: Duration) -> ClientBuilder {
    Client::builder().timeout(timeout).connect_timeout(connect_timeout).redirect(Policy::none())
}

/// `builder` trusting only the CAs of the PEM bundle `ca_file` (when one is set), the setting
/// `key` (`killbill.ca_file`) names.
///
/// # Errors
/// When the file cannot be read, is not a PEM bundle, or holds no certificate: the message
/// names `key` and the file.
pub fn trusting(builder: ClientBuilder, key: &str, ca_file: Option<&str>) -> Result<ClientBuilder, String> {
    let Some(ca_file) = ca_file else { return Ok(builder) };
    let pem = std::fs::read(ca_file).map_err(|e| format!("{key}: cannot read {ca_file}: {e}"))?;
    let roots = Certificate::from_pem_bundle(&pem).map_err(|e| format!("{key}: {ca_file} is not a PEM bundle: {e}"))?;
    if roots.is_empty() {
        return Err(format!("{key}: {ca_file} holds no certificate"));
    }
    Ok(roots.into_iter().fold(builder.tls_built_in_root_certs(false), |b, c| b.add_root_certificate(c)))
}

/// The TLS verifier's verdict (`invalid peer certificate: UnknownIssuer`) when `error` is the
/// server's certificate refused; `None` for any other failure.
pub fn untrusted(error: &reqwest::Error) -> Option<String> {
    // rustls's verdict reaches here only as text: hyper wraps it in an `io::Error`, whose
    // `source()` skips the rustls error itself.
    let mut cause: Option<&dyn std::error::Error> = Some(error);
    while let Some(error) = cause {
        let text = error.to_string();
        if text.contains("invalid peer certificate") {
            return Some(text);
        }
        cause = error.source();
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_that_cannot_be_read_or_holds_no_certificate_is_refused_naming_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let builder = || client(Duration::from_secs(1), Duration::from_secs(1));
        assert!(trusting(builder(), "killbill.ca_file", None).is_ok(), "no ca_file: the system roots");
        let cases =
            [("/nonexistent.pem", "cannot read /nonexistent.pem"), (empty.to_str().unwrap(), "holds no certificate")];
        for (file, expected) in cases {
            let error = trusting(builder(), "killbill.ca_file", Some(file)).expect_err(file);
            assert!(error.starts_with("killbill.ca_file: ") && error.contains(expected), "{file}: {error}");
        }
    }
}

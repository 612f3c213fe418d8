//! What the fake HTTP servers (KillBill, HostBill, Concertim, Keystone) share: serving a router
//! on a free local port, one fault layer in front of it, and decoding form-encoded text.
//!
//! The fault layer plays what goes wrong between the service and a server, the same way for
//! every fake: latency, an outage (answered by the proxy in front, or hanging first), answers
//! lost after the request took effect, and the next requests failing with given statuses. What
//! the fakes answer then differs (an empty body, an HTML page), so each fake gives its own
//! [`Answers`]. Faults that depend on what a server does with a request (a slow cancel, a
//! refused call, revoked tokens) stay in that fake.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Router,
};

/// What a fake answers when a fault, not the server, decides the answer.
#[derive(Clone, Copy)]
pub struct Answers {
    /// What a request meets while the server is down.
    pub unavailable: fn() -> Response,
    /// What the client gets instead of an answer that is lost.
    pub lost: fn() -> Response,
    /// What a request told to fail answers, given its status.
    pub failed: fn(StatusCode) -> Response,
}

impl Answers {
    /// Empty bodies: 503 while down, the gateway's 504 for a lost answer, the status alone for
    /// a failure.
    pub const EMPTY: Self = Self {
        unavailable: || StatusCode::SERVICE_UNAVAILABLE.into_response(),
        lost: || StatusCode::GATEWAY_TIMEOUT.into_response(),
        failed: |status| status.into_response(),
    };
}

/// The faults in force on one fake, shared by the fake's handle and its fault layer.
#[derive(Clone)]
pub struct Faults {
    state: Arc<Mutex<FaultState>>,
    answers: Answers,
}

#[derive(Default)]
struct FaultState {
    /// Requests that reached the layer after their latency, whatever they were answered.
    requests: usize,
    /// Every answer waits this long first (a server's latency).
    latency: Duration,
    outage: Option<Outage>,
    /// Statuses the next requests are answered, in order.
    fail_next: VecDeque<u16>,
    /// Writes whose answer is lost after they took effect: every `lose_every`-th write, while
    /// `lose_left` is above zero.
    lose_every: usize,
    lose_left: usize,
    /// Writes counted while answers are being lost.
    writes: usize,
}

/// A server that is down: until `until` (or until it is brought back when `None`), requests
/// are answered [`Answers::unavailable`], every other one after hanging for `hang`.
struct Outage {
    until: Option<Instant>,
    hang: Duration,
}

/// What the layer does with one request.
enum Fault {
    /// Answers it [`Answers::unavailable`] after this long.
    Unavailable(Duration),
    /// Answers it [`Answers::failed`] with this status.
    Fail(StatusCode),
    /// Passes it on; the answer is lost when `true`.
    Serve { lose: bool },
}

impl Faults {
    /// No faults yet; `answers` says what the fake answers when one strikes.
    pub fn new(answers: Answers) -> Self {
        Self { state: Arc::default(), answers }
    }

    /// Every answer takes `latency` (requests are still served concurrently).
    pub fn set_latency(&self, latency: Duration) {
        self.state.lock().unwrap().latency = latency;
    }

    /// For `duration` from now the server is down: every other request hangs for `hang`
    /// before its answer, so a client with a shorter timeout sees a timeout.
    pub fn down_for(&self, duration: Duration, hang: Duration) {
        self.state.lock().unwrap().outage = Some(Outage { until: Some(Instant::now() + duration), hang });
    }

    /// Down (every request answered at once) until called with `false`, which also ends an
    /// outage of [`Faults::down_for`].
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().outage = down.then_some(Outage { until: None, hang: Duration::ZERO });
    }

    /// Every `every`-th write (POST, PUT, PATCH, DELETE), `count` times, takes effect and then its
    /// answer is lost: the client gets [`Answers::lost`].
    pub fn lose_answers(&self, every: usize, count: usize) {
        let mut s = self.state.lock().unwrap();
        s.lose_every = every.max(1);
        s.lose_left = count;
    }

    /// Answers still to be lost.
    pub fn lost_answers_left(&self) -> usize {
        self.state.lock().unwrap().lose_left
    }

    /// The next requests are answered with these statuses, whatever they are.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.state.lock().unwrap().fail_next.extend(statuses);
    }

    /// Requests received so far, those a fault answered included.
    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }

    /// Counts the request and decides which fault, if any, answers it.
    fn decide(&self, method: &Method) -> Fault {
        let mut s = self.state.lock().unwrap();
        s.requests += 1;
        let requests = s.requests;
        if let Some(outage) = &s.outage {
            if outage.until.is_none_or(|until| Instant::now() < until) {
                let hang = if requests.is_multiple_of(2) { Duration::ZERO } else { outage.hang };
                return Fault::Unavailable(hang);
            }
        }
        if let Some(status) = s.fail_next.pop_front() {
            return Fault::Fail(StatusCode::from_u16(status).unwrap());
        }
        let write = matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
        let mut lose = false;
        if write && s.lose_left > 0 {
            s.writes += 1;
            lose = s.writes.is_multiple_of(s.lose_every);
            if lose {
                s.lose_left -= 1;
            }
        }
        Fault::Serve { lose }
    }
}

/// The fault layer: latency first, then an outage, a failure, or the fake's own answer (lost
/// when told to).
async fn apply(State(faults): State<Faults>, request: Request, next: Next) -> Response {
    let latency = faults.state.lock().unwrap().latency;
    if !latency.is_zero() {
        // The injected latency itself (a slow server), not a synchronisation.
        tokio::time::sleep(latency).await;
    }
    match faults.decide(request.method()) {
        Fault::Unavailable(hang) => {
            if !hang.is_zero() {
                tokio::time::sleep(hang).await;
            }
            (faults.answers.unavailable)()
        }
        Fault::Fail(status) => (faults.answers.failed)(status),
        Fault::Serve { lose } => {
            // The fake serves the request in full: its effect stays whether the answer does or not.
            let answer = next.run(request).await;
            if lose {
                (faults.answers.lost)()
            } else {
                answer
            }
        }
    }
}

/// `app` behind the fault layer of `faults`, for a fake that serves itself (over TLS).
pub fn with_faults(app: Router, faults: &Faults) -> Router {
    app.layer(axum::middleware::from_fn_with_state(faults.clone(), apply))
}

/// Serves `app` behind the fault layer of `faults` on a free port of 127.0.0.1; returns its
/// base URL.
pub async fn serve(app: Router, faults: &Faults) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = with_faults(app, faults);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// Decodes `%XX` escapes and `+` (a space) in a query or form value.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `key=value` pairs of a query string or a form-encoded body, decoded.
pub fn form_pairs(text: &str) -> BTreeMap<String, String> {
    text.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

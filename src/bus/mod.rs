//! The message bus: connection, topology, the consumer with its lanes, acknowledgement, and
//! publishing fixtures.
//!
//! Owns everything that speaks AMQP. The rest of the program sees deliveries as bytes and
//! outcomes as values; only [`ack`] decides what happens to a message on the broker.

pub mod ack;
pub mod batch;
pub mod consumer;
pub mod dead;
mod intake;
pub mod publish;
pub mod tap;
pub mod topology;

use lapin::{options::BasicPublishOptions, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use std::time::Duration;

use crate::{
    class::ErrorClass,
    config::{BusSettings, SecretUrl},
};

pub use consumer::{run, FollowUp, Handler, Processed};

/// How long a publish waits for the broker's confirm: a connection that died silently would
/// make it wait forever.
pub const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Publishes on a channel in confirm mode and waits for the broker's confirm (at most
/// [`CONFIRM_TIMEOUT`]). With `mandatory`, a message no queue takes comes back and is an
/// error, never silently dropped. Every publish of the service that must be confirmed before
/// it goes on (retries, dead letters, hand-overs, requeues, `replay --publish`) is this one; the
/// intake pipelines its confirms instead (see `intake`).
///
/// # Errors
/// [`BusError::NotConfirmed`] (it names the route) when no queue took it, the broker refused
/// it or no confirm came in time; [`BusError::Broker`] when the channel failed.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    mandatory: bool,
) -> Result<(), BusError> {
    let broker = |source| BusError::Broker { url: format!("(publish to {exchange:?})"), source };
    let options = BasicPublishOptions { mandatory, ..BasicPublishOptions::default() };
    let publish =
        async { channel.basic_publish(exchange.into(), routing_key.into(), options, body, properties).await?.await };
    let route = format!("{exchange:?} (routing key {routing_key:?})");
    let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, publish)
        .await
        .map_err(|_| BusError::NotConfirmed { exchange: format!("{route}: no confirm within {CONFIRM_TIMEOUT:?}") })?
        .map_err(broker)?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => {
            Err(BusError::NotConfirmed { exchange: format!("{route}: no queue is bound for it") })
        }
        Confirmation::Nack(_) | Confirmation::NotRequested => {
            Err(BusError::NotConfirmed { exchange: format!("{route}: the broker refused it") })
        }
    }
}
pub use topology::Names;

/// A broker failure.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// No connection could be opened: refused, unresolvable, TLS or login failure.
    #[error("cannot connect to the broker at {url}: {source}")]
    Unreachable {
        /// The broker URL, password redacted.
        url: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker's TLS certificate was not trusted.
    #[error(
        "the broker at {url} presented a certificate that is not trusted ({source}): set bus.tls.ca_file to the \
         PEM file of the CA that signs it (only the system's roots are trusted otherwise)"
    )]
    Untrusted {
        /// The broker URL, password redacted.
        url: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// A queue this command works on does not exist.
    #[error("{what} does not exist: {hint}")]
    Missing {
        /// The queue.
        what: String,
        /// What to do about it.
        hint: String,
    },
    /// The connection or a channel failed.
    #[error("broker {url}: {source}")]
    Broker {
        /// The broker URL, password redacted.
        url: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker refused a declaration because an existing object has other settings.
    #[error("{what}: {detail}; {fix}")]
    Precondition {
        /// What was being declared.
        what: String,
        /// The broker's reply.
        detail: String,
        /// The configuration option that fixes it.
        fix: String,
    },
    /// The broker did not confirm a publish.
    #[error("the broker did not take a message published to exchange {exchange}")]
    NotConfirmed {
        /// The exchange and routing key, and why.
        exchange: String,
    },
    /// An upstream exchange this service binds to does not exist yet. OpenStack's services
    /// declare their exchanges (with their own durability) when they first publish; this
    /// service never creates them, so it waits.
    #[error(
        "upstream exchange {exchange} does not exist yet: OpenStack's services declare it when they first publish \
         (this service never creates it: one declared with another durability makes their publishes fail); \
         waiting for it. Remove it from bus.bindings if that service is not deployed"
    )]
    UpstreamAbsent {
        /// The exchange.
        exchange: String,
    },
    /// The broker did not answer in time: a connection lost halfway through its opening
    /// handshake can leave lapin waiting for an answer that never comes.
    #[error("the broker at {url} did not answer {what} within {}s", after.as_secs())]
    NoAnswer {
        /// The broker URL, password redacted.
        url: String,
        /// What was waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// A consumer could not be set up from the configuration.
    #[error("{detail}")]
    Config {
        /// What is wrong.
        detail: String,
    },
}

impl BusError {
    /// The failure class: configuration mismatches are permanent, the rest transient.
    pub fn class(&self) -> ErrorClass {
        match self {
            BusError::Precondition { .. }
            | BusError::Missing { .. }
            | BusError::Config { .. }
            | BusError::Untrusted { .. } => ErrorClass::Permanent,
            BusError::Unreachable { .. }
            | BusError::Broker { .. }
            | BusError::NotConfirmed { .. }
            | BusError::NoAnswer { .. }
            | BusError::UpstreamAbsent { .. } => ErrorClass::Transient,
        }
    }
}

/// How long opening a connection, or setting up a consumer on it, may take. RabbitMQ itself
/// gives a client 10 s for the handshake (`handshake_timeout`).
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Opens a connection to the broker.
///
/// # Errors
/// [`BusError::Unreachable`] when the broker cannot be reached or refuses the credentials;
/// [`BusError::NoAnswer`] when the handshake does not finish within [`SETUP_TIMEOUT`].
pub async fn connect(bus: &BusSettings, name: &str) -> Result<Connection, BusError> {
    let url = &bus.url;
    let tls = tls_config(&bus.tls).map_err(|detail| BusError::Config { detail })?;
    let nodes = nodes(url);
    if nodes.len() == 1 {
        return connect_within(url, &tls, name, SETUP_TIMEOUT).await;
    }
    // A cluster: from the node after the one last connected to (a reconnection follows a lost
    // node), each in turn; an unanswering node is given less time, so the others are reached.
    let first = NODE.load(std::sync::atomic::Ordering::Relaxed).wrapping_add(1);
    let mut last = None;
    for i in (0..nodes.len()).map(|k| (first + k) % nodes.len()) {
        let node = &nodes[i];
        match connect_within(node, &tls, name, NODE_TIMEOUT).await {
            Ok(connection) => {
                NODE.store(i, std::sync::atomic::Ordering::Relaxed);
                let host = node_host(node);
                tracing::info!(node = %host, connection = name, "connected to broker node");
                for (k, other) in nodes.iter().enumerate() {
                    let on = if k == i { 1.0 } else { 0.0 };
                    metrics::gauge!(crate::telemetry::BROKER_NODE, "node" => node_host(other)).set(on);
                }
                return Ok(connection);
            }
            Err(e) => {
                tracing::warn!(node = %node_host(node), error.message = %e, "broker node unreachable; trying the next");
                last = Some(e);
            }
        }
    }
    // `nodes` has at least two entries, so an error was kept.
    Err(last.expect("a cluster has nodes"))
}

/// The node of a cluster last connected to (an index into [`nodes`]); a reconnection starts
/// after it.
static NODE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(usize::MAX);

/// How long one node of a cluster may take to answer before the next is tried.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// The broker's nodes: oslo's multi-host form
/// (`amqp://u:p@ctl1:5672,u:p@ctl2:5672,u:p@ctl3:5672/vhost`) as one URL per node, each with the
/// vhost and query; a host without credentials takes the previous host's. A one-node URL is
/// itself.
pub fn nodes(url: &SecretUrl) -> Vec<SecretUrl> {
    let text = url.expose();
    let Some((scheme, rest)) = text.split_once("://") else { return vec![url.clone()] };
    let (hosts, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if !hosts.contains(',') {
        return vec![url.clone()];
    }
    let mut credentials: Option<&str> = None;
    hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|host| {
            let host = match host.rsplit_once('@') {
                Some((userinfo, address)) => {
                    credentials = Some(userinfo);
                    format!("{userinfo}@{address}")
                }
                None => credentials.map_or_else(|| host.to_owned(), |c| format!("{c}@{host}")),
            };
            SecretUrl::new(format!("{scheme}://{host}{tail}"))
        })
        .collect()
}

/// A node's `host:port`, for logs and the metric label (no credentials).
fn node_host(node: &SecretUrl) -> String {
    let text = node.expose();
    let rest = text.split_once("://").map_or(text, |(_, r)| r);
    let address = rest.rsplit_once('@').map_or(rest, |(_, a)| a);
    address.split(['/', '?']).next().unwrap_or_default().to_owned()
}

async fn connect_within(
    url: &SecretUrl,
    tls: &Option<lapin::tcp::OwnedTLSConfig>,
    name: &str,
    after: Duration,
) -> Result<Connection, BusError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    answered_within(after, url, "the connection's opening handshake", async {
        let connected = match tls {
            None => Connection::connect(url.expose(), properties).await,
            Some(tls) => {
                let runtime = lapin::runtime::default_runtime()
                    .map_err(|source| BusError::Unreachable { url: url.redacted(), source })?;
                Connection::connect_with_config(url.expose(), properties, tls.clone(), runtime).await
            }
        };
        connected.map_err(|source| {
            // rustls says "invalid peer certificate: UnknownIssuer" (or another reason).
            if source.to_string().contains("invalid peer certificate") {
                BusError::Untrusted { url: url.redacted(), source }
            } else {
                BusError::Unreachable { url: url.redacted(), source }
            }
        })
    })
    .await
}

// FIXME(bus): the client certificate (`cert_file`, `key_file`) is handed to the TLS handshake
// but no test runs a broker that asks for one: a key in another format than unencrypted PKCS#8
// PEM fails only when the first connection is made.
/// The TLS configuration of `[bus.tls]`, or none when it sets nothing (the system's roots).
///
/// # Errors
/// A file that cannot be read, named with its key.
fn tls_config(tls: &crate::config::BusTls) -> Result<Option<lapin::tcp::OwnedTLSConfig>, String> {
    if !tls.is_set() {
        return Ok(None);
    }
    let read = |key: &str, path: &str| {
        std::fs::read_to_string(path).map_err(|e| format!("bus.tls.{key}: cannot read {path}: {e}"))
    };
    let cert_chain = tls.ca_file.as_deref().map(|p| read("ca_file", p)).transpose()?;
    let identity = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
            pem: read("cert_file", cert)?.into_bytes(),
            key: read("key_file", key)?.into_bytes(),
        }),
        _ => None,
    };
    Ok(Some(lapin::tcp::OwnedTLSConfig { identity, cert_chain }))
}

/// `work`, or [`BusError::NoAnswer`] naming `what` when it takes over [`SETUP_TIMEOUT`].
pub(crate) async fn answered<T>(
    url: &SecretUrl,
    what: &'static str,
    work: impl std::future::Future<Output = Result<T, BusError>>,
) -> Result<T, BusError> {
    answered_within(SETUP_TIMEOUT, url, what, work).await
}

async fn answered_within<T>(
    after: Duration,
    url: &SecretUrl,
    what: &'static str,
    work: impl std::future::Future<Output = Result<T, BusError>>,
) -> Result<T, BusError> {
    tokio::time::timeout(after, work)
        .await
        .unwrap_or_else(|_| Err(BusError::NoAnswer { url: url.redacted(), what, after }))
}

/// Wraps a lapin error with the (redacted) broker URL. lapin opens connections in the
/// background, so a refused connection can first show up on the first channel: I/O errors are
/// [`BusError::Unreachable`].
pub(crate) fn broker_error(url: &SecretUrl) -> impl Fn(lapin::Error) -> BusError + '_ {
    move |source| {
        if source.is_io_error() {
            BusError::Unreachable { url: url.redacted(), source }
        } else {
            BusError::Broker { url: url.redacted(), source }
        }
    }
}

/// The AMQP reply code of a broker's refusal (403 access refused, 406 precondition failed…).
pub(crate) fn amqp_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn oslos_multi_host_url_is_one_url_per_node_with_the_vhost_and_inherited_credentials() {
        let url = SecretUrl::new("amqp://u:p@ctl1:5672,ctl2:5673,v:q@ctl3/%2fopenstack?heartbeat=30");
        let urls: Vec<String> = nodes(&url).iter().map(|n| n.expose().to_owned()).collect();
        assert_eq!(
            urls,
            [
                "amqp://u:p@ctl1:5672/%2fopenstack?heartbeat=30",
                "amqp://u:p@ctl2:5673/%2fopenstack?heartbeat=30",
                "amqp://v:q@ctl3/%2fopenstack?heartbeat=30",
            ]
        );
        let hosts: Vec<String> = nodes(&url).iter().map(node_host).collect();
        assert_eq!(hosts, ["ctl1:5672", "ctl2:5673", "ctl3"], "no credentials in a label");
        let one = SecretUrl::new("amqps://u:p@rabbit:5671/%2f");
        assert_eq!(nodes(&one).len(), 1);
        assert_eq!(nodes(&one)[0].expose(), one.expose());
    }

    /// A Connection.Start frame: AMQP 0-9-1, no server properties, PLAIN, en_US.
    pub(super) fn connection_start() -> Vec<u8> {
        let mut payload = vec![0, 10, 0, 10, 0, 9, 0, 0, 0, 0];
        for text in [&b"PLAIN"[..], b"en_US"] {
            payload.extend_from_slice(&u32::try_from(text.len()).unwrap().to_be_bytes());
            payload.extend_from_slice(text);
        }
        let mut frame = vec![1, 0, 0];
        frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.push(0xCE);
        frame
    }

    #[tokio::test]
    async fn a_broker_gone_in_the_middle_of_the_handshake_is_a_transient_error_never_a_hang() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut header = [0u8; 8];
            socket.read_exact(&mut header).await.unwrap();
            socket.write_all(&connection_start()).await.unwrap();
            // Gone (a clean close) right after the first frame, as a broker cut off mid-handshake.
            socket.shutdown().await.unwrap();
        });
        let url = SecretUrl::new(format!("amqp://guest:secret@127.0.0.1:{port}/%2f"));
        let error = connect_within(&url, &None, "test", Duration::from_millis(500)).await.err().unwrap();
        // lapin sees the close or (most of the time) waits for Connection.Tune forever: either
        // way the caller gets a transient error and reconnects.
        let message = error.to_string();
        assert_eq!(error.class(), ErrorClass::Transient);
        match error {
            BusError::NoAnswer { .. } => assert!(message.contains("did not answer the connection's opening handshake")),
            BusError::Unreachable { .. } => {}
            other => panic!("{other}"),
        }
        assert!(!message.contains("secret"), "{message}");
    }
}

//! The message bus: connection, topology, the consumer with its lanes, acknowledgement, and
//! publishing fixtures.
//!
//! Owns everything that speaks AMQP. The rest of the program sees deliveries as bytes and
//! outcomes as values; only [`ack`] decides what happens to a message on the broker.

pub mod ack;
pub mod consumer;
mod intake;
pub mod publish;
pub mod topology;

use lapin::{options::BasicPublishOptions, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::{class::ErrorClass, config::SecretUrl};

pub use consumer::run;

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
            BusError::Precondition { .. } | BusError::Missing { .. } | BusError::Config { .. } => ErrorClass::Permanent,
            BusError::Unreachable { .. }
            | BusError::Broker { .. }
            | BusError::NotConfirmed { .. }
            | BusError::UpstreamAbsent { .. } => ErrorClass::Transient,
        }
    }
}

/// Opens a connection to the broker.
///
/// # Errors
/// [`BusError::Unreachable`] when the broker cannot be reached or refuses the credentials.
pub async fn connect(url: &SecretUrl, name: &str) -> Result<Connection, BusError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url.expose(), properties)
        .await
        .map_err(|source| BusError::Unreachable { url: url.redacted(), source })
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

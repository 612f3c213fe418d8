//! TLS in front of the test servers, with certificates of a CA the test makes
//! ([`super::certificates`]): a listener that axum serves a fake on, and a front that decrypts
//! and relays to a plain server (a broker, a fake), as a TLS proxy or a broker's TLS listener
//! would.

use std::{net::SocketAddr, path::Path, sync::Arc};

use rustls::pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{server::TlsStream, TlsAcceptor};

/// A bound TLS listener for axum: each accepted connection's handshake is done before it is
/// served; a failed handshake (a client that does not trust the certificate) is dropped.
pub struct Listener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl Listener {
    /// Binds a free port of 127.0.0.1 serving `cert` (a PEM chain) with `key`.
    pub async fn bind(cert: &Path, key: &Path) -> Self {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(cert).unwrap().collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self { tcp, acceptor: TlsAcceptor::from(Arc::new(config)) }
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.tcp.local_addr().unwrap()
    }
}

impl axum::serve::Listener for Listener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else { continue };
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A TLS front on a free port of 127.0.0.1, serving `cert` with `key`: each connection is
/// decrypted and relayed to the plain server at `server`. Returns the front's port.
pub async fn front(cert: &Path, key: &Path, server: SocketAddr) -> u16 {
    let mut listener = Listener::bind(cert, key).await;
    let port = listener.local_addr().port();
    tokio::spawn(async move {
        loop {
            let (mut tls, _) = axum::serve::Listener::accept(&mut listener).await;
            tokio::spawn(async move {
                if let Ok(mut plain) = TcpStream::connect(server).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    port
}

/// A plain fake's `http://127.0.0.1:<port>` URL served over TLS by a [`front`]: the same URL
/// as `https://127.0.0.1:<front's port>`.
pub async fn https(cert: &Path, key: &Path, url: &str) -> String {
    let rest = url.strip_prefix("http://").expect("a plain fake's URL");
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let port = front(cert, key, authority.parse().expect("an IP address and port")).await;
    let slash = if path.is_empty() { "" } else { "/" };
    format!("https://127.0.0.1:{port}{slash}{path}")
}

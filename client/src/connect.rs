//! Reaching a node: the endpoint for an address (plaintext, or TLS for
//! `https://` with the webpki roots or a given CA certificate) and the
//! bearer token every call carries.

use crate::Secret;
use crate::pb::conflux_client::ConfluxClient;
use std::path::{Path, PathBuf};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The largest reply a client decodes: a `GetState` page or a `ListEntities`
/// page of the largest size a node answers fits well within it.
pub const MAX_REPLY_BYTES: usize = 64 << 20;

/// Why a client could not reach a node. The texts name the CLI's flags: the
/// CLI is this crate's main user and prints them as they are.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad address {addr:?}")]
    BadAddress {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot read CA certificate {}", path.display())]
    ReadCaCert {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS client configuration")]
    Tls(#[source] tonic::transport::Error),
    #[error("--ca-cert needs an https:// address, not {url}")]
    CaCertNeedsHttps { url: String },
    #[error("--token must be printable ASCII")]
    TokenNotAscii,
    #[error("cannot connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// How a client reaches a node beyond its address.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Sent as `authorization: Bearer <token>` with every call.
    pub token: Option<Secret>,
    /// PEM CA certificate trusted for `https://` addresses (instead of the webpki roots).
    pub ca_cert: Option<PathBuf>,
}

/// Adds the bearer token (if any) to every call.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "BearerToken(<redacted>)" } else { "BearerToken(None)" })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A client whose calls carry [`ClientOptions::token`].
pub type AuthClient = ConfluxClient<InterceptedService<Channel, BearerToken>>;

/// The endpoint for `addr` (`host:port` or a URL); TLS for `https://`.
fn endpoint(addr: &str, ca_cert: Option<&Path>) -> Result<(String, Endpoint), ClientError> {
    let url = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    let mut ep = Endpoint::from_shared(url.clone())
        .map_err(|source| ClientError::BadAddress { addr: addr.to_owned(), source })?
        .tcp_nodelay(true);
    if url.starts_with("https://") {
        let tls = match ca_cert {
            Some(path) => {
                let pem =
                    std::fs::read(path).map_err(|source| ClientError::ReadCaCert { path: path.to_owned(), source })?;
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
            }
            None => ClientTlsConfig::new().with_webpki_roots(),
        };
        ep = ep.tls_config(tls).map_err(ClientError::Tls)?;
    } else if ca_cert.is_some() {
        return Err(ClientError::CaCertNeedsHttps { url });
    }
    Ok((url, ep))
}

/// Connects to a node without a token, in plaintext or (for `https://`) TLS with
/// the webpki roots; accepts `host:port` as well as a URL.
pub async fn connect(addr: &str) -> Result<ConfluxClient<Channel>, ClientError> {
    let (url, ep) = endpoint(addr, None)?;
    let channel = ep.connect().await.map_err(|source| ClientError::Connect { url, source })?;
    Ok(ConfluxClient::new(channel).max_decoding_message_size(MAX_REPLY_BYTES))
}

/// Connects to a node with a bearer token and/or a trusted CA certificate.
pub async fn connect_with(addr: &str, opts: &ClientOptions) -> Result<AuthClient, ClientError> {
    let token = match &opts.token {
        Some(t) => {
            let mut v: MetadataValue<Ascii> =
                format!("Bearer {}", t.expose()).parse().map_err(|_| ClientError::TokenNotAscii)?;
            v.set_sensitive(true);
            Some(v)
        }
        None => None,
    };
    let (url, ep) = endpoint(addr, opts.ca_cert.as_deref())?;
    let channel = ep.connect().await.map_err(|source| ClientError::Connect { url, source })?;
    Ok(ConfluxClient::with_interceptor(channel, BearerToken(token)).max_decoding_message_size(MAX_REPLY_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_cert_needs_https() {
        let e = endpoint("127.0.0.1:9", Some(Path::new("ca.pem"))).unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
        endpoint("https://127.0.0.1:9", None).unwrap();
    }

    #[test]
    fn bare_addresses_mean_plaintext_http() {
        let (url, _) = endpoint("127.0.0.1:9", None).unwrap();
        assert_eq!(url, "http://127.0.0.1:9");
        assert!(matches!(endpoint("http://bad host", None), Err(ClientError::BadAddress { .. })));
    }

    #[test]
    fn tokens_must_be_printable_ascii() {
        let opts = ClientOptions { token: Some(Secret::new("tok\nen")), ca_cert: None };
        let e = poll_once(connect_with("127.0.0.1:9", &opts)).unwrap_err();
        assert!(matches!(e, ClientError::TokenNotAscii), "{e}");
    }

    /// Polls a future that finishes without waiting on I/O (the token is
    /// refused before any connection is tried).
    fn poll_once<F: std::future::Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("the future waited on I/O"),
        }
    }
}

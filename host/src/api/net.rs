//! `Network`: where the API listens and how a node dials its peers, when
//! that is not the operating system's TCP. Production never sets one; the
//! deterministic simulation (`tests/simulation.rs`) hands every node turmoil's
//! simulated network through it, so the very same node code — API, cluster
//! transport, joins — runs under simulated time, latency and partitions.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A byte stream to or from a peer.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// One connection of a custom network.
pub struct Conn(Pin<Box<dyn Stream>>);

impl Conn {
    pub fn new(stream: impl Stream) -> Self {
        Self(Box::pin(stream))
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Conn")
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.0.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.0.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.as_mut().poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// Accepted connections, as a stream (what tonic serves).
pub type Incoming = BoxStream<'static, io::Result<Conn>>;

/// A network other than the OS's TCP.
pub trait Network: Send + Sync + 'static {
    /// Listens on `addr`; returns the bound address and the connections.
    fn listen(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<(SocketAddr, Incoming)>>;
    /// Connects to `host:port`.
    fn dial(&self, addr: String) -> BoxFuture<'static, io::Result<Conn>>;
}

/// A shared handle on a custom network.
pub type SharedNetwork = Arc<dyn Network>;

/// A connector for tonic's `Endpoint` that dials through `network`.
pub fn connector(
    network: SharedNetwork,
) -> impl tower::Service<
    tonic::codegen::http::Uri,
    Response = hyper_util::rt::TokioIo<Conn>,
    Error = io::Error,
    Future = BoxFuture<'static, io::Result<hyper_util::rt::TokioIo<Conn>>>,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |uri: tonic::codegen::http::Uri| {
        let network = network.clone();
        let fut: BoxFuture<'static, io::Result<hyper_util::rt::TokioIo<Conn>>> = Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no host:port in {uri}")))?
                .to_string();
            Ok(hyper_util::rt::TokioIo::new(network.dial(authority).await?))
        });
        fut
    })
}

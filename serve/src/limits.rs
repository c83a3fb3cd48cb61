//! Bounds on every listening face (agent gRPC on TCP and the unix socket, agent HTTP, gate HTTP
//! and gRPC), so that no client, careless or hostile, can exhaust the process:
//!
//! - **Connections**: each face admits at most [`FaceLimits::max_connections`] at once, and a
//!   TCP face at most [`FaceLimits::max_per_peer`] from one address (one pod cannot take every
//!   slot from the gate or Prometheus). A connection over a cap is closed at once, never queued.
//! - **Idle connections**: a connection that moves no byte either way for
//!   [`FaceLimits::idle_timeout`] is closed. The gRPC faces ping every
//!   [`HTTP2_KEEPALIVE_INTERVAL`], so a live client (even one waiting an hour in `WaitDrained`)
//!   is never idle; a peer that does not answer a ping within [`HTTP2_KEEPALIVE_TIMEOUT`] is
//!   dropped. TCP keepalive ([`TCP_KEEPALIVE`]) finds peers that vanished.
//! - **Slow headers** (slowloris): the HTTP faces close a connection whose request head is not
//!   complete [`HEADER_READ_TIMEOUT`] after hyper began waiting for it, also between the
//!   requests of a keep-alive connection.
//! - **Descriptors**: [`raise_open_files_limit`] lifts the soft `RLIMIT_NOFILE` to the hard one,
//!   and [`scaled`] shrinks the caps so that [`FD_RESERVE`] descriptors stay free for the rest of
//!   the process (the agent's inventory opens `/proc` and netns files on every resync).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};
use tokio_stream::Stream;

/// How long an HTTP request head may take (from when the server waits for it).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the gRPC faces ping a connection that is otherwise quiet.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is closed.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive: first probe after this much silence (then every 10 s, 3 tries).
pub const TCP_KEEPALIVE: Duration = Duration::from_mins(1);
/// No byte either way for this long closes a connection (the gRPC faces' pings count).
pub const IDLE_TIMEOUT: Duration = Duration::from_mins(1);
/// Descriptors kept free of every face's connections, for everything else the process opens.
pub const FD_RESERVE: u64 = 1024;

/// The bounds of one listening face.
#[derive(Debug, Clone)]
pub struct FaceLimits {
    /// What the face is called in logs ("agent gRPC", "gate HTTP", ...).
    pub name: &'static str,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Most connections open at once from one peer address (TCP faces).
    pub max_per_peer: usize,
    /// No byte either way for this long closes a connection.
    pub idle_timeout: Duration,
}

impl FaceLimits {
    /// The agent's gRPC face on TCP: the gate holds one connection per agent.
    #[must_use]
    pub const fn agent_grpc() -> Self {
        Self {
            name: "agent gRPC",
            max_connections: 512,
            max_per_peer: 64,
            idle_timeout: IDLE_TIMEOUT,
        }
    }

    /// The agent's gRPC face on its unix socket: the CLI and preStop hooks of this node's pods.
    #[must_use]
    pub const fn agent_unix() -> Self {
        Self {
            name: "agent unix socket",
            max_connections: 256,
            max_per_peer: usize::MAX,
            idle_timeout: IDLE_TIMEOUT,
        }
    }

    /// The agent's HTTP face: Prometheus and the kubelet's probes.
    #[must_use]
    pub const fn agent_http() -> Self {
        Self {
            name: "agent HTTP",
            max_connections: 128,
            max_per_peer: 32,
            idle_timeout: IDLE_TIMEOUT,
        }
    }

    /// The gate's gRPC face.
    #[must_use]
    pub const fn gate_grpc() -> Self {
        Self {
            name: "gate gRPC",
            max_connections: 1024,
            max_per_peer: 128,
            idle_timeout: IDLE_TIMEOUT,
        }
    }

    /// The gate's HTTP face: a `GET /v1/verdict?wait=` is silent up to `max_wait`, so its idle
    /// timeout is a minute longer (slow headers are closed after [`HEADER_READ_TIMEOUT`]).
    #[must_use]
    pub const fn gate_http(max_wait: Duration) -> Self {
        Self {
            name: "gate HTTP",
            max_connections: 1024,
            max_per_peer: 128,
            idle_timeout: max_wait.saturating_add(IDLE_TIMEOUT),
        }
    }

    /// The gate's admission webhook face: only the API servers call it, each request answered
    /// at once, one connection per request ([`serve_https`]), so one API server may hold every
    /// slot.
    #[must_use]
    pub const fn gate_webhook() -> Self {
        Self {
            name: "gate webhook",
            max_connections: 256,
            max_per_peer: 256,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// Lifts the soft open-files limit to the hard one; returns the soft limit now in force.
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(err) => {
                tracing::warn!(error = %crate::telemetry::chain(&err), soft, hard, "cannot raise the open-files limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(err) => {
            tracing::warn!(error = %crate::telemetry::chain(&err), "cannot read the open-files limit");
            FD_RESERVE * 2
        }
    }
}

/// The soft open-files limit in force.
#[must_use]
pub fn open_files_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(FD_RESERVE * 2, |(soft, _)| soft)
}

/// `faces` with their connection caps shrunk, in proportion, so that all of them together
/// leave [`FD_RESERVE`] of `open_files` descriptors free (half of them when the limit is under
/// twice the reserve). Each face keeps at least 4 connections.
#[must_use]
pub fn scaled<const N: usize>(mut faces: [FaceLimits; N], open_files: u64) -> [FaceLimits; N] {
    let reserve = FD_RESERVE.min(open_files / 2);
    let budget = usize::try_from(open_files.saturating_sub(reserve)).unwrap_or(usize::MAX);
    let wanted: usize = faces.iter().map(|f| f.max_connections).sum();
    if wanted > budget {
        tracing::warn!(
            open_files,
            reserve,
            wanted,
            "the open-files limit is low: the connection caps are scaled down to fit"
        );
        for face in &mut faces {
            face.max_connections = (face.max_connections * budget / wanted.max(1)).max(4);
            face.max_per_peer = face.max_per_peer.min(face.max_connections);
        }
    }
    faces
}

/// The agent's faces (gRPC on TCP, the unix socket, HTTP), their caps fitted to the open-files
/// limit in force.
#[must_use]
pub fn agent_faces() -> [FaceLimits; 3] {
    scaled(
        [
            FaceLimits::agent_grpc(),
            FaceLimits::agent_unix(),
            FaceLimits::agent_http(),
        ],
        open_files_limit(),
    )
}

/// The gate's faces (HTTP, gRPC), their caps fitted to the open-files limit in force.
#[must_use]
pub fn gate_faces(max_wait: Duration) -> [FaceLimits; 2] {
    scaled(
        [FaceLimits::gate_http(max_wait), FaceLimits::gate_grpc()],
        open_files_limit(),
    )
}

/// Counts a face's open connections, in all and per peer address.
#[derive(Debug)]
struct Slots {
    limits: FaceLimits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Slots {
    /// A slot for one more connection from `peer`, or `None` when a cap is reached.
    fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.0 >= self.limits.max_connections {
            return None;
        }
        if let Some(peer) = peer {
            let n = open.1.entry(peer).or_insert(0);
            if *n >= self.limits.max_per_peer {
                return None;
            }
            *n += 1;
        }
        open.0 += 1;
        Some(Slot {
            slots: Arc::clone(self),
            peer,
        })
    }
}

/// One admitted connection's place; freed when the connection is dropped.
#[derive(Debug)]
struct Slot {
    slots: Arc<Slots>,
    peer: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.0 = open.0.saturating_sub(1);
        if let Some(peer) = self.peer
            && let Some(n) = open.1.get_mut(&peer)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.1.remove(&peer);
            }
        }
    }
}

/// A listener whose connections a face admits.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection and its peer's address (none for a unix socket).
    fn poll_accept(&mut self, cx: &mut Context<'_>)
    -> Poll<io::Result<(Self::Io, Option<IpAddr>)>>;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    fn poll_accept(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(Self::Io, Option<IpAddr>)>> {
        tokio::net::TcpListener::poll_accept(self, cx).map_ok(|(stream, peer)| {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(TCP_KEEPALIVE)
                .with_interval(Duration::from_secs(10))
                .with_retries(3);
            let socket = socket2::SockRef::from(&stream);
            if let Err(err) = socket
                .set_tcp_keepalive(&keepalive)
                .and_then(|()| socket.set_tcp_nodelay(true))
            {
                tracing::debug!(error = %crate::telemetry::chain(&err), "cannot set TCP keepalive");
            }
            // An IPv4 peer on a dual-stack socket counts as that IPv4 address.
            (stream, Some(peer.ip().to_canonical()))
        })
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    fn poll_accept(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(Self::Io, Option<IpAddr>)>> {
        tokio::net::UnixListener::poll_accept(self, cx).map_ok(|(stream, _)| (stream, None))
    }
}

/// The connections a face admits, as a stream (what tonic's `serve_with_incoming` takes).
/// Connections over a cap are closed as they are accepted; accept errors (out of descriptors,
/// say) pause accepting for a moment instead of spinning.
#[derive(Debug)]
pub struct Incoming<L> {
    listener: L,
    slots: Arc<Slots>,
    backoff: Option<Pin<Box<Sleep>>>,
    refused: u64,
    logged_refused: Option<Instant>,
}

impl<L: Listener> Incoming<L> {
    #[must_use]
    pub fn new(listener: L, limits: FaceLimits) -> Self {
        Self {
            listener,
            slots: Arc::new(Slots {
                limits,
                open: Mutex::new((0, HashMap::new())),
            }),
            backoff: None,
            refused: 0,
            logged_refused: None,
        }
    }

    fn note_refused(&mut self, peer: Option<IpAddr>) {
        self.refused += 1;
        // At most one line a minute: a flood must not flood the log too.
        let now = Instant::now();
        if self
            .logged_refused
            .is_none_or(|t| now.duration_since(t) >= Duration::from_mins(1))
        {
            self.logged_refused = Some(now);
            tracing::warn!(
                face = self.slots.limits.name,
                peer = ?peer,
                max_connections = self.slots.limits.max_connections,
                max_per_peer = self.slots.limits.max_per_peer,
                refused_so_far = self.refused,
                "connection refused: too many open"
            );
        }
    }
}

impl<L: Listener + Unpin> Stream for Incoming<L> {
    type Item = io::Result<Limited<L::Io>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(backoff) = &mut this.backoff {
            if backoff.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.backoff = None;
        }
        // Refusals are cheap, but a flood must not keep this task from yielding.
        for _ in 0..256 {
            match this.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(err)) => {
                    tracing::warn!(face = this.slots.limits.name, error = %crate::telemetry::chain(&err), "accept failed");
                    this.backoff = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(Ok((io, peer))) => {
                    if let Some(slot) = this.slots.admit(peer) {
                        let idle = this.slots.limits.idle_timeout;
                        return Poll::Ready(Some(Ok(Limited::new(io, idle, slot))));
                    }
                    drop(io);
                    this.note_refused(peer);
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// An admitted connection: closed (reads fail with `TimedOut`) after its idle timeout without a
/// byte either way; its slot is freed when it is dropped.
#[derive(Debug)]
pub struct Limited<IO> {
    io: IO,
    idle_timeout: Duration,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
    _slot: Slot,
}

impl<IO> Limited<IO> {
    fn new(io: IO, idle_timeout: Duration, slot: Slot) -> Self {
        let now = Instant::now();
        Self {
            io,
            idle_timeout,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            _slot: slot,
        }
    }

    /// Whether the connection has been idle too long; re-arms the timer when it fired early
    /// (activity moved the deadline without touching the timer, which is cheaper).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.last_activity + self.idle_timeout;
            if Instant::now() >= deadline {
                return true;
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl<IO> Limited<IO> {
    /// What a read or write of the inner stream returned, after the idle clock saw it: any
    /// bytes moved (`active`) are activity; a pending one fails once the connection has been
    /// idle too long (a peer that reads nothing is as idle as one that writes nothing).
    fn settle<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
        active: bool,
    ) -> Poll<io::Result<T>> {
        if active {
            self.last_activity = Instant::now();
        }
        if polled.is_pending() && self.poll_idle(cx) {
            return Poll::Ready(Err(idle_error()));
        }
        polled
    }
}

fn idle_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle too long")
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let active = matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before;
        this.settle(cx, polled, active)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        let active = matches!(polled, Poll::Ready(Ok(n)) if n > 0);
        this.settle(cx, polled, active)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        let active = matches!(polled, Poll::Ready(Ok(n)) if n > 0);
        this.settle(cx, polled, active)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<IO> {
    type ConnectInfo = IO::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// A tonic server builder with the gRPC faces' keepalive settings.
#[must_use]
pub fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        // Streams per connection: a client cannot make one connection cost more than this.
        .max_concurrent_streams(Some(256))
        .http2_max_header_list_size(Some(16 * 1024))
}

/// Serves `router` over HTTP/1.1 on `listener` within `limits` until `shutdown` resolves; then
/// lets requests in flight finish (for at most 5 s).
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    limits: FaceLimits,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    serve(listener, limits, None, router, shutdown).await;
}

/// [`serve_http`] over TLS with `tls` (the admission webhook's face: the API server only calls
/// webhooks over HTTPS). A handshake not done within [`HEADER_READ_TIMEOUT`] closes the
/// connection. No keep-alive: each response closes its connection. A kept connection would be
/// closed by the header timeout after [`HEADER_READ_TIMEOUT`] idle, and an API server that sent
/// its next review on it at that moment would see the call fail and, with
/// `failurePolicy: Ignore`, create the pod ungated; a handshake per admission costs about a
/// millisecond.
pub async fn serve_https(
    listener: tokio::net::TcpListener,
    limits: FaceLimits,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve(listener, limits, Some(acceptor), router, shutdown).await;
}

async fn serve(
    listener: tokio::net::TcpListener,
    limits: FaceLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use tokio_stream::StreamExt as _;
    let name = limits.name;
    let mut incoming = Incoming::new(listener, limits);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let io = tokio::select! {
            () = &mut shutdown => break,
            io = incoming.next() => io,
        };
        let Some(Ok(io)) = io else { continue };
        let router = router.clone();
        let stop = stop_rx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(io, router, stop, true).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(io)).await {
                        Ok(Ok(io)) => serve_connection(io, router, stop, false).await,
                        Ok(Err(err)) => {
                            tracing::debug!(face = name, error = %crate::telemetry::chain(&err), "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(face = name, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(incoming);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), stop_tx.closed()).await;
}

/// One HTTP/1.1 connection, until it ends or `stop` turns true (then gracefully).
async fn serve_connection<IO>(
    io: IO,
    router: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
    keep_alive: bool,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(keep_alive)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(error = %crate::telemetry::chain(&err), "HTTP connection ended");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt as _;
    use tokio_stream::StreamExt as _;

    use super::{FD_RESERVE, FaceLimits, Incoming, scaled};

    /// Whether the server closed `conn` within `within` (EOF or an error).
    async fn closed(conn: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, conn.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    async fn connect_from(local: [u8; 4], to: std::net::SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((local, 0).into()).unwrap();
        socket.connect(to).await.unwrap()
    }

    /// Over a cap a connection is closed at once; one address cannot take another's place; an
    /// admitted connection that stays silent is closed after the idle timeout, and its slot
    /// is free again.
    #[tokio::test]
    async fn caps_refuse_at_once_and_idle_connections_are_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = FaceLimits {
            name: "test",
            max_connections: 3,
            max_per_peer: 2,
            idle_timeout: Duration::from_millis(600),
        };
        let mut incoming = Incoming::new(listener, limits);
        // The server: holds each connection and reads it (as hyper does) until it fails.
        tokio::spawn(async move {
            while let Some(Ok(mut conn)) = incoming.next().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        let short = Duration::from_millis(200);
        let mut a1 = connect_from([127, 0, 0, 1], addr).await;
        let mut a2 = connect_from([127, 0, 0, 1], addr).await;
        let mut a3 = connect_from([127, 0, 0, 1], addr).await;
        assert!(closed(&mut a3, short).await, "a third from one address");
        let mut b1 = connect_from([127, 0, 0, 2], addr).await;
        let mut c1 = connect_from([127, 0, 0, 3], addr).await;
        assert!(closed(&mut c1, short).await, "a fourth in all");
        assert!(!closed(&mut a1, short).await);
        assert!(!closed(&mut b1, short).await);
        // Idle: closed within the timeout (600 ms, measured from the connect).
        assert!(closed(&mut a1, Duration::from_secs(2)).await, "idle a1");
        assert!(closed(&mut a2, Duration::from_secs(2)).await, "idle a2");
        assert!(closed(&mut b1, Duration::from_secs(2)).await, "idle b1");
        // Freed slots are taken again.
        let mut again = connect_from([127, 0, 0, 1], addr).await;
        assert!(!closed(&mut again, short).await, "a freed slot is reused");
    }

    #[test]
    fn caps_leave_the_reserve_free_when_descriptors_are_few() {
        let faces = [FaceLimits::agent_grpc(), FaceLimits::agent_unix()];
        let roomy = scaled(faces.clone(), 1 << 20);
        assert_eq!(roomy[0].max_connections, 512);
        let tight = scaled(faces.clone(), 1024 + 256);
        let total: usize = tight.iter().map(|f| f.max_connections).sum();
        assert!(total as u64 <= 1280 - 640, "{tight:?}");
        assert!(tight.iter().all(|f| f.max_per_peer <= f.max_connections));
        let tiny = scaled(faces, 16);
        assert!(tiny.iter().all(|f| f.max_connections >= 4));
        assert!(tiny.iter().all(|f| (f.max_connections as u64) < FD_RESERVE));
    }
}

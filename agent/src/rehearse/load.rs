//! The load generator: HTTP/1.1 clients at a target rate, on keep-alive connections or a new
//! connection per request, recording every request's outcome. This is the ground truth the
//! agent's verdict is held against, so it sees connections as an ordinary client library does:
//! a connection the server closed while idle is replaced quietly (as Go's and Java's clients do),
//! everything else that keeps a request from its answer is a failure.
//!
//! It runs on a runtime of its own whose threads all live in the client network namespace, so
//! every socket it makes belongs there.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::{mpsc, watch},
};

/// How clients use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectionMode {
    /// Long-lived connections, many requests each (HTTP/1.1 keep-alive).
    KeepAlive,
    /// A new connection for every request, closed by the client after the answer.
    NewConnection,
}

/// What the load generator does.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub target: SocketAddr,
    /// Requests per second, all clients together.
    pub rate: u32,
    /// Concurrent clients (each one connection at a time).
    pub clients: u32,
    pub mode: ConnectionMode,
    pub path: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// At most this many requests are kept one by one; beyond it only the totals grow.
    pub max_records: usize,
}

/// What became of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// The server answered 5xx.
    Http5xx,
    /// The connection was refused (a reset answering the SYN).
    Refused,
    /// The connection was reset while the request was sent or awaited.
    Reset,
    /// The server closed the connection before answering.
    Closed,
    /// No answer to the SYN in time.
    ConnectTimeout,
    /// No answer to the request in time.
    Timeout,
    /// The network said the address cannot be reached (a Service without endpoints).
    Unreachable,
    /// Anything else (an unparsable answer, a local error).
    Error,
}

impl Outcome {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Http5xx => "http_5xx",
            Self::Refused => "refused",
            Self::Reset => "reset",
            Self::Closed => "closed",
            Self::ConnectTimeout => "connect_timeout",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::Error => "error",
        }
    }

    /// A failure of the connection that the pod's kernel sees as a reset or a refusal.
    #[must_use]
    pub const fn seen_by_pod(self) -> bool {
        matches!(self, Self::Refused | Self::Reset | Self::Closed)
    }

    /// A connect that got no answer (timed out, or unreachable): the client's kernel saw its
    /// SYN go unanswered, which the agent counts from the client's side (the peer view).
    #[must_use]
    pub const fn connect_unanswered(self) -> bool {
        matches!(self, Self::ConnectTimeout | Self::Unreachable)
    }

    #[must_use]
    pub const fn is_failure(self) -> bool {
        !matches!(self, Self::Ok)
    }
}

/// One request, as the client saw it.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord {
    /// When it was due, since the load started.
    pub at: Duration,
    pub latency: Duration,
    pub outcome: Outcome,
    pub status: u16,
    /// The client's port: with the client address, names the connection in conntrack.
    pub client_port: u16,
}

/// A failure as soon as it happens, for attribution to a pod while conntrack still knows it.
#[derive(Debug, Clone, Copy)]
pub struct FailureNote {
    /// When it failed (not when it was due: a request cut by an exit failed at the cut), since
    /// the load started.
    pub at: Duration,
    pub outcome: Outcome,
    pub client_port: u16,
}

/// Counters for the progress line.
#[derive(Debug, Default)]
pub struct LiveCounters {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    records: AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot enter the client namespace: {0}")]
    Namespace(String),
    #[error("cannot start the load generator's runtime")]
    Runtime(#[source] io::Error),
}

/// A running load generator.
pub struct LoadGenerator {
    runtime: Option<tokio::runtime::Runtime>,
    stop: watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<Vec<RequestRecord>>>,
    pub live: Arc<LiveCounters>,
    started: Instant,
}

impl std::fmt::Debug for LoadGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadGenerator").finish_non_exhaustive()
    }
}

impl LoadGenerator {
    /// Starts `config.clients` clients in the namespace `netns` (an open `/run/netns/…`).
    pub async fn start(
        config: LoadConfig,
        netns: File,
        failures: mpsc::UnboundedSender<FailureNote>,
    ) -> Result<Self, LoadError> {
        let netns = Arc::new(netns);
        let setns_failed = Arc::new(Mutex::new(None::<String>));
        let runtime = {
            let netns = Arc::clone(&netns);
            let failed = Arc::clone(&setns_failed);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("draingate-load")
                .enable_all()
                .on_thread_start(move || {
                    if let Err(err) =
                        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    {
                        *failed
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some(err.to_string());
                    }
                })
                .build()
                .map_err(LoadError::Runtime)?
        };
        // Make a worker and a blocking thread run now, then check that they entered the
        // namespace.
        runtime
            .spawn(async { tokio::task::yield_now().await })
            .await
            .map_err(|e| LoadError::Namespace(e.to_string()))?;
        runtime
            .spawn_blocking(|| ())
            .await
            .map_err(|e| LoadError::Namespace(e.to_string()))?;
        if let Some(err) = setns_failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            return Err(LoadError::Namespace(err));
        }
        let (stop, stop_rx) = watch::channel(false);
        let live = Arc::new(LiveCounters::default());
        let config = Arc::new(config);
        let started = Instant::now();
        let ports = Arc::new(PortCycle::new());
        let workers = (0..config.clients)
            .map(|id| {
                let client = Client {
                    id,
                    config: Arc::clone(&config),
                    started,
                    live: Arc::clone(&live),
                    failures: failures.clone(),
                    stop: stop_rx.clone(),
                    ports: Arc::clone(&ports),
                };
                runtime.spawn(client.run())
            })
            .collect();
        Ok(Self {
            runtime: Some(runtime),
            stop,
            workers,
            live,
            started,
        })
    }

    /// How long it has been running.
    #[must_use]
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops every client (each finishes its request in flight) and returns all records,
    /// ordered by time.
    pub async fn stop(mut self) -> Vec<RequestRecord> {
        let _ = self.stop.send(true);
        let mut records = Vec::new();
        for worker in std::mem::take(&mut self.workers) {
            if let Ok(mut r) = worker.await {
                records.append(&mut r);
            }
        }
        records.sort_by_key(|r| r.at);
        records
    }
}

impl Drop for LoadGenerator {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// One client: one connection at a time, one request at a time, at its share of the rate.
struct Client {
    id: u32,
    config: Arc<LoadConfig>,
    started: Instant,
    live: Arc<LiveCounters>,
    failures: mpsc::UnboundedSender<FailureNote>,
    stop: watch::Receiver<bool>,
    ports: Arc<PortCycle>,
}

/// The clients' source ports, handed out in turn over the whole range, so that a port comes
/// back only after tens of thousands of connections (over 6 s at 10,000 a second). A failure is
/// attributed to a pod by its port in conntrack's announcements well after it happened; the
/// kernel's own choice gives a refused connect's port to the next connect at once, and the
/// port's latest announcement is then that next connection's.
#[derive(Debug)]
struct PortCycle {
    next: AtomicU64,
}

impl PortCycle {
    /// The range the rehearsal's client namespace has (`ip_local_port_range`).
    const FIRST: u16 = 1024;
    const LAST: u16 = 65_000;

    fn new() -> Self {
        Self {
            next: AtomicU64::new(0),
        }
    }

    fn take(&self) -> u16 {
        let span = u64::from(Self::LAST - Self::FIRST) + 1;
        let offset = self.next.fetch_add(1, Ordering::Relaxed) % span;
        Self::FIRST + u16::try_from(offset).unwrap_or(0)
    }
}

/// A connection and the port it has on the client side.
struct Conn {
    stream: TcpStream,
    port: u16,
}

/// How a request attempt failed, with the client port when a socket existed.
struct Failed {
    outcome: Outcome,
    port: u16,
}

impl Client {
    async fn run(mut self) -> Vec<RequestRecord> {
        let clients = f64::from(self.config.clients);
        let period = Duration::from_secs_f64(clients / f64::from(self.config.rate.max(1)));
        // Spread the clients over one period, so the load is smooth from the start.
        let offset = period.mul_f64(f64::from(self.id) / clients);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut records = Vec::new();
        let mut conn: Option<Conn> = None;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.stop.changed() => break,
            }
            let due = self.started.elapsed();
            let began = Instant::now();
            let result = self.request(&mut conn).await;
            let latency = began.elapsed();
            let (outcome, status, port) = match result {
                Ok((status, port)) if status >= 500 => (Outcome::Http5xx, status, port),
                Ok((status, port)) => (Outcome::Ok, status, port),
                Err(failed) => {
                    conn = None;
                    (failed.outcome, 0, failed.port)
                }
            };
            self.live.sent.fetch_add(1, Ordering::Relaxed);
            if outcome.is_failure() {
                self.live.failed.fetch_add(1, Ordering::Relaxed);
                let _ = self.failures.send(FailureNote {
                    at: due + latency,
                    outcome,
                    client_port: port,
                });
            }
            if self.live.records.fetch_add(1, Ordering::Relaxed) < self.config.max_records {
                records.push(RequestRecord {
                    at: due,
                    latency,
                    outcome,
                    status,
                    client_port: port,
                });
            }
        }
        // Close cleanly: a client's own close is a FIN, never a reset.
        if let Some(mut c) = conn {
            let _ = c.stream.shutdown().await;
        }
        records
    }

    /// One request: on the kept connection if it is still open, else on a new one.
    async fn request(&self, conn: &mut Option<Conn>) -> Result<(u16, u16), Failed> {
        if let Some(c) = conn.as_ref() {
            // A connection the server closed while it was idle is replaced, not failed: the
            // FIN (or unexpected data) is already there to read.
            let mut probe = [0u8; 1];
            match c.stream.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                _ => *conn = None,
            }
        }
        if conn.is_none() {
            *conn = Some(self.connect().await?);
        }
        let c = conn.as_mut().expect("connected above");
        let port = c.port;
        let exchange = tokio::time::timeout(
            self.config.request_timeout,
            exchange(&mut c.stream, &self.config),
        )
        .await;
        match exchange {
            Err(_) => Err(Failed {
                outcome: Outcome::Timeout,
                port,
            }),
            Ok(Err(err)) => Err(Failed {
                outcome: classify(&err),
                port,
            }),
            Ok(Ok(response)) => {
                if (response.close || self.config.mode == ConnectionMode::NewConnection)
                    && let Some(mut c) = conn.take()
                {
                    let _ = c.stream.shutdown().await;
                }
                Ok((response.status, port))
            }
        }
    }

    /// Connects from the next port of the cycle with a non-blocking socket, so that the client
    /// port is known also when the connection fails.
    async fn connect(&self) -> Result<Conn, Failed> {
        let target = self.config.target;
        let fail = |outcome, port| Failed { outcome, port };
        // A port still taken (a connection of the last cycle still open, or its TIME_WAIT not
        // reusable yet) is skipped: that is the client's business, not a failure of the pod.
        let mut attempts = 0;
        let (socket, port) = loop {
            attempts += 1;
            let port = self.ports.take();
            let socket = Socket::new(
                Domain::for_address(target),
                Type::STREAM,
                Some(Protocol::TCP),
            )
            .map_err(|_| fail(Outcome::Error, 0))?;
            socket
                .set_nonblocking(true)
                .map_err(|_| fail(Outcome::Error, 0))?;
            socket
                .set_tcp_nodelay(true)
                .map_err(|_| fail(Outcome::Error, 0))?;
            // Binding a port whose last connection is in TIME_WAIT; connect then decides, with
            // tcp_tw_reuse, whether the 4-tuple may be used again.
            socket
                .set_reuse_address(true)
                .map_err(|_| fail(Outcome::Error, 0))?;
            let local: SocketAddr = match target {
                SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, port).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
            };
            let port_taken = |e: &io::Error| {
                matches!(
                    e.raw_os_error(),
                    Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
                )
            };
            match socket.bind(&local.into()) {
                Ok(()) => {}
                Err(e) if port_taken(&e) && attempts < 64 => continue,
                Err(e) => return Err(fail(classify(&e), 0)),
            }
            match socket.connect(&target.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) if port_taken(&e) && attempts < 64 => continue,
                Err(e) => return Err(fail(classify(&e), port)),
            }
            break (socket, port);
        };
        let stream = TcpStream::from_std(std::net::TcpStream::from(socket))
            .map_err(|_| fail(Outcome::Error, port))?;
        match tokio::time::timeout(self.config.connect_timeout, stream.writable()).await {
            Err(_) => return Err(fail(Outcome::ConnectTimeout, port)),
            Ok(Err(e)) => return Err(fail(classify(&e), port)),
            Ok(Ok(())) => {}
        }
        if let Ok(Some(err)) | Err(err) = stream.take_error() {
            return Err(fail(classify(&err), port));
        }
        Ok(Conn { stream, port })
    }
}

fn classify(err: &io::Error) -> Outcome {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => Outcome::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Outcome::Reset,
        io::ErrorKind::UnexpectedEof => Outcome::Closed,
        io::ErrorKind::TimedOut => Outcome::Timeout,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => Outcome::Unreachable,
        _ => Outcome::Error,
    }
}

/// A response's status and whether the server closes the connection after it.
struct Response {
    status: u16,
    close: bool,
}

/// Largest response head and body the client reads.
const MAX_RESPONSE: usize = 1 << 20;

/// Sends one GET and reads its whole response.
async fn exchange(stream: &mut TcpStream, config: &LoadConfig) -> io::Result<Response> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: draingate-rehearse\r\n\r\n",
        config.path, config.target
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let (status, close, head_len, body) = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = response.code.unwrap_or(0);
                let header = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
                };
                let close = response.version == Some(0)
                    || header("connection").is_some_and(|v| v.contains("close"));
                let body = if let Some(len) = header("content-length") {
                    Body::Length(len.trim().parse().map_err(|_| invalid("Content-Length"))?)
                } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                    Body::Chunked
                } else if status == 204 || status == 304 || (100..200).contains(&status) {
                    Body::Length(0)
                } else {
                    Body::UntilClose
                };
                break (status, close, head_len, body);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE => {}
            Ok(httparse::Status::Partial) => return Err(invalid("oversized response head")),
            Err(_) => return Err(invalid("malformed response")),
        }
    };
    match body {
        Body::Length(len) => {
            while buf.len() < head_len + len {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
        Body::Chunked => {
            // The last chunk and an empty trailer end the body.
            while !buf[head_len..].windows(5).any(|w| w == b"0\r\n\r\n") {
                if buf.len() > MAX_RESPONSE {
                    return Err(invalid("oversized response"));
                }
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
        Body::UntilClose => loop {
            if stream.read(&mut chunk).await? == 0 {
                return Ok(Response {
                    status,
                    close: true,
                });
            }
        },
    }
    Ok(Response { status, close })
}

enum Body {
    Length(usize),
    Chunked,
    UntilClose,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::PortCycle;

    #[test]
    fn ports_come_back_only_after_the_whole_range() {
        let ports = PortCycle::new();
        let first = ports.take();
        assert_eq!(first, PortCycle::FIRST);
        let span = usize::from(PortCycle::LAST - PortCycle::FIRST) + 1;
        let taken: Vec<u16> = (1..span).map(|_| ports.take()).collect();
        assert!(!taken.contains(&first));
        assert_eq!(taken.last(), Some(&PortCycle::LAST));
        assert_eq!(ports.take(), first, "then the cycle starts again");
    }
}

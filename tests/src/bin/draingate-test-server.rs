//! The project's test server: a small HTTP/1.1 keep-alive server whose shutdown behaviour is a
//! flag, so that tests, `draingate rehearse` and the demo can produce clean and dirty drains on
//! purpose.
//!
//! Every request gets `200 ok`; `/health/live` is always 200, `/health/ready` is 200 until
//! SIGTERM and 503 after it. After SIGTERM:
//! - `graceful`: stop accepting, answer each connection's next request with `Connection: close`
//!   and close it, exit once every connection is closed;
//! - `abrupt`: exit at once, leaving the kernel to close (or reset) the connections;
//! - `ignore`: keep serving; only SIGKILL ends it;
//! - `slow`: stop accepting, keep serving the open connections for `--drain-time`, then close
//!   them as `graceful` does (a drain slower than a short grace period);
//! - `late-close`: keep accepting and serving for `--drain-time` (the app's own shutdown delay),
//!   then drain as `graceful` does.
//!
//! `--status-after-term 503` answers every request but the probes with that status once SIGTERM
//! came (a framework that refuses work while it shuts down; with `late-close`, for
//! `--drain-time`, then it drains).
//!
//! A connection that begins with the HTTP/2 preface (cleartext, prior knowledge) is served as
//! HTTP/2, just enough for tests: each request (a HEADERS frame) gets `:status 200`; on
//! SIGTERM the server sends GOAWAY, and resets each later stream with `RST_STREAM` and
//! `--h2-reset-code` (7, `REFUSED_STREAM`, by default). Every frame is written on its own
//! (`TCP_NODELAY`), so each starts a segment.
//!
//! `--backlog` and `--accept-pause` make a server that accepts more slowly than clients
//! connect: its accept queue overflows and the kernel drops their SYNs (their connects time out).

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use clap::{Parser, ValueEnum};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
    signal::unix::{SignalKind, signal},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Graceful,
    Abrupt,
    Ignore,
    Slow,
    LateClose,
}

/// HTTP/1.1 keep-alive test server with a chosen shutdown behaviour.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (default: 0.0.0.0 and the port in $PORT).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// What to do on SIGTERM.
    #[arg(long, value_enum, default_value_t = Mode::Graceful)]
    mode: Mode,
    /// Wait this long before listening (an application's start-up time).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    startup_delay: Duration,
    /// For `slow` and `late-close`: how long the drain (or the delay before it) takes.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain_time: Duration,
    /// The listen backlog: how many connections the kernel queues until the server accepts them.
    #[arg(long, default_value_t = 1024)]
    backlog: u32,
    /// Take this long to answer each request (probes are answered at once).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    request_time: Duration,
    /// Pause this long after each accept (an application that accepts slowly).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    accept_pause: Duration,
    /// The status of every answer but the probes' after SIGTERM (100 to 599).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(100..600))]
    status_after_term: u16,
    /// The `RST_STREAM` error code for HTTP/2 requests after SIGTERM (7: `REFUSED_STREAM`).
    #[arg(long, default_value_t = 7)]
    h2_reset_code: u32,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let listen = if let Some(listen) = args.listen {
        listen
    } else {
        let port: u16 = std::env::var("PORT")
            .map_err(|_| "give --listen or set PORT")?
            .parse()
            .map_err(|_| "PORT is not a port number")?;
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
    };
    let mut term = signal(SignalKind::terminate())?;
    let draining = Arc::new(AtomicBool::new(false));
    let terminating = Arc::new(AtomicBool::new(false));
    tokio::select! {
        () = tokio::time::sleep(args.startup_delay) => {}
        _ = term.recv() => return Ok(()),
    }
    let socket = if listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    let listener = socket.listen(args.backlog)?;
    let open = Arc::new(AtomicUsize::new(0));
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    println!("listening on {listen}");
    let mut accept_until: Option<tokio::time::Instant> = None;
    loop {
        let late_close = async {
            match accept_until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                open.fetch_add(1, Ordering::SeqCst);
                let (draining, terminating) = (Arc::clone(&draining), Arc::clone(&terminating));
                let open = Arc::clone(&open);
                let closed = closed_tx.clone();
                let answers = Answers {
                    request_time: args.request_time,
                    status_after_term: args.status_after_term,
                    h2_reset_code: args.h2_reset_code,
                };
                tokio::spawn(async move {
                    let _ = serve(stream, &draining, &terminating, answers).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                    let _ = closed.send(());
                });
                if !args.accept_pause.is_zero() {
                    tokio::time::sleep(args.accept_pause).await;
                }
            }
            _ = term.recv(), if accept_until.is_none() => {
                println!("SIGTERM: {:?}", args.mode);
                terminating.store(true, Ordering::SeqCst);
                match args.mode {
                    Mode::Abrupt => std::process::exit(0),
                    Mode::Ignore => {}
                    Mode::Graceful | Mode::Slow => break,
                    Mode::LateClose => {
                        accept_until = Some(tokio::time::Instant::now() + args.drain_time);
                    }
                }
            }
            () = late_close => break,
        }
    }
    drop(listener);
    if args.mode == Mode::Slow {
        tokio::time::sleep(args.drain_time).await;
    }
    draining.store(true, Ordering::SeqCst);
    while open.load(Ordering::SeqCst) > 0 {
        closed_rx.recv().await;
    }
    println!("drained; exiting");
    Ok(())
}

/// How requests are answered.
#[derive(Debug, Clone, Copy)]
struct Answers {
    request_time: Duration,
    status_after_term: u16,
    h2_reset_code: u32,
}

/// The HTTP/2 client preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves requests on one connection until the client closes it, or until draining (the
/// response to the next request then says `Connection: close`).
async fn serve(
    mut stream: TcpStream,
    draining: &AtomicBool,
    terminating: &AtomicBool,
    answers: Answers,
) -> std::io::Result<()> {
    let Answers {
        request_time,
        status_after_term,
        h2_reset_code,
    } = answers;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
        if buf.starts_with(PREFACE) {
            buf.drain(..PREFACE.len());
            return serve_h2(stream, buf, terminating, h2_reset_code).await;
        }
        if PREFACE.starts_with(&buf) {
            continue;
        }
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let ready_probe = buf.starts_with(b"GET /health/ready ");
            let probe = buf.starts_with(b"GET /health/");
            let client_closes = buf[..end]
                .windows(17)
                .any(|w| w.eq_ignore_ascii_case(b"connection: close"));
            buf.drain(..end + 4);
            if !ready_probe && !request_time.is_zero() {
                tokio::time::sleep(request_time).await;
            }
            let close = draining.load(Ordering::SeqCst) || client_closes;
            let status = if !terminating.load(Ordering::SeqCst) {
                "200 OK".to_owned()
            } else if ready_probe {
                "503 Service Unavailable".to_owned()
            } else if !probe && status_after_term != 200 {
                format!("{status_after_term} Shutting Down")
            } else {
                "200 OK".to_owned()
            };
            let connection = if close { "Connection: close\r\n" } else { "" };
            let response = format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n{connection}\r\nok");
            stream.write_all(response.as_bytes()).await?;
            if close {
                stream.shutdown().await?;
                // Wait for the client's close, so the server is not the one left in TIME_WAIT
                // with unread data.
                let _ = stream.read(&mut chunk).await;
                return Ok(());
            }
        }
    }
}

/// An HTTP/2 frame: its header (length, type, flags, stream) and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(0).to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Serves an HTTP/2 connection (after its preface, `buf` holding what followed): just enough
/// for tests (see the module documentation). HPACK is not decoded: a HEADERS frame is a request.
async fn serve_h2(
    mut stream: TcpStream,
    mut buf: Vec<u8>,
    terminating: &AtomicBool,
    reset_code: u32,
) -> std::io::Result<()> {
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    // Each frame its own segment, as the agent reads only frames that start one.
    stream.set_nodelay(true)?;
    stream.write_all(&h2_frame(SETTINGS, 0, 0, &[])).await?;
    let (mut last_stream, mut goaway_sent) = (0u32, false);
    let mut chunk = [0u8; 1024];
    loop {
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            buf.drain(..9 + len);
            match kind {
                HEADERS if terminating.load(Ordering::SeqCst) => {
                    let frame = h2_frame(RST_STREAM, 0, id, &reset_code.to_be_bytes());
                    stream.write_all(&frame).await?;
                }
                HEADERS => {
                    last_stream = id;
                    // `:status: 200` (HPACK static table index 8); END_HEADERS | END_STREAM.
                    stream
                        .write_all(&h2_frame(HEADERS, 0x5, id, &[0x88]))
                        .await?;
                }
                SETTINGS if flags & 1 == 0 => {
                    stream.write_all(&h2_frame(SETTINGS, 1, 0, &[])).await?;
                }
                _ => {}
            }
        }
        if terminating.load(Ordering::SeqCst) && !goaway_sent {
            goaway_sent = true;
            let mut payload = last_stream.to_be_bytes().to_vec();
            payload.extend_from_slice(&0u32.to_be_bytes());
            stream.write_all(&h2_frame(GOAWAY, 0, 0, &payload)).await?;
        }
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut chunk)).await {
            Err(_) => {}
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(err)) => return Err(err),
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
    }
}

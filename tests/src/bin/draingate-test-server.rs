//! The project's test server: a small HTTP/1.1 keep-alive server whose shutdown behaviour is a
//! flag, so that tests (and later `draingate rehearse`) can produce clean and dirty drains on
//! purpose.
//!
//! Every request gets `200 ok`. After SIGTERM:
//! - `graceful`: stop accepting, answer each connection's next request with `Connection: close`
//!   and close it, exit once every connection is closed;
//! - `abrupt`: exit at once, leaving the kernel to close (or reset) the connections;
//! - `ignore`: keep serving; only SIGKILL ends it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use clap::{Parser, ValueEnum};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Graceful,
    Abrupt,
    Ignore,
}

/// HTTP/1.1 keep-alive test server with a chosen shutdown behaviour.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// What to do on SIGTERM.
    #[arg(long, value_enum, default_value_t = Mode::Graceful)]
    mode: Mode,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    let mut term = signal(SignalKind::terminate())?;
    let draining = Arc::new(AtomicBool::new(false));
    let open = Arc::new(AtomicUsize::new(0));
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    println!("listening on {}", args.listen);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                open.fetch_add(1, Ordering::SeqCst);
                let draining = Arc::clone(&draining);
                let open = Arc::clone(&open);
                let closed = closed_tx.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &draining).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                    let _ = closed.send(());
                });
            }
            _ = term.recv() => match args.mode {
                Mode::Abrupt => std::process::exit(0),
                Mode::Ignore => {}
                Mode::Graceful => break,
            },
        }
    }
    drop(listener);
    draining.store(true, Ordering::SeqCst);
    while open.load(Ordering::SeqCst) > 0 {
        closed_rx.recv().await;
    }
    Ok(())
}

/// Serves requests on one connection until the client closes it, or until draining (the
/// response to the next request then says `Connection: close`).
async fn serve(mut stream: TcpStream, draining: &AtomicBool) -> std::io::Result<()> {
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
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            let close = draining.load(Ordering::SeqCst);
            let response: &[u8] = if close {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            };
            stream.write_all(response).await?;
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

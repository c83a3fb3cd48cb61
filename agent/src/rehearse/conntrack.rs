//! Which pod a client connection went to. The Service's DNAT happens in the node namespace, and
//! the kernel's connection tracking announces every new connection with its translation. The
//! table itself is no record: a connection refused at its SYN is deleted from it at once. So the
//! event stream (`conntrack -E -e NEW`, conntrack-tools) is read as it happens, into a map from
//! the client's port to the backend, which is bounded by the 64k ports. The load generator takes
//! its source ports in turn over the whole range, so a port's latest announcement stays its last
//! connection's until the cycle comes round again.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::io::AsyncBufReadExt as _;

use super::node::NodeError;

/// One tracked connection: the client's original tuple and the address it was translated to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    pub client: Ipv4Addr,
    pub client_port: u16,
    pub service: Ipv4Addr,
    pub backend: Ipv4Addr,
}

/// Parses a TCP entry as conntrack prints it, in a table (`ipv4 2 tcp 6 …`) or as an event
/// (`[NEW] tcp 6 …`): the first `src= dst= sport=` are the original direction, the second
/// `src=` the reply's source, which is the backend after DNAT.
#[must_use]
pub fn parse_line(line: &str) -> Option<Translation> {
    let mut fields = line.split_whitespace();
    fields.by_ref().find(|f| *f == "tcp")?;
    let (mut src, mut dst, mut sport, mut reply_src) = (None, None, None, None);
    for field in fields {
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        match key {
            "src" if src.is_none() => src = value.parse().ok(),
            "src" if reply_src.is_none() => reply_src = value.parse().ok(),
            "dst" if dst.is_none() => dst = value.parse().ok(),
            "sport" if sport.is_none() => sport = value.parse().ok(),
            _ => {}
        }
    }
    Some(Translation {
        client: src?,
        client_port: sport?,
        service: dst?,
        backend: reply_src?,
    })
}

/// The backends of the client's connections to one Service, as conntrack announces them.
#[derive(Debug)]
pub struct ConntrackWatcher {
    backends: Arc<Mutex<HashMap<u16, Ipv4Addr>>>,
    /// Times the kernel dropped events because the reader was too slow.
    pub overruns: Arc<std::sync::atomic::AtomicU64>,
    _child: tokio::process::Child,
}

impl ConntrackWatcher {
    /// Starts watching new connections from `client` to `service` in namespace `netns`.
    pub async fn start(
        netns: &str,
        client: Ipv4Addr,
        service: Ipv4Addr,
    ) -> Result<Self, NodeError> {
        let mut command = tokio::process::Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                netns,
                "conntrack",
                "-E",
                "-e",
                "NEW",
                "-p",
                "tcp",
            ])
            .args([
                "--orig-src",
                &client.to_string(),
                "--orig-dst",
                &service.to_string(),
            ])
            // 8 MiB of socket buffer: bursts of thousands of new connections a second.
            .args(["-b", "8388608"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: only prctl(2) between fork and exec.
        unsafe {
            command.pre_exec(super::node::die_with_parent);
        }
        let mut child = command.spawn().map_err(|source| NodeError::Spawn {
            program: "conntrack".into(),
            source,
        })?;
        let backends = Arc::new(Mutex::new(HashMap::new()));
        let overruns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        {
            let backends = Arc::clone(&backends);
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(t) = parse_line(&line) {
                        backends
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(t.client_port, t.backend);
                    }
                }
            });
        }
        {
            let overruns = Arc::clone(&overruns);
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("ENOBUFS") {
                        overruns.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::debug!(%line, "conntrack");
                }
            });
        }
        // conntrack subscribes as it starts: give it that moment before the first connection.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NodeError::Command {
                command: "conntrack -E".into(),
                stderr: format!("exited at once ({status})"),
            });
        }
        Ok(Self {
            backends,
            overruns,
            _child: child,
        })
    }

    /// The backend the connection from `client_port` was sent to, if announced.
    #[must_use]
    pub fn backend(&self, client_port: u16) -> Option<Ipv4Addr> {
        self.backends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&client_port)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table_lines_and_events() {
        let established = "ipv4     2 tcp      6 117 TIME_WAIT src=198.18.4.2 dst=198.18.4.5 \
            sport=40312 dport=80 src=198.18.4.10 dst=198.18.4.2 sport=8080 dport=40312 [ASSURED] \
            mark=0 zone=0 use=2";
        assert_eq!(
            parse_line(established),
            Some(Translation {
                client: "198.18.4.2".parse().unwrap(),
                client_port: 40312,
                service: "198.18.4.5".parse().unwrap(),
                backend: "198.18.4.10".parse().unwrap(),
            })
        );
        let event = "    [NEW] tcp      6 120 SYN_SENT src=198.18.4.2 dst=198.18.4.5 sport=1025 \
            dport=80 [UNREPLIED] src=198.18.4.14 dst=198.18.4.2 sport=8080 dport=1025";
        assert_eq!(
            parse_line(event).map(|t| (t.client_port, t.backend)),
            Some((1025, "198.18.4.14".parse().unwrap()))
        );
        assert_eq!(parse_line("ipv4 2 udp 17 29 src=1.2.3.4 dst=1.2.3.5"), None);
        assert_eq!(parse_line("garbage"), None);
        assert_eq!(parse_line("[NEW] tcp 6 120 SYN_SENT src=1.2.3.4"), None);
    }
}

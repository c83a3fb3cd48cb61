//! Which pod a client's connect to a Service virtual IP went to. kube-proxy (and a rehearsal's
//! node) translates a Service address to one backend pod with DNAT in the node's network
//! namespace, and the kernel's connection tracking keeps the translation. A connect that got no
//! answer leaves its entry there (an unanswered SYN's lives 120 s, refreshed by each
//! retransmit), so right when the client's socket gives up, one ctnetlink GET of its original
//! tuple names the backend. Only failures are looked up: one request per failed connect, never
//! per connection. A refused connect is not looked up: its entry is gone at once, and the pod
//! that refused counts it itself.
//!
//! Where the Service is translated in the client's own socket (Cilium's socket-level load
//! balancing, kube-proxy replacements), the socket already names the backend and nothing needs
//! looking up.

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_NETFILTER};

/// How long one lookup waits for the kernel's answer; it answers at once, so this only bounds a
/// kernel that never does.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(200);
/// A conntrack entry's message is a few hundred bytes.
const ANSWER_BUFFER: usize = 8192;

/// A connection tracking socket in the node's network namespace.
#[derive(Debug)]
pub struct ServiceLookup {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

/// What conntrack says about one failed connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// The client connected to a Service address, translated to this backend.
    Backend(SocketAddr),
    /// Tracked but not translated: the client connected to the backend itself.
    Direct,
    /// Not tracked (no entry: never seen by this namespace's netfilter, or gone).
    Unknown,
}

impl ServiceLookup {
    /// A socket in the calling thread's network namespace (the agent's own, `hostNetwork` in
    /// Kubernetes). Needs `CAP_NET_ADMIN`, which the DaemonSet grants for its TC programs.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&NetlinkAddr::new(0, 0))?;
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, ANSWER_TIMEOUT.as_micros() as i64),
        )?;
        Ok(Self {
            socket,
            sequence: 0,
            buffer: vec![0; ANSWER_BUFFER],
        })
    }

    /// A socket in the network namespace behind `path` (a rehearsal's simulated node). A
    /// netlink socket stays in the namespace it was made in, so only its creation enters it.
    pub fn open_in(path: &Path) -> io::Result<Self> {
        let netns = File::open(path)?;
        crate::netns::run_in(&netns, Self::open)?
    }

    /// Where the connect from `client` to `server` (TCP, the client socket's view) was
    /// translated to.
    pub fn translation(
        &mut self,
        client: SocketAddr,
        server: SocketAddr,
    ) -> io::Result<Translation> {
        let family = match (client.ip(), server.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => NetfilterProtoFamily::IPv4,
            (IpAddr::V6(_), IpAddr::V6(_)) => NetfilterProtoFamily::IPv6,
            _ => return Ok(Translation::Unknown),
        };
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(family, 0, 0),
                ConntrackMessage::Get(vec![ConntrackAttribute::CtaTupleOrig(vec![
                    Tuple::Ip(vec![
                        IPTuple::SourceAddress(client.ip()),
                        IPTuple::DestinationAddress(server.ip()),
                    ]),
                    Tuple::Proto(vec![
                        ProtoTuple::Protocol(Protocol::Tcp),
                        ProtoTuple::SourcePort(client.port()),
                        ProtoTuple::DestinationPort(server.port()),
                    ]),
                ])]),
            )),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        // Answers to earlier requests that timed out may still be queued: skip them.
        loop {
            let size = self.socket.recv(&mut &mut self.buffer[..], 0)?;
            let answer = NetlinkMessage::<NetfilterMessage>::deserialize(&self.buffer[..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if answer.header.sequence_number != self.sequence {
                continue;
            }
            return Ok(match answer.payload {
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
                    ..
                }) => reply_source(&attributes).map_or(Translation::Unknown, |backend| {
                    if backend == server {
                        Translation::Direct
                    } else {
                        Translation::Backend(backend)
                    }
                }),
                NetlinkPayload::Error(error) if error.raw_code() == -libc::ENOENT => {
                    Translation::Unknown
                }
                NetlinkPayload::Error(error) => return Err(error.to_io()),
                _ => Translation::Unknown,
            });
        }
    }
}

/// The reply direction's source: the backend the original destination was translated to.
fn reply_source(attributes: &[ConntrackAttribute]) -> Option<SocketAddr> {
    let reply = attributes.iter().find_map(|a| match a {
        ConntrackAttribute::CtaTupleReply(tuple) => Some(tuple),
        _ => None,
    })?;
    let (mut address, mut port) = (None, None);
    for part in reply {
        match part {
            Tuple::Ip(ips) => {
                address = ips.iter().find_map(|ip| match ip {
                    IPTuple::SourceAddress(a) => Some(*a),
                    _ => None,
                });
            }
            Tuple::Proto(protos) => {
                port = protos.iter().find_map(|p| match p {
                    ProtoTuple::SourcePort(p) => Some(*p),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    Some(SocketAddr::new(address?, port?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(backend: &str, port: u16) -> Vec<ConntrackAttribute> {
        vec![
            ConntrackAttribute::CtaTupleOrig(vec![Tuple::Ip(vec![
                IPTuple::SourceAddress("10.0.0.9".parse().unwrap()),
                IPTuple::DestinationAddress("10.96.0.10".parse().unwrap()),
            ])]),
            ConntrackAttribute::CtaTupleReply(vec![
                Tuple::Ip(vec![
                    IPTuple::SourceAddress(backend.parse().unwrap()),
                    IPTuple::DestinationAddress("10.0.0.9".parse().unwrap()),
                ]),
                Tuple::Proto(vec![
                    ProtoTuple::Protocol(Protocol::Tcp),
                    ProtoTuple::SourcePort(port),
                    ProtoTuple::DestinationPort(40_000),
                ]),
            ]),
        ]
    }

    #[test]
    fn the_backend_is_the_reply_directions_source() {
        assert_eq!(
            reply_source(&reply("10.1.2.3", 8080)),
            Some("10.1.2.3:8080".parse().unwrap())
        );
        assert_eq!(reply_source(&reply("10.1.2.3", 8080)[..1]), None);
    }
}

//! `#[repr(C)]` types shared by the eBPF programs and user space.
//!
//! Every type here crosses the kernel boundary through a map, so its layout is part of the
//! contract between the two sides: fields are ordered to leave no implicit padding, and sizes are
//! checked at compile time.
#![no_std]

/// Most pod slots tracked at once. Kubernetes allows 110 pods per node by default; the rest is
/// room for recently deleted pods, which keep their slot while their termination window lingers.
pub const MAX_SLOTS: u32 = 1024;

/// Most addresses mapped to pods at once (a pod usually has one IPv4 and maybe one IPv6 address).
pub const MAX_ADDRS: u32 = 4 * MAX_SLOTS;

/// Number of TCP states counted: the kernel's `TCP_ESTABLISHED` (1) .. `TCP_NEW_SYN_RECV` (12),
/// rounded up to a power of two so that the index can be masked, which the verifier accepts.
pub const TCP_STATE_COUNT: usize = 16;

/// An IP address as the kernel programs see it: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so
/// one map serves both families and a dual-stack socket's IPv4-mapped address matches its pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AddrKey {
    /// The address in network byte order.
    pub addr: [u8; 16],
}

impl AddrKey {
    /// The key of an IPv4 address given as its four octets.
    #[must_use]
    pub const fn v4(octets: [u8; 4]) -> Self {
        let [a, b, c, d] = octets;
        Self {
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
        }
    }

    /// The key of an IPv6 address given as its sixteen octets.
    #[must_use]
    pub const fn v6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }
}

impl From<core::net::IpAddr> for AddrKey {
    fn from(addr: core::net::IpAddr) -> Self {
        match addr {
            core::net::IpAddr::V4(v4) => Self::v4(v4.octets()),
            core::net::IpAddr::V6(v6) => Self::v6(v6.octets()),
        }
    }
}

impl From<AddrKey> for core::net::IpAddr {
    /// IPv4-mapped addresses come back as IPv4, the family user space gave them in.
    fn from(key: AddrKey) -> Self {
        let v6 = core::net::Ipv6Addr::from(key.addr);
        match v6.to_ipv4_mapped() {
            Some(v4) => Self::V4(v4),
            None => Self::V6(v6),
        }
    }
}

/// Per pod slot, per CPU: how many times a TCP socket whose local address belongs to the pod
/// entered each state (`inet_sock_set_state` tracepoint), indexed by the kernel's TCP state number.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SlotCounters {
    pub state_entered: [u64; TCP_STATE_COUNT],
}

/// Per CPU: events the kernel programs could not account for. Any non-zero field means counts
/// are incomplete, and user space reports it; nothing is lost silently.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LossCounters {
    /// A tracepoint field could not be read (`bpf_probe_read_kernel` failed).
    pub read_errors: u64,
}

/// Kernel TCP state numbers (`include/net/tcp_states.h`), stable kernel ABI.
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
    pub const NEW_SYN_RECV: u32 = 12;
}

const _: () = assert!(size_of::<AddrKey>() == 16);

#[cfg(test)]
mod tests {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::AddrKey;

    #[test]
    fn ipv4_is_stored_mapped_and_comes_back_as_ipv4() {
        let ip = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 7));
        let key = AddrKey::from(ip);
        assert_eq!(
            key.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 7]
        );
        assert_eq!(IpAddr::from(key), ip);
    }

    #[test]
    fn ipv6_round_trips() {
        let ip = IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 9));
        assert_eq!(IpAddr::from(AddrKey::from(ip)), ip);
    }
}
const _: () = assert!(size_of::<SlotCounters>() == 8 * TCP_STATE_COUNT);
const _: () = assert!(size_of::<LossCounters>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` data without padding; every bit pattern is a valid value.
    unsafe impl aya::Pod for super::AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LossCounters {}
}

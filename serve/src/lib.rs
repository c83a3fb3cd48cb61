//! What every draingate server shares, agent and gate alike:
//! - [`limits`]: connection caps and timeouts of every listening face;
//! - [`tls`]: the mutual TLS set between the gate and the agents;
//! - [`telemetry`]: logging set up from the environment, and one-line error chains;
//! - [`ServeError`]: why a face could not serve.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

pub mod limits;
pub mod telemetry;
pub mod tls;

/// Why a listening face could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {what}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another process serves {} (another draingate agent?): stop it, or give this agent \
         its own --socket",
        path.display()
    )]
    SocketInUse { path: PathBuf },
    #[error("{} is not a socket; refusing to replace it (give --socket another path)", path.display())]
    NotASocket { path: PathBuf },
    #[error("gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service failed")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// A listening address as a flag gives it: `IP:PORT`, `[IPv6]:PORT`, or a bare IPv6 address
/// and a port after its last colon (`fd00::5:9560`), which is what a manifest's
/// `$(NODE_IP):9560` becomes on an IPv6 node.
///
/// # Errors
/// A message naming the expected form when `text` is none of these.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    text.rsplit_once(':')
        .and_then(|(ip, port)| {
            Some(SocketAddr::new(
                ip.parse::<IpAddr>().ok()?,
                port.parse().ok()?,
            ))
        })
        .ok_or_else(|| format!("{text:?} is not IP:PORT (for IPv6: [IP]:PORT)"))
}

#[cfg(test)]
mod tests {
    use super::parse_listen_addr;

    #[test]
    fn listen_addresses_take_every_form_a_manifest_can_give() {
        let ok = |text: &str| parse_listen_addr(text).unwrap().to_string();
        assert_eq!(ok("0.0.0.0:9560"), "0.0.0.0:9560");
        assert_eq!(ok("10.0.0.5:9560"), "10.0.0.5:9560");
        assert_eq!(ok("[fd00::5]:9560"), "[fd00::5]:9560");
        // `$(NODE_IP):9560` on an IPv6 node.
        assert_eq!(ok("fd00::5:9560"), "[fd00::5]:9560");
        for bad in [
            "",
            "9560",
            "10.0.0.5",
            "node-a:9560",
            "10.0.0.5:65536",
            ":9560",
            "$(NODE_IP):9560",
        ] {
            let err = parse_listen_addr(bad).unwrap_err();
            assert!(err.contains("IP:PORT"), "{bad}: {err}");
        }
    }
}

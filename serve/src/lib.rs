//! What every draingate server shares, agent and gate alike:
//! - [`limits`]: connection caps and timeouts of every listening face;
//! - [`tls`]: the mutual TLS set between the gate and the agents;
//! - [`telemetry`]: logging set up from the environment, and one-line error chains;
//! - [`ServeError`]: why a face could not serve.

use std::path::PathBuf;

pub mod limits;
pub mod telemetry;
pub mod tls;

/// Why a listening face could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {what}: {source}")]
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
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

//! draingate: proves that a rolling update lost no request.
//!
//! The library holds everything; `main.rs` only parses the command line. Modules:
//! - [`tracefs`]: tracepoint record layouts of the running kernel;
//! - [`btf`]: kernel struct member offsets from the running kernel's BTF;
//! - [`loader`]: loads and attaches the eBPF programs, typed access to their maps;
//! - [`rehearse`]: a whole rolling update on one machine, the agent held against the clients;
//!
//! The gate, the linter and what every server shares are crates of their own
//! (`draingate-gate`, `draingate-lint`, `draingate-serve`), re-exported here under their
//! module names; they build on stable Rust without the eBPF toolchain.

pub mod agent;
pub mod api;
pub mod btf;
pub mod cli;
pub mod drain;
pub mod events;
pub mod http;
pub mod inventory;
pub mod loader;
pub mod netns;
pub mod peers;
pub mod rehearse;
pub mod services;
pub mod tracefs;

pub use draingate_gate as gate;
pub use draingate_lint as lint;
pub use draingate_serve::{limits, parse_listen_addr, telemetry, tls};

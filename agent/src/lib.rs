//! draingate: proves that a rolling update lost no request.
//!
//! The library holds everything; `main.rs` only parses the command line. Modules:
//! - [`tracefs`]: tracepoint record layouts of the running kernel;
//! - [`btf`]: kernel struct member offsets from the running kernel's BTF;
//! - [`loader`]: loads and attaches the eBPF programs, typed access to their maps;
//! - [`rehearse`]: a whole rolling update on one machine, the agent held against the clients;
//! - [`limits`]: connection caps and timeouts of every listening face;
//! - [`telemetry`]: logging set up from the environment.

pub mod agent;
pub mod api;
pub mod btf;
pub mod cli;
pub mod drain;
pub mod events;
pub mod gate;
pub mod http;
pub mod inventory;
pub mod limits;
pub mod lint;
pub mod loader;
pub mod netns;
pub mod peers;
pub mod rehearse;
pub mod services;
pub mod telemetry;
pub mod tls;
pub mod tracefs;

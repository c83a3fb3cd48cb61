//! draingate's gRPC APIs. The code under `gen/` is generated from `draingate/v1/*.proto` and
//! committed; `tests/bootstrap.rs` regenerates it and fails when it is stale.

/// `draingate.v1`: the node agent's and the gate's services and messages.
pub mod v1 {
    #![allow(
        clippy::all,
        clippy::pedantic,
        clippy::allow_attributes_without_reason,
        unreachable_pub,
        missing_debug_implementations,
        unused_qualifications,
        reason = "generated code"
    )]
    include!("gen/draingate.v1.rs");

    /// Encoded `FileDescriptorSet` of the APIs and their imports, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/draingate_v1_descriptor.bin");
}

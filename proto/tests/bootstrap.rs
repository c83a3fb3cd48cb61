//! The generated code under `src/gen/` is committed, so builds need no protoc and no code
//! generation. This test regenerates it from the `.proto` files (with protox, no system protoc)
//! and fails when the committed code differs, after writing the fresh code in place so that the
//! fix is to review and commit it.

use std::{fs, path::Path};

use prost::Message as _;

const PROTOS: [&str; 2] = ["draingate/v1/agent.proto", "draingate/v1/gate.proto"];
const DESCRIPTOR_SET: &str = "draingate_v1_descriptor.bin";

#[test]
fn generated_code_is_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let committed = root.join("src/gen");
    let fresh = tempfile::tempdir().expect("temporary directory");

    let descriptors = protox::compile(PROTOS, [root]).expect("the .proto files compile");
    fs::write(
        fresh.path().join(DESCRIPTOR_SET),
        descriptors.encode_to_vec(),
    )
    .expect("write descriptor set");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(fresh.path())
        .compile_fds(descriptors)
        .expect("code generation");

    let mut stale = Vec::new();
    for entry in fs::read_dir(fresh.path()).expect("read generated directory") {
        let entry = entry.expect("directory entry");
        let name = entry.file_name();
        let generated = fs::read(entry.path()).expect("read generated file");
        let target = committed.join(&name);
        if fs::read(&target).ok().as_deref() != Some(generated.as_slice()) {
            fs::write(&target, &generated).expect("update committed file");
            stale.push(name.to_string_lossy().into_owned());
        }
    }
    assert!(
        stale.is_empty(),
        "generated code under proto/src/gen was stale and has been rewritten: {stale:?}; \
         review and commit it"
    );
}

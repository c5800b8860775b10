//! Compiles the .proto files with protox (pure Rust), so building needs no system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");

    let agent_fds = protox::compile(
        [
            "tailbox/agent/v1/agent.proto",
            "tailbox/agent/v1/sidecar.proto",
            "tailbox/agent/v1/fleet.proto",
        ],
        ["proto"],
    )?;
    let agent_descriptor_path = out_dir.join("tailbox_agent_v1_descriptor.bin");
    std::fs::write(
        &agent_descriptor_path,
        prost::Message::encode_to_vec(&agent_fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // pbjson supplies the canonical proto3 JSON mapping for the WKTs used in reports.
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(agent_fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&agent_descriptor_path)?)?
        .preserve_proto_field_names()
        // Tools get every key, even when it holds the default (uid 0, ok=false, …).
        .emit_fields()
        .build(&[".tailbox.agent.v1"])?;

    // Our subset of Modal's contract. Client for the controller, server for the fake in testkit;
    // default stubs make every RPC the fake does not implement answer Unimplemented.
    let modal_fds = protox::compile(
        [
            "modal_proto/api.proto",
            "modal_proto/task_command_router.proto",
        ],
        ["proto"],
    )?;
    std::fs::write(
        out_dir.join("modal_descriptor.bin"),
        prost::Message::encode_to_vec(&modal_fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .compile_fds(modal_fds)?;
    Ok(())
}

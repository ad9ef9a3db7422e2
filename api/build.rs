//! Generates the goim protobuf and gRPC code with a vendored `protoc`, so no
//! system protobuf compiler is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Message bodies stay reference-counted from the wire to the sockets.
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // goim's Logic service has an RPC named Connect, which would clash with
        // the generated `connect` constructor; clients are built from a Channel.
        .build_transport(false)
        .compile_with_config(
            config,
            &[
                "proto/goim/protocol/protocol.proto",
                "proto/goim/comet/comet.proto",
                "proto/goim/logic/logic.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}

//! Compiles the wire protocol with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/konnectivity.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The generated `connect` constructor would clash with the `Connect` RPC.
        .build_transport(false)
        // Zero-copy payloads: DATA bytes are sliced from the HTTP/2 frame buffer.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}

//! Generates the gRPC client of the control plane's edge service from the control plane's
//! `.proto` (one definition, two crates), with the pure-Rust `protox` compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../control-plane/proto";
    let proto = "../control-plane/proto/molt/edge/v1/edge_control.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], [root])?;
    tonic_prost_build::configure().build_client(true).build_server(false).compile_fds(descriptors)?;
    Ok(())
}

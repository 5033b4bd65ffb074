//! Generates the gRPC code for `proto/` with the pure-Rust `protox` compiler, so neither
//! developers nor CI need `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/molt/edge/v1/edge_control.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}

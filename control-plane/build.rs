//! Generates the gRPC code for `proto/` with the pure-Rust `protox` compiler, so neither
//! developers nor CI need `protoc`; and rebuilds the crate when a migration is added.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/molt/edge/v1/edge_control.proto";
    println!("cargo:rerun-if-changed={proto}");
    // `sqlx::migrate!` embeds the migrations when the crate compiles; a new migration
    // file alone would not make it compile again.
    println!("cargo:rerun-if-changed=migrations");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}

//! Compiles the part of etcd's gRPC API the store calls with a pure-Rust
//! protobuf compiler (`protox`), so a plain `cargo build` needs no system
//! `protoc` (the etcd client crates compile theirs with one).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/etcd");
    let fds = protox::compile(["etcd/rpc.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}

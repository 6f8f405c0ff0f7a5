//! Compiles the `.proto` files with `protox` (a pure-Rust protobuf compiler),
//! so building Meshwire never needs a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTOS: &[&str] = &[
        "meshwire/example/v1/echo.proto",
        "meshwire/admin/v1/admin.proto",
        "meshwire/identity/v1/identity.proto",
        "grpc/testing/empty.proto",
        "grpc/testing/messages.proto",
        "grpc/testing/test.proto",
    ];
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

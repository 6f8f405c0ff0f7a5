//! A standalone echo server.
//!
//! Run with `cargo run -p meshwire-examples --bin echo-server -- --listen 127.0.0.1:50051 --name a`.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// Address to serve gRPC (h2c) on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Name reported in every reply (tells instances apart).
    #[arg(long, default_value = "echo")]
    name: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let args = Args::parse();
    let server = meshwire_examples::echo::bind(args.listen, &args.name).await?;
    tracing::info!(addr = %server.addr, name = %args.name, "echo server listening");
    tokio::signal::ctrl_c().await?;
    server.stop().await;
    Ok(())
}

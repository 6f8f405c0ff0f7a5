//! End-to-end test harness: real tonic servers and clients, sidecars either
//! in-process ([`meshwire_sidecar::Sidecar`], all on `127.0.0.1:0`) or as real
//! processes ([`SidecarProcess`]), and helpers that wait on conditions instead
//! of sleeping.
//!
//! By concern: [`bins`] finds the workspace's real binaries, [`process`] is
//! the one harness for child processes, [`sidecar`] and [`control_plane`]
//! start ours, [`peers`] the third-party ones (Envoy, Python grpcio),
//! [`backends`] the apps behind sidecars, [`clients`] what calls them, [`tally`] what a load's calls did,
//! [`xds`] an in-process ADS server, [`wait`] the bounded polling, [`prom`]
//! Prometheus text. Everything but `bins` and `prom` is re-exported at the
//! root, so tests `use meshwire_tests::*`.

#![allow(clippy::print_stderr, missing_docs)]

pub mod backends;
pub mod bins;
pub mod clients;
pub mod control_plane;
pub mod etcd;
pub mod peers;
pub mod process;
pub mod prom;
pub mod sidecar;
pub mod tally;
pub mod wait;
pub mod xds;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Once;

pub use backends::*;
pub use clients::*;
pub use control_plane::*;
pub use meshwire_proto::example::v1::{EchoReply, EchoRequest, StreamRequest};
pub use peers::*;
pub use process::{CommandOut, Process, run_command};
pub use sidecar::*;
pub use tally::{Tally, next_calls};
pub use wait::*;
pub use xds::*;

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

pub fn localhost() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

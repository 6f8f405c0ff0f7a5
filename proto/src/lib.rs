//! Meshwire's protobuf APIs, compiled at build time by `protox` (no system
//! `protoc` needed) into prost messages and tonic clients/servers.
//!
//! - [`example::v1`]: the example `Echo` service used by tests, benches and the demo.
//! - [`admin::v1`]: the control plane's admin API (`MeshAdmin`), spoken by `meshctl`.
//! - [`identity::v1`]: certificate issuance and the trust bundle (`Identity`), spoken by sidecars.
//! - [`grpc_testing`]: the message and service shapes of gRPC's interop test
//!   suite, so third-party stacks (grpcio) can be run through the mesh.

#![allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    missing_debug_implementations
)]

pub mod example {
    pub mod v1 {
        tonic::include_proto!("meshwire.example.v1");
    }
}

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("meshwire.admin.v1");
    }
}

pub mod identity {
    pub mod v1 {
        tonic::include_proto!("meshwire.identity.v1");
    }
}

pub mod grpc_testing {
    tonic::include_proto!("grpc.testing");
}

//! A proxyless gRPC client (grpcio from PyPI, channel target
//! `xds:///<service>`, gRFC A27) resolving a service through the Meshwire
//! control plane (a real process) and reaching the endpoints registered
//! through the admin API.

use std::process::Command;

use meshwire_tests::*;

/// Runs the Python client; returns its JSON summary.
async fn run_client(xds: std::net::SocketAddr, calls: usize) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/xds_client.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(venv_python())
            .arg(script)
            .args(["--xds", &xds.to_string(), "--target", "xds:///echo"])
            .args(["--calls", &calls.to_string(), "--timeout", "5"])
            .output()
            .expect("run python (./scripts/setup-test-deps.sh installs grpcio)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "proxyless client failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("bad output ({e}):\n{stdout}\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_proxyless_client_reaches_the_registered_endpoints() {
    let a = echo("a").await;
    let b = echo("b").await;
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let mut admin = cp.client().await;
    api::create_service(&mut admin, "echo").await;
    api::add_endpoint(&mut admin, "echo", a.addr, 1).await;
    api::add_endpoint(&mut admin, "echo", b.addr, 1).await;

    let summary = run_client(cp.addr, 200).await;
    let servers = summary["servers"].as_object().unwrap();
    assert_eq!(
        summary["errors"].as_array().map(Vec::len),
        Some(0),
        "{summary}"
    );
    assert!(
        servers.get("a").and_then(|v| v.as_u64()).unwrap_or(0) > 0,
        "{summary}"
    );
    assert!(
        servers.get("b").and_then(|v| v.as_u64()).unwrap_or(0) > 0,
        "{summary}"
    );

    // What `meshctl status` shows: grpcio ACKed all four types, refused nothing.
    let status = admin
        .status(meshwire_proto::admin::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let n = status
        .nodes
        .iter()
        .find(|n| n.node_id == "grpc-proxyless-1")
        .unwrap_or_else(|| panic!("grpcio not in status: {:?}", status.nodes));
    assert!(n.user_agent.contains("gRPC"), "{n:?}");
    assert!(n.last_nack.is_none(), "grpcio refused something: {n:?}");
    for t in [
        "Listener",
        "RouteConfiguration",
        "Cluster",
        "ClusterLoadAssignment",
    ] {
        assert!(
            n.acked.keys().any(|k| k.ends_with(&format!(".{t}"))),
            "no {t} ACK: {n:?}"
        );
    }

    // The endpoint set changes through the API: only the remaining endpoint is reached.
    api::remove(&mut admin, "echo", a.addr).await;
    let a_before = a.stats.calls.load(std::sync::atomic::Ordering::Relaxed);
    let b_before = b.stats.calls.load(std::sync::atomic::Ordering::Relaxed);
    let summary = run_client(cp.addr, 50).await;
    assert_eq!(summary["servers"]["b"], 50, "{summary}");
    assert_eq!(
        a.stats.calls.load(std::sync::atomic::Ordering::Relaxed),
        a_before
    );
    assert_eq!(
        b.stats.calls.load(std::sync::atomic::Ordering::Relaxed),
        b_before + 50
    );
}

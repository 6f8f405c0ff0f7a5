//! The `meshwire-sidecar` binary's command line: bad flags, values and config
//! files get precise errors and exit code 2. (Being an integration test of
//! this package also makes `cargo test --workspace` build the binary, which
//! the end-to-end tests in `tests/` run.)

use std::process::Command;

const SIDECAR: &str = env!("CARGO_BIN_EXE_meshwire-sidecar");

/// Runs the binary expecting it to fail; returns (exit code, stderr).
fn fails(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(SIDECAR);
    cmd.args(["--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run sidecar");
    let code = out.status.code().expect("exited");
    assert_ne!(code, 0, "expected failure for {args:?}");
    (code, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_flags_and_config_get_precise_errors() {
    let (code, err) = fails(&["--workers", "0"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--workers"), "{err}");

    let (code, err) = fails(&["--inbound", "not-an-address"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("'not-an-address'") && err.contains("--inbound"),
        "{err}"
    );

    let (_, err) = fails(&["--drain-timeout", "soon"], &[]);
    assert!(
        err.contains("--drain-timeout") && err.contains("e.g. 500ms"),
        "{err}"
    );

    let (_, err) = fails(&["--no-such-flag"], &[]);
    assert!(err.contains("--no-such-flag"), "{err}");

    // The same checks apply to values from the environment.
    let (code, err) = fails(&[], &[("MESHWIRE_WORKERS", "many")]);
    assert_eq!(code, 2);
    assert!(err.contains("'many'") && err.contains("--workers"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mesh.yaml");
    std::fs::write(
        &cfg,
        "services:\n  - name: echo\n    endpoints:\n      - address: 127.0.0.1:1\n        weight: 20000\n",
    )
    .unwrap();
    let (code, err) = fails(&["--static-config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("services[0].endpoints[0].weight"), "{err}");
    assert!(err.contains("mesh.yaml"), "names the file: {err}");

    let (code, err) = fails(&["--static-config", "/nonexistent/mesh.yaml"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/mesh.yaml"), "{err}");

    let (_, err) = fails(&["--log", "meshwire=loud"], &[]);
    assert!(err.contains("--log"), "{err}");
}

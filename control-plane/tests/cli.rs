//! The `meshwire-control-plane` binary's command line and start-up
//! failures: bad flags and environment values exit 2 naming the flag, an
//! unusable data directory or a taken port exit 1 saying so. (Being an
//! integration test of this package also makes `cargo test --workspace`
//! build `meshwire-control-plane` and `meshctl`, which the end-to-end tests
//! in `tests/` run.)

use std::process::{Command, Stdio};

const CP: &str = env!("CARGO_BIN_EXE_meshwire-control-plane");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_and_start_failures_exit_clearly() {
    let run = |args: Vec<String>, envs: Vec<(&'static str, String)>| async move {
        tokio::task::spawn_blocking(move || {
            let out = Command::new(CP)
                .args(&args)
                .env_remove("MESHWIRE_ADMIN_TOKEN")
                .envs(envs)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            (
                out.status.code().expect("exited"),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
        .await
        .unwrap()
    };
    let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_owned();

    let (code, err) = run(s(&["--listen", "not-an-address"]), vec![]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("--listen") && err.contains("not-an-address"),
        "{err}"
    );
    let (code, err) = run(s(&["--data-dir", &dir, "--log", "x=loud"]), vec![]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--log"), "{err}");
    let (code, err) = run(vec![], vec![("MESHWIRE_CP_LISTEN", "nope".into())]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--listen") && err.contains("nope"), "{err}");
    let (code, err) = run(
        s(&["--data-dir", &dir]),
        vec![("MESHWIRE_ADMIN_TOKEN", "short".into())],
    )
    .await;
    assert_eq!(code, 2);
    assert!(
        err.contains("MESHWIRE_ADMIN_TOKEN") && err.contains("16"),
        "{err}"
    );

    // etcd without a key for the CA's sealed roots (and no CA files): refused,
    // naming the flag; a key that is not 32 bytes of hex too.
    let (code, err) = run(
        s(&["--data-dir", &dir, "--etcd", "http://127.0.0.1:1"]),
        vec![],
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("--etcd-encryption-key-file"), "{err}");
    let (code, err) = run(
        s(&["--data-dir", &dir, "--etcd", "http://127.0.0.1:1"]),
        vec![("MESHWIRE_ETCD_ENCRYPTION_KEY", "abcd".into())],
    )
    .await;
    assert_eq!(code, 2);
    assert!(
        err.contains("MESHWIRE_ETCD_ENCRYPTION_KEY") && err.contains("64 hex"),
        "{err}"
    );

    // The data directory is a file.
    let file = data.path().join("file");
    std::fs::write(&file, "").unwrap();
    let (code, err) = run(
        s(&[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            file.to_str().unwrap(),
        ]),
        vec![],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("data directory") && err.contains("file"),
        "{err}"
    );

    // The port is taken.
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = run(s(&["--listen", &addr, "--data-dir", &dir]), vec![]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot listen on") && err.contains(&addr),
        "{err}"
    );
}

//! The demo binary (`meshwire-demo`) run as users run it: a real process
//! with its in-process control plane, sidecars, echo instances and load
//! client, driven with the real `meshctl`.
//! Its sidecars talk mutual TLS with certificates from the control plane's CA.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use meshwire_tests::{EchoRequest, admin_json, poll_until};
use serde_json::Value;

use meshwire_tests::bins::DEMO;
use meshwire_tests::bins::MESHCTL;

/// A demo process and its stdout, one JSON object per line.
struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Its standard input: faults typed as a user would (`kill echo-1`).
    stdin: std::process::ChildStdin,
}

impl Demo {
    fn start(extra: &[&str]) -> Demo {
        let mut child = Command::new(DEMO)
            .args([
                "--format",
                "json",
                "--listen",
                "127.0.0.1:0",
                "--tls-listen",
                "127.0.0.1:0",
                "--outbound",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--concurrency",
                "8",
            ])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the demo");
        let out = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take().expect("piped stdin");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Demo {
            child,
            lines,
            stdin,
        }
    }

    /// Types `line` on its standard input and returns its answer to it.
    fn type_line(&mut self, line: &str) -> Value {
        use std::io::Write;
        writeln!(self.stdin, "{line}").expect("write to the demo's stdin");
        self.stdin.flush().expect("flush");
        loop {
            let v = self.next();
            if v.get("fault").is_some() {
                return v;
            }
        }
    }

    /// The next line (bounded wait), parsed.
    fn next(&self) -> Value {
        let l = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the demo printed nothing for 30 s (or exited)");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
    }

    /// The next per-second report.
    fn tick(&self) -> Value {
        let v = self.next();
        assert!(v.get("t").is_some(), "expected a tick, got {v}");
        v
    }

    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        poll_until("the demo to exit", limit, Duration::from_millis(20), || {
            self.child
                .try_wait()
                .expect("try_wait")
                .ok_or_else(|| "still running".to_owned())
        })
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A sidecar's `/certs` (its admin port).
fn certs(admin: &str) -> Value {
    let admin = admin.parse().expect("admin address");
    runtime().block_on(admin_json(admin, "/certs"))
}

/// One echo call as an app makes it: plaintext HTTP/2 (h2c) to `addr`.
fn h2c_echo(addr: &str) -> Result<String, tonic::Status> {
    runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("uri")
            .origin("http://echo".parse().expect("origin"))
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        let mut client = meshwire_proto::example::v1::echo_client::EchoClient::new(channel);
        let r = client
            .echo(EchoRequest {
                payload: b"hello".to_vec(),
                ..Default::default()
            })
            .await?;
        Ok(r.into_inner().server)
    })
}

/// The root fingerprints `meshctl ca show` reports.
fn ca_roots(server: &str, data_dir: &str) -> (String, Vec<String>) {
    let out = Command::new(MESHCTL)
        .args(["--server", server, "--data-dir", data_dir, "-o", "json"])
        .args(["ca", "show"])
        .output()
        .expect("run meshctl");
    assert!(
        out.status.success(),
        "meshctl ca show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("meshctl JSON");
    let roots = v["roots"]
        .as_array()
        .expect("roots")
        .iter()
        .map(|r| r["fingerprint"].as_str().expect("fingerprint").to_owned())
        .collect();
    (
        v["trust_domain"].as_str().expect("trust_domain").to_owned(),
        roots,
    )
}

fn endpoint<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no endpoint {name} in {v}"))
}

fn calls(ticks: &[Value], name: &str) -> u64 {
    ticks
        .iter()
        .map(|t| endpoint(t, name)["calls"].as_u64().expect("calls"))
        .sum()
}

fn share(ticks: &[Value], name: &str) -> f64 {
    let all: u64 = ["echo-0", "echo-1", "echo-2"]
        .iter()
        .map(|n| calls(ticks, n))
        .sum();
    calls(ticks, name) as f64 / all.max(1) as f64
}

#[test]
fn demo_steers_around_the_slow_instance_and_follows_a_weight_change() {
    let mut demo = Demo::start(&["--duration", "10s", "--instances", "3"]);
    let header = demo.next();
    let server = header["control_plane"].as_str().expect("control_plane");
    let data_dir = header["data_dir"].as_str().expect("data_dir");
    let addr = |name: &str| {
        header["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["address"].as_str())
            .unwrap_or_else(|| panic!("{name} in {header}"))
            .to_owned()
    };
    // Every sidecar holds a certificate from the control plane's CA (as
    // `meshctl` reports the CA), with its service's SPIFFE ID.
    let (td, roots) = ca_roots(server, data_dir);
    assert!(!roots.is_empty(), "the CA has no root");
    assert_eq!(header["trust_domain"], td, "{header}");
    assert!(
        header["control_plane_tls"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://")),
        "{header}"
    );
    let echo_id = format!("spiffe://{td}/ns/default/sa/echo");
    let mut sidecars: Vec<(String, &str, String)> = header["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().expect("name").to_owned(),
                e["admin"].as_str().expect("admin"),
                echo_id.clone(),
            )
        })
        .collect();
    sidecars.push((
        "client".into(),
        header["client_admin"].as_str().expect("client_admin"),
        format!("spiffe://{td}/ns/default/sa/demo-client"),
    ));
    for (name, admin, want) in &sidecars {
        let c = certs(admin);
        assert_eq!(c["ready"], true, "{name}: {c}");
        assert_eq!(c["spiffe_id"], *want, "{name}: {c}");
        let fps = c["trust_bundle"]["fingerprints"]
            .as_array()
            .expect("fingerprints");
        assert!(
            roots.iter().all(|r| fps.iter().any(|f| f == r)),
            "{name} does not trust the CA's roots {roots:?}: {c}"
        );
    }
    assert_eq!(header["client_identity"], sidecars.last().unwrap().2);
    for e in header["endpoints"].as_array().expect("endpoints") {
        assert_eq!(e["identity"], echo_id, "{e}");
    }

    // The hop is mutual TLS: the same plaintext call an app makes works
    // through the client sidecar, but an echo sidecar's inbound refuses it.
    let outbound = header["client_outbound"].as_str().expect("client_outbound");
    let served = h2c_echo(outbound).expect("a call through the client sidecar");
    assert!(served.starts_with("echo-"), "answered by {served:?}");
    for n in ["echo-0", "echo-1", "echo-2"] {
        let r = h2c_echo(&addr(n));
        assert!(r.is_err(), "{n}'s inbound answered a plaintext call: {r:?}");
    }

    let before: Vec<Value> = (0..3).map(|_| demo.tick()).collect();
    // The client sidecar requires every endpoint to present echo's identity.
    for t in &before {
        for n in ["echo-0", "echo-1", "echo-2"] {
            assert_eq!(endpoint(t, n)["identity"], echo_id, "{n}: {t}");
        }
    }

    // The command the demo prints, as a user would run it.
    let new_weight = 8;
    let out = Command::new(MESHCTL)
        .args(["--server", server, "--data-dir", data_dir])
        .args(["endpoint", "weight", "echo", &addr("echo-2")])
        .arg(new_weight.to_string())
        .output()
        .expect("run meshctl");
    assert!(
        out.status.success(),
        "meshctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The tick in which the change lands is part before, part after: skip it.
    let mut waited = 0;
    loop {
        let t = demo.tick();
        waited += 1;
        if endpoint(&t, "echo-2")["weight"] == new_weight {
            let change = &t["last_change"];
            assert!(
                change["what"]
                    .as_str()
                    .is_some_and(|w| w.contains("echo-2 weight 1 → 8")),
                "{change}"
            );
            assert!(change["applied_ms"].is_number(), "not applied: {change}");
            break;
        }
        assert!(waited < 5, "the weight change did not show: {t}");
    }
    let after: Vec<Value> = (0..2).map(|_| demo.tick()).collect();

    let mut summary = demo.next();
    while summary.get("summary").is_none() {
        summary = demo.next();
    }
    let status = demo.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "demo exited with {status}");

    let s = &summary["summary"];
    assert_eq!(s["errors"], 0, "failed calls: {s}");
    let total = |n: &str| endpoint(s, n)["calls"].as_u64().expect("calls");
    for n in ["echo-0", "echo-1", "echo-2"] {
        assert!(total(n) > 0, "{n} got no calls: {s}");
        assert_eq!(endpoint(s, n)["errors"], 0, "{n}: {s}");
    }
    // Before the change all weights are 1: least-request sends the slow
    // instance fewer calls than either fast one.
    assert!(
        calls(&before, "echo-0") < calls(&before, "echo-1")
            && calls(&before, "echo-0") < calls(&before, "echo-2"),
        "slow echo-0 not avoided: {before:?}"
    );
    // After it, echo-2 (weight 8) takes a clearly larger share, and more than
    // twice the calls of echo-1 (weight 1) at the same speed.
    let (b, a) = (share(&before, "echo-2"), share(&after, "echo-2"));
    assert!(
        a > b * 1.3,
        "echo-2's share {b:.2} → {a:.2} after weight 1 → {new_weight}"
    );
    assert!(
        calls(&after, "echo-2") > 2 * calls(&after, "echo-1"),
        "after: {after:?}"
    );
}

#[test]
fn ctrl_c_stops_everything_and_prints_the_summary() {
    let mut demo = Demo::start(&["--instances", "2"]);
    let header = demo.next();
    let server = header["control_plane"]
        .as_str()
        .expect("control_plane")
        .trim_start_matches("http://")
        .to_owned();
    let tls = header["control_plane_tls"]
        .as_str()
        .expect("control_plane_tls")
        .trim_start_matches("https://")
        .to_owned();
    let first = demo.tick();
    assert_eq!(first["load_errors"], 0, "{first}");

    let ok = Command::new("kill")
        .args(["-INT", &demo.child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -INT");
    let mut summary = demo.next();
    while summary.get("summary").is_none() {
        summary = demo.next();
    }
    let status = demo.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "demo exited with {status}");
    assert_eq!(summary["summary"]["errors"], 0, "{summary}");
    assert!(summary["summary"]["calls"].as_u64().expect("calls") > 0);
    // Nothing of it is left listening.
    for addr in [&server, &tls] {
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "the control plane still listens on {addr}"
        );
    }
}

/// The demo's live faults, typed on its stdin: `kill` (the app stops, its
/// port closes), `fail` (NOT_SERVING) and `heal` each take effect within a
/// second or two and the load sees no failed call while the others serve.
#[test]
fn faults_typed_on_stdin_are_routed_around_without_a_failed_call() {
    let mut demo = Demo::start(&["--instances", "3", "--slow-delay-ms", "2"]);
    demo.next();
    demo.tick();
    let bad = demo.type_line("explode echo-1");
    assert_eq!(bad["ok"], false, "{bad}");
    let unknown = demo.type_line("kill echo-9");
    assert!(
        unknown["message"]
            .as_str()
            .is_some_and(|m| m.contains("echo-0, echo-1, echo-2")),
        "{unknown}"
    );
    for (fault, name) in [("kill", "echo-1"), ("fail", "echo-2")] {
        let r = demo.type_line(&format!("{fault} {name}"));
        assert_eq!(r["ok"], true, "{r}");
        // The second that was running may still count calls from before.
        demo.tick();
        let mut quiet = 0;
        for _ in 0..10 {
            let t = demo.tick();
            assert_eq!(t["load_errors"], 0, "after {fault} {name}: {t}");
            if calls(std::slice::from_ref(&t), name) == 0 {
                quiet += 1;
                if quiet == 2 {
                    break;
                }
            }
        }
        assert_eq!(quiet, 2, "{name} kept getting calls after `{fault}`");
        let r = demo.type_line(&format!("heal {name}"));
        assert_eq!(r["ok"], true, "{r}");
        let back = (0..10).any(|_| {
            let t = demo.tick();
            assert_eq!(t["load_errors"], 0, "after heal {name}: {t}");
            calls(std::slice::from_ref(&t), name) > 0
        });
        assert!(back, "{name} took no calls within 10 s of `heal`");
    }
}

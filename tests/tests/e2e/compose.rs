//! `docker-compose.yml` end to end, on a Docker engine with no image
//! registry: the image is built offline (`scripts/docker-offline.sh`, from
//! the binaries this test run built, on a base made with `docker import`),
//! the stack starts without Jaeger (nothing can be pulled): our OTLP sink
//! (`meshwire-otlp-sink`, from `tests/compose/otlp-sink.yml`) answers as
//! `jaeger` instead and shows that a call is one trace across the load
//! client's sidecar and an echo sidecar, every sidecar joins the mesh with
//! the join token and trust bundle the init step wrote (its `/certs` shows
//! its service's SPIFFE ID, and a plaintext call to a sidecar's inbound is
//! refused: the hop is mutual TLS), calls flow through the sidecar
//! containers, a `meshctl` weight change moves the split, and stopping a
//! backend container under load fails no call beyond those in flight.
//! Everything the test creates is removed at the end, also on failure.
//!
//! Skips (with a message) only where no Docker engine answers.

#![allow(clippy::print_stderr)] // the skip message and the logs of a failed run

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use meshwire_tests::bins::{self, Bin};
use meshwire_tests::poll_until;
use serde_json::Value;

/// The image's programs, as this test run built them.
const BINS: [Bin; 7] = [
    bins::SIDECAR,
    bins::CONTROL_PLANE,
    bins::MESHCTL,
    bins::ECHO_SERVER,
    bins::LOAD,
    bins::PROBE,
    bins::OTLP_SINK,
];

/// What the test adds to `docker-compose.yml`: our OTLP sink, in Jaeger's place.
const OVERRIDE: &str = "tests/compose/otlp-sink.yml";

/// The compose services this test does not start (they need a registry;
/// the OTLP sink of [`OVERRIDE`] takes the name `jaeger`).
const NOT_STARTED: [&str; 1] = ["jaeger"];

/// Calls in flight in the load bursts.
const CONCURRENCY: u64 = 4;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn docker_engine() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `docker compose` (v2) if installed, else `docker-compose` (v1).
fn compose_cli() -> Option<Vec<&'static str>> {
    let works = |cmd: &[&str]| {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    [vec!["docker", "compose"], vec!["docker-compose"]]
        .into_iter()
        .find(|c| works(c))
}

fn check(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The stack of one test run; taken down (containers, volumes, network,
/// images) when dropped, whether the test passed or not.
struct Stack {
    compose: Vec<&'static str>,
    project: String,
    image: String,
    base: String,
}

impl Stack {
    fn cmd(&self) -> Command {
        let mut c = Command::new(self.compose[0]);
        c.args(&self.compose[1..])
            .args(["-p", &self.project, "-f"])
            .arg(repo().join("docker-compose.yml"))
            .arg("-f")
            .arg(repo().join(OVERRIDE))
            .env("MESHWIRE_IMAGE", &self.image)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("run compose");
        check(&format!("compose {args:?}"), out)
    }

    /// `meshctl -o json ...` in the control plane's container.
    fn meshctl(&self, args: &[&str]) -> Value {
        let mut all = vec!["exec", "-T", "control-plane", "meshctl", "-o", "json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("meshctl {args:?}: {e}: {out}"))
    }

    /// A load burst from the load client's container (so through its sidecar);
    /// the summary.
    fn burst(&self, secs: u64) -> Value {
        let out = self.run(&[
            "exec",
            "-T",
            "loadgen",
            "meshwire-load",
            "--duration",
            &format!("{secs}s"),
            "--concurrency",
            &CONCURRENCY.to_string(),
            "--format",
            "json",
        ]);
        let last = out.lines().last().unwrap_or_default();
        let v: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {out}"));
        v["summary"].clone()
    }

    /// A sidecar's `/certs`, from inside its container (its admin port
    /// listens on the loopback of the network namespace it shares).
    fn certs(&self, sidecar: &str) -> Value {
        let out = self.run(&[
            "exec",
            "-T",
            sidecar,
            "meshwire-probe",
            "--print",
            "http://127.0.0.1:15000/certs",
        ]);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{sidecar} /certs: {e}: {out}"))
    }

    /// The spans our OTLP sink holds (`GET /spans?{query}`, read inside its
    /// container: it publishes no port).
    fn spans(&self, query: &str) -> Vec<Value> {
        let out = self.run(&[
            "exec",
            "-T",
            "otlp-sink",
            "meshwire-probe",
            "--timeout",
            "5s",
            "--print",
            &format!("http://127.0.0.1:16686/spans?{query}"),
        ]);
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("GET /spans?{query}: {e}: {out}"))
    }

    fn container(&self, service: &str) -> String {
        self.run(&["ps", "-q", service]).trim().to_owned()
    }

    fn inspect(&self, service: &str, format: &str) -> String {
        let id = self.container(service);
        assert!(!id.is_empty(), "no container for {service}");
        let out = Command::new("docker")
            .args(["inspect", "-f", format, &id])
            .output()
            .expect("docker inspect");
        check("docker inspect", out).trim().to_owned()
    }

    fn logs(&self) -> String {
        self.cmd()
            .args(["logs", "--no-color", "--tail", "40"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- compose logs ---\n{}", self.logs());
        }
        let _ = self
            .cmd()
            .args(["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image, &self.base])
            .output();
    }
}

/// The calls in `spans` that are one trace across two services: a root
/// client span from `client`'s sidecar (the load client sends no trace
/// context: its sidecar starts the trace) and the server span of the same
/// call from a `server` sidecar, child of that client span.
fn cross_service_calls<'a>(
    spans: &'a [Value],
    client: &str,
    server: &str,
) -> Vec<(&'a Value, &'a Value)> {
    let of = |service: &str, kind: &str| -> Vec<&'a Value> {
        spans
            .iter()
            .filter(|s| s["service_name"] == service && s["kind"] == kind)
            .collect()
    };
    let servers = of(server, "server");
    of(client, "client")
        .into_iter()
        .filter(|c| c["parent_span_id"] == "")
        .filter_map(|c| {
            servers
                .iter()
                .find(|s| s["trace_id"] == c["trace_id"] && s["parent_span_id"] == c["span_id"])
                .map(|s| (c, *s))
        })
        .collect()
}

fn server<'a>(summary: &'a Value, name: &str) -> Option<&'a Value> {
    summary["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .find(|s| s["name"] == name)
}

fn calls(summary: &Value, name: &str) -> u64 {
    server(summary, name).map_or(0, |s| s["calls"].as_u64().expect("calls"))
}

fn share(summary: &Value, name: &str) -> f64 {
    server(summary, name).map_or(0.0, |s| s["share"].as_f64().expect("share"))
}

/// Polls `cond` every 250 ms until it holds; panics after `limit`.
fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    poll_until(what, limit, Duration::from_millis(250), || {
        if cond() {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
}

#[test]
fn compose_stack_end_to_end() {
    if !docker_engine() {
        eprintln!("SKIPPED compose_stack_end_to_end: no Docker engine answers `docker info`");
        return;
    }
    let compose = compose_cli().expect(
        "a Docker engine is here but neither `docker compose` nor `docker-compose` works: install Docker Compose",
    );

    // The image, from this run's binaries: no release build, no registry.
    let staged = tempfile::tempdir().expect("tempdir");
    for bin in BINS {
        std::fs::copy(bin.path(), staged.path().join(bin.name())).expect("stage binary");
    }
    let id = std::process::id();
    let stack = Stack {
        compose,
        project: format!("mwe2e{id}"),
        image: format!("meshwire-e2e:{id}"),
        base: format!("meshwire-e2e-base:{id}"),
    };
    let out = Command::new(repo().join("scripts/docker-offline.sh"))
        .arg("--bin-dir")
        .arg(staged.path())
        .args(["--tag", &stack.image, "--base-tag", &stack.base])
        .output()
        .expect("run scripts/docker-offline.sh");
    check("scripts/docker-offline.sh", out);

    // Everything but Jaeger; compose starts it in dependency order, waiting
    // for each health check it depends on.
    let services: Vec<String> = stack
        .run(&["config", "--services"])
        .lines()
        .filter(|s| !NOT_STARTED.contains(s))
        .map(str::to_owned)
        .collect();
    let mut up = vec!["up", "-d", "--no-build"];
    up.extend(services.iter().map(String::as_str));
    stack.run(&up);
    for s in &services {
        if s == "mesh-init" {
            eventually("mesh-init finished", Duration::from_secs(120), || {
                stack.inspect(s, "{{.State.Status}} {{.State.ExitCode}}") == "exited 0"
            });
        } else {
            eventually(&format!("{s} healthy"), Duration::from_secs(120), || {
                stack.inspect(s, "{{.State.Health.Status}}") == "healthy"
            });
        }
    }

    // 0. The hop is mutual TLS: every sidecar holds a certificate from the
    //    control plane's CA (as `meshctl ca show` reports it) for its
    //    service, and an echo sidecar's inbound refuses a plaintext call.
    let ca = stack.meshctl(&["ca", "show"]);
    let td = ca["trust_domain"].as_str().expect("trust_domain");
    let roots: Vec<&str> = ca["roots"]
        .as_array()
        .expect("roots")
        .iter()
        .map(|r| r["fingerprint"].as_str().expect("fingerprint"))
        .collect();
    assert!(!roots.is_empty(), "{ca}");
    for (sidecar, service) in [
        ("echo-0-sidecar", "echo"),
        ("echo-1-sidecar", "echo"),
        ("echo-2-sidecar", "echo"),
        ("loadgen-sidecar", "loadgen"),
    ] {
        let c = stack.certs(sidecar);
        assert_eq!(c["ready"], true, "{sidecar}: {c}");
        assert_eq!(
            c["spiffe_id"],
            format!("spiffe://{td}/ns/default/sa/{service}"),
            "{sidecar}: {c}"
        );
        let fps = c["trust_bundle"]["fingerprints"]
            .as_array()
            .expect("fingerprints");
        assert!(
            roots.iter().all(|r| fps.iter().any(|f| f == r)),
            "{sidecar} does not trust the CA's roots {roots:?}: {c}"
        );
    }
    let plain = stack.run(&[
        "exec",
        "-T",
        "loadgen",
        "meshwire-load",
        "--sidecar",
        "echo-0:15006",
        "--duration",
        "1s",
        "--concurrency",
        "1",
        "--format",
        "json",
    ]);
    let plain: Value = serde_json::from_str(plain.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {plain}"));
    let plain = &plain["summary"];
    assert_eq!(
        plain["calls"], 0,
        "echo-0's inbound answered plaintext: {plain}"
    );
    assert!(
        plain["errors"].as_u64().expect("errors") > 0,
        "no plaintext call was made: {plain}"
    );

    // 1. Traces cross services. The load client (50 calls/s in the
    //    background) sends no trace context, so its sidecar starts a trace per
    //    call (sample ratio 1) with a client span; the echo sidecar that
    //    serves it adds a server span, child of that client span, in the same
    //    trace. Both export to `http://jaeger:4317`: our sink. Each echo
    //    sidecar's spans arrive (every registered echo endpoint is named by a
    //    client span whose server span is there).
    let eps = stack.meshctl(&["endpoint", "list", "echo"]);
    let echo_addrs: Vec<String> = eps["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e["address"].as_str().expect("address").to_owned())
        .collect();
    assert_eq!(echo_addrs.len(), 3, "{eps}");
    let (client, server_span) = poll_until(
        "a loadgen → echo trace reaching every echo sidecar",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let spans = stack.spans("limit=2000");
            let pairs = cross_service_calls(&spans, "loadgen", "echo");
            let reached: Vec<&str> = pairs
                .iter()
                .filter_map(|(c, _)| c["attributes"]["meshwire.endpoint"].as_str())
                .collect();
            if !pairs.is_empty() && echo_addrs.iter().all(|a| reached.contains(&a.as_str())) {
                let (c, s) = pairs[pairs.len() - 1];
                return Ok((c.clone(), s.clone()));
            }
            Err(format!(
                "{echo_addrs:?}: {} cross-service calls (endpoints {reached:?}) in {} spans; latest: {:#}",
                pairs.len(),
                spans.len(),
                Value::Array(spans.iter().rev().take(4).cloned().collect())
            ))
        },
    );
    assert_eq!(
        client["name"], server_span["name"],
        "{client} {server_span}"
    );
    assert_eq!(
        client["attributes"]["rpc.service"], server_span["attributes"]["rpc.service"],
        "{client} {server_span}"
    );
    assert_eq!(client["attributes"]["rpc.system"], "grpc", "{client}");
    assert_eq!(client["attributes"]["server.address"], "echo", "{client}");
    assert_eq!(client["attributes"]["rpc.grpc.status_code"], 0, "{client}");
    assert_eq!(
        server_span["attributes"]["rpc.grpc.status_code"], 0,
        "{server_span}"
    );
    // The trace holds exactly those two spans.
    let trace_id = client["trace_id"].as_str().expect("trace_id");
    let trace = stack.spans(&format!("trace_id={trace_id}"));
    let mut ids: Vec<&str> = trace
        .iter()
        .map(|s| s["span_id"].as_str().expect("span_id"))
        .collect();
    ids.sort_unstable();
    let mut want = vec![
        client["span_id"].as_str().expect("span_id"),
        server_span["span_id"].as_str().expect("span_id"),
    ];
    want.sort_unstable();
    assert_eq!(ids, want, "trace {trace_id}: {trace:?}");
    eprintln!(
        "one call, one trace across services: {} {} → {} {}",
        client["service_name"],
        client["span_id"],
        server_span["service_name"],
        server_span["span_id"]
    );

    // 2. Calls flow through the sidecar containers; least-request sends
    //    the slow echo-0 fewer calls than either fast instance.
    let before = stack.burst(3);
    assert_eq!(before["errors"], 0, "{before}");
    for n in ["echo-0", "echo-1", "echo-2"] {
        assert!(calls(&before, n) > 0, "{n} got no calls: {before}");
    }
    assert!(
        calls(&before, "echo-0") < calls(&before, "echo-1")
            && calls(&before, "echo-0") < calls(&before, "echo-2"),
        "the slow instance is not avoided: {before}"
    );

    // 3. A weight change with meshctl moves the split.
    let addr = eps["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["metadata"]["instance"] == "echo-2")
        .and_then(|e| e["address"].as_str())
        .unwrap_or_else(|| panic!("echo-2 not registered: {eps}"))
        .to_owned();
    let changed = stack.meshctl(&["endpoint", "weight", "echo", &addr, "8"]);
    let version = changed["version"].as_u64().expect("version");
    eventually(
        "the load client's sidecar ACKed the change",
        Duration::from_secs(30),
        || {
            let st = stack.meshctl(&["status"]);
            st["nodes"].as_array().is_some_and(|nodes| {
                nodes.iter().any(|n| {
                    n["node_id"] == "loadgen"
                        && n["acked"].as_object().is_some_and(|a| {
                            a.iter().any(|(t, v)| {
                                t.ends_with("ClusterLoadAssignment")
                                    && v.as_str()
                                        .and_then(|v| v.trim_start_matches('v').parse::<u64>().ok())
                                        .is_some_and(|v| v >= version)
                            })
                        })
                })
            })
        },
    );
    let after = stack.burst(3);
    assert_eq!(after["errors"], 0, "{after}");
    assert!(
        share(&after, "echo-2") > 1.3 * share(&before, "echo-2")
            && calls(&after, "echo-2") > 2 * calls(&after, "echo-1"),
        "weight 1 → 8 for echo-2 did not move the split: before {before}, after {after}"
    );

    // 4. Stop a backend container under load: its app drains its sidecar
    //    first, so no call fails beyond those in flight at that moment.
    let mut load = stack
        .cmd()
        .args(["exec", "-T", "loadgen", "meshwire-load", "--duration", "8s"])
        .args([
            "--concurrency",
            &CONCURRENCY.to_string(),
            "--format",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the load");
    let mut lines = BufReader::new(load.stdout.take().expect("stdout")).lines();
    let first = lines
        .next()
        .expect("a report from the load")
        .expect("read the load");
    assert!(first.contains("\"servers\""), "{first}");
    stack.run(&["stop", "echo-1"]);
    let reports: Vec<Value> = lines
        .map_while(Result::ok)
        .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(load.wait().expect("wait").success(), "the load failed");
    let summary = &reports.last().expect("a summary")["summary"];
    let failed = summary["errors"].as_u64().expect("errors");
    assert!(
        failed <= CONCURRENCY,
        "{failed} calls failed, more than the {CONCURRENCY} in flight: {summary}"
    );
    // The last full second: echo-1 is gone, the others answer everything.
    let last = &reports[reports.len() - 2];
    assert_eq!(calls(last, "echo-1"), 0, "{last}");
    assert_eq!(last["errors"], 0, "{last}");
    assert!(calls(last, "echo-0") + calls(last, "echo-2") > 0, "{last}");
    // Its sidecar drained and exited cleanly with it.
    assert_eq!(
        stack.inspect("echo-1-sidecar", "{{.State.Status}} {{.State.ExitCode}}"),
        "exited 0"
    );
    eprintln!("stopping echo-1 under load: {failed} failed calls; summary {summary}");

    // 5. `up -d` brings it back (README): the init step runs again and hands
    //    its sidecar a fresh join token (the first one is used up), so it
    //    gets a new certificate and serves calls again.
    let serial = stack.certs("echo-0-sidecar")["serial"].clone();
    let mut up = vec!["up", "-d", "--no-build"];
    up.extend(services.iter().map(String::as_str));
    stack.run(&up);
    for s in ["echo-1", "echo-1-sidecar"] {
        eventually(
            &format!("{s} healthy again"),
            Duration::from_secs(120),
            || stack.inspect(s, "{{.State.Health.Status}}") == "healthy",
        );
    }
    let c = stack.certs("echo-1-sidecar");
    assert_eq!(
        c["spiffe_id"],
        format!("spiffe://{td}/ns/default/sa/echo"),
        "{c}"
    );
    assert_eq!(
        stack.certs("echo-0-sidecar")["serial"],
        serial,
        "a running sidecar was disturbed"
    );
    eventually(
        "echo-1 answers calls again",
        Duration::from_secs(30),
        || {
            let b = stack.burst(1);
            b["errors"] == 0 && calls(&b, "echo-1") > 0
        },
    );
}

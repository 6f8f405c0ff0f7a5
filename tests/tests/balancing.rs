//! Per-call weighted least-request balancing and the connection layer under
//! it, against real tonic backends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meshwire_examples::echo::EchoOptions;
use meshwire_proto::example::v1::echo_client::EchoClient;
use meshwire_tests::*;
use tonic::transport::Channel;

/// Runs `calls` calls with `conc` callers sharing one client connection and
/// returns how many each backend (by name) answered. Every call must succeed.
async fn run(client: &EchoClient<Channel>, calls: usize, conc: usize) -> HashMap<String, usize> {
    let mut tasks = Vec::new();
    for w in 0..conc {
        let mut c = client.clone();
        let n = calls / conc + usize::from(w < calls % conc);
        tasks.push(tokio::spawn(async move {
            let mut seen = HashMap::new();
            for _ in 0..n {
                let r = c.echo(EchoRequest::default()).await.expect("call succeeds");
                *seen.entry(r.into_inner().server).or_insert(0) += 1;
            }
            seen
        }));
    }
    let mut total = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_insert(0) += v;
        }
    }
    total
}

fn share(counts: &HashMap<String, usize>, name: &str) -> f64 {
    let total: usize = counts.values().sum();
    100.0 * *counts.get(name).unwrap_or(&0) as f64 / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_endpoint_gets_fewer_calls_equal_weights() {
    let opts = |ms| EchoOptions {
        delay: Duration::from_millis(ms),
        ..Default::default()
    };
    let slow = echo_with("slow", opts(20)).await;
    let f1 = echo_with("fast1", opts(2)).await;
    let f2 = echo_with("fast2", opts(2)).await;
    let sc = client_sidecar(vec![cluster(
        "echo",
        &[(slow.addr, 1), (f1.addr, 1), (f2.addr, 1)],
    )])
    .await;
    let client = echo_client(sc.outbound_addr, "echo").await;
    let counts = run(&client, 1600, 16).await;
    let s = share(&counts, "slow");
    // Round robin would give it 33 %; equal in-flight counts about 9 %.
    assert!(s < 20.0, "slow endpoint share {s:.1} %: {counts:?}");
    assert!(
        share(&counts, "fast1") > 35.0 && share(&counts, "fast2") > 35.0,
        "{counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_endpoint_gets_fewer_calls_unequal_weights() {
    let opts = |ms| EchoOptions {
        delay: Duration::from_millis(ms),
        ..Default::default()
    };
    let slow = echo_with("slow", opts(20)).await;
    let f1 = echo_with("fast1", opts(2)).await;
    let f2 = echo_with("fast2", opts(2)).await;
    let sc = client_sidecar(vec![cluster(
        "echo",
        &[(slow.addr, 3), (f1.addr, 1), (f2.addr, 1)],
    )])
    .await;
    let client = echo_client(sc.outbound_addr, "echo").await;
    // Its weight alone would give the slow endpoint 60 %.
    let counts = run(&client, 1600, 16).await;
    let s = share(&counts, "slow");
    assert!(s < 45.0, "slow endpoint share {s:.1} %: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_for_a_connection_count_as_outstanding() {
    // An endpoint whose connects hang: a listener with a full accept queue
    // that never accepts (further SYNs are dropped).
    let hang = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hang.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    hang.listen(0).unwrap();
    let hang_addr = hang.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        // Non-blocking connects fill the accept queue (and SYN backlog).
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&hang_addr.into());
        fillers.push(s);
    }
    let good = echo("good").await;
    let mut c = cluster("echo", &[(hang_addr, 1), (good.addr, 1)]);
    c.connect_timeout = Duration::from_secs(2);
    let sc = client_sidecar(vec![c]).await;
    let client = echo_client(sc.outbound_addr, "echo").await;

    let counts = run(&client, 400, 4).await;
    assert_eq!(
        counts.values().sum::<usize>(),
        400,
        "every call succeeded (failed over)"
    );
    let hung = endpoint_stats(sc.admin_addr, "echo", hang_addr).await;
    // While its connect hangs, the calls waiting on it make it look busy, so
    // P2C sends the rest to the good endpoint. If waiting calls did not
    // count, it would get about half of them.
    let requests = hung["requests"].as_u64().unwrap();
    assert!(
        requests <= 8,
        "the hanging endpoint was picked {requests} times: {hung}"
    );
    assert_eq!(counts["good"], 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_per_endpoint_reused_across_calls() {
    let mesh = Mesh::new(2).await;
    let client = mesh.client().await;
    let counts = run(&client, 2000, 16).await;
    assert_eq!(counts.len(), 2);
    for s in &mesh.servers {
        let ep = endpoint_stats(mesh.client.admin_addr, "echo", s.inbound_addr.unwrap()).await;
        assert_eq!(ep["connections"], 1, "{ep}");
        assert_eq!(ep["connect_attempts"], 1, "{ep}");
        // The inbound side reuses one connection to its app too.
        let app = admin_json(s.admin_addr, "/clusters").await["app"].clone();
        assert_eq!(app["connections"], 1, "{app}");
        assert_eq!(app["connect_attempts"], 1, "{app}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_when_max_concurrent_streams_is_reached() {
    let backend = echo_with(
        "limited",
        EchoOptions {
            max_concurrent_streams: Some(4),
            ..Default::default()
        },
    )
    .await;
    let stats = backend.stats.clone();
    let sc = client_sidecar(vec![cluster("echo", &[(backend.addr, 1)])]).await;
    // A burst on a cold sidecar: the first connection must already respect the
    // backend's limit of 4 streams.
    let client = echo_client(sc.outbound_addr, "echo").await;
    let mut calls = Vec::new();
    for _ in 0..16 {
        let mut c = client.clone();
        calls.push(tokio::spawn(async move {
            c.echo(EchoRequest {
                delay_ms: 1500,
                ..Default::default()
            })
            .await
        }));
    }
    // All 16 run at once, 4 per connection, instead of 12 queueing behind 4.
    eventually(
        "16 calls in flight at the backend",
        Duration::from_secs(10),
        || async { stats.calls.load(Ordering::Relaxed) == 16 },
    )
    .await;
    let ep = endpoint_stats(sc.admin_addr, "echo", backend.addr).await;
    assert_eq!(ep["connections"], 4, "{ep}");
    assert_eq!(ep["outstanding"], 16, "{ep}");
    for c in calls {
        c.await.unwrap().expect("call succeeds");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_connects_fail_over_and_back_off() {
    let dead = dead_addr().await;
    let live = echo("live").await;
    let sc = client_sidecar(vec![cluster("echo", &[(dead, 1), (live.addr, 1)])]).await;
    let client = echo_client(sc.outbound_addr, "echo").await;
    let counts = run(&client, 300, 4).await;
    assert_eq!(counts["live"], 300);
    let d = endpoint_stats(sc.admin_addr, "echo", dead).await;
    assert!(d["connect_errors"].as_u64().unwrap() >= 1, "{d}");
    assert_eq!(d["available"], false, "backing off: {d}");
    // Backoff keeps it from being retried on every call.
    assert!(d["connect_attempts"].as_u64().unwrap() <= 5, "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_that_comes_back_is_reconnected() {
    let keep = echo("keep").await;
    let flaky = echo("flaky").await;
    let flaky_addr = flaky.addr;
    let sc = client_sidecar(vec![cluster("echo", &[(keep.addr, 1), (flaky_addr, 1)])]).await;
    let client = echo_client(sc.outbound_addr, "echo").await;
    let before = run(&client, 200, 4).await;
    assert!(before["flaky"] > 0);

    flaky.abort();
    // With one backend gone, calls keep succeeding on the other.
    let during = run(&client, 200, 4).await;
    assert_eq!(during.values().sum::<usize>(), 200);

    // Same address again: the background reconnect (jittered backoff) finds it.
    let l = tokio::net::TcpListener::bind(flaky_addr)
        .await
        .expect("rebind same port");
    let back = meshwire_examples::echo::serve(l, "flaky-again");
    let stats = back.stats.clone();
    let c = client.clone();
    eventually(
        "calls reach the restarted backend",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            let stats = stats.clone();
            async move {
                for _ in 0..4 {
                    c.echo(EchoRequest::default()).await.expect("call succeeds");
                }
                stats.calls.load(Ordering::Relaxed) > 0
            }
        },
    )
    .await;
    let ep = endpoint_stats(sc.admin_addr, "echo", flaky_addr).await;
    assert_eq!(ep["available"], true, "{ep}");
}

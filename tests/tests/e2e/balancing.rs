//! Per-call weighted least-request balancing and the connection layer under
//! it, against real tonic backends.

use std::collections::HashMap;
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
    const CALLERS: usize = 16;
    // With 2 endpoints P2C compares both on every pick: the hanging endpoint
    // wins only while its waiting calls are fewer than (or tie with) the
    // good endpoint's in-flight calls, and those are at most the other
    // callers: so it can hold at most about half of the callers (a little
    // more when picks race). Were waiting calls not counted, it would look
    // idle and win every pick until all callers hang on it.
    const BOUND: u64 = CALLERS as u64 / 2 + 2;
    // An endpoint whose connects hang: it accepts TCP but never speaks
    // HTTP/2, so the sidecar's handshake waits out the connect timeout.
    let hang = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let good = echo("good").await;
    let good_calls = good.stats.clone();
    let mut c = cluster("echo", &[(hang_addr, 1), (good.addr, 1)]);
    // Longer than the test: every call that picks it waits for the whole test.
    c.connect_timeout = Duration::from_secs(120);
    let sc = client_sidecar(vec![c]).await;
    let client = echo_client(sc.outbound_addr, "echo").await;

    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move {
                loop {
                    c.echo(EchoRequest::default()).await.expect("call succeeds");
                }
            })
        })
        .collect();
    let admin = sc.admin_addr;
    let hung_requests = || async move {
        endpoint_stats(admin, "echo", hang_addr).await["requests"]
            .as_u64()
            .unwrap()
    };
    // Either the good endpoint keeps serving (the callers stuck on the hanging
    // endpoint are bounded) or too many callers got stuck to ever get there
    // (then this times out: all callers hang on the endpoint that never connects).
    eventually(
        "1000 calls served by the good endpoint (or the hanging one picked over its bound)",
        Duration::from_secs(30),
        || async {
            good_calls.calls.load(Ordering::Relaxed) >= 1000 || hung_requests().await > BOUND
        },
    )
    .await;
    let hung = endpoint_stats(admin, "echo", hang_addr).await;
    let requests = hung["requests"].as_u64().unwrap();
    assert!(
        requests <= BOUND,
        "the hanging endpoint was picked {requests} times by {CALLERS} callers (bound {BOUND}): {hung}"
    );
    // All of them are still waiting for the connection (none timed out or
    // failed over), and it was picked at all.
    assert_eq!(hung["outstanding"].as_u64(), Some(requests), "{hung}");
    assert!(requests >= 1, "{hung}");
    assert_eq!(hung["connections"], 0, "{hung}");
    for c in callers {
        c.abort();
    }
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

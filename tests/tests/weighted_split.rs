//! The weighted split, alone in its own test binary (the only one beside
//! `e2e`): it measures a ratio, so it must not share the machine with the
//! load-heavy tests that run beside each other in `e2e`.

use std::collections::HashMap;

use meshwire_proto::example::v1::echo_client::EchoClient;
use meshwire_tests::*;
use tonic::transport::Channel;

/// Runs `calls` calls with `conc` callers sharing one client connection and
/// returns how many each backend (by name) answered. Every call must succeed.
/// Each call is held `delay_ms` by the backend, so that both backends' latency
/// is the same service time rather than however the two in-process servers
/// happen to be scheduled on a busy machine (the balancer rightly steers away
/// from whichever is slower, and this test is about the split at equal latency).
async fn run(
    client: &EchoClient<Channel>,
    calls: usize,
    conc: usize,
    delay_ms: u32,
) -> HashMap<String, usize> {
    let mut tasks = Vec::new();
    for w in 0..conc {
        let mut c = client.clone();
        let n = calls / conc + usize::from(w < calls % conc);
        tasks.push(tokio::spawn(async move {
            let mut seen = HashMap::new();
            for _ in 0..n {
                let req = EchoRequest {
                    delay_ms,
                    ..Default::default()
                };
                let r = c.echo(req).await.expect("call succeeds");
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
async fn weighted_split_follows_weights_at_concurrency_1_and_64() {
    let a = echo("heavy").await;
    let b = echo("light").await;
    let sc = client_sidecar(vec![cluster("echo", &[(a.addr, 3), (b.addr, 1)])]).await;
    let client = echo_client(sc.outbound_addr, "echo").await;
    // At concurrency 1 nothing is ever outstanding, so scheduling noise
    // cannot skew the pick and no service time is needed.
    for (conc, calls, delay_ms) in [(1, 2000, 0), (64, 8000, 20)] {
        let counts = run(&client, calls, conc, delay_ms).await;
        let heavy = share(&counts, "heavy");
        let ratio = heavy / (100.0 - heavy);
        // 3:1 within ±5 %.
        assert!(
            (ratio - 3.0).abs() <= 0.15,
            "concurrency {conc}: heavy {heavy:.1} % (ratio {ratio:.2}), {counts:?}"
        );
    }
}

//! The control plane as a real process (`meshwire-control-plane` on
//! `127.0.0.1:0` with a temporary data directory): the admin API's token,
//! CRUD and validation, `meshctl`'s output and exit codes, restarts, and
//! `kill -9` in the middle of a burst of updates.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use meshwire_proto::admin::v1 as pb;
use meshwire_tests::{ControlPlaneProcess, admin, eventually};
use tonic::Code;

use meshwire_tests::bins::CONTROL_PLANE as CP;
use meshwire_tests::bins::MESHCTL;
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

// === harness ===

use meshwire_tests::CommandOut as Out;

/// Runs `meshctl` in `cwd` with a clean environment (plus `envs`).
async fn meshctl(cwd: &Path, args: &[&str], envs: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(MESHCTL);
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("MESHWIRE_ADMIN_TOKEN")
        .env_remove("MESHWIRE_DATA_DIR")
        .env_remove("MESHCTL_SERVER")
        .envs(envs.iter().copied())
        .stdin(Stdio::null());
    meshwire_tests::run_command(cmd).await
}

/// Asserts a failed meshctl run: its exit code and one line on stderr.
fn failed(out: &Out, code: i32, contains: &str) {
    assert_eq!(out.code, code, "{out:?}");
    assert!(out.stderr.contains(contains), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

fn service(name: &str) -> pb::Service {
    pb::Service {
        name: name.into(),
        ..Default::default()
    }
}

fn create(name: &str) -> pb::CreateServiceRequest {
    pb::CreateServiceRequest {
        service: Some(service(name)),
    }
}

fn add(service: &str, address: &str, weight: Option<u32>) -> pb::AddEndpointRequest {
    pb::AddEndpointRequest {
        service: service.into(),
        endpoint: Some(pb::Endpoint {
            address: address.into(),
            weight,
            ..Default::default()
        }),
    }
}

fn weight(service: &str, address: &str, weight: u32) -> pb::SetEndpointWeightRequest {
    pb::SetEndpointWeightRequest {
        service: service.into(),
        address: address.into(),
        weight,
    }
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

/// An INVALID_ARGUMENT whose message starts with `field: `.
#[track_caller]
fn invalid<T: std::fmt::Debug>(r: Result<T, tonic::Status>, field: &str) -> String {
    let s = r.expect_err("expected INVALID_ARGUMENT");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().starts_with(&format!("{field}: ")),
        "{field}: {:?}",
        s.message()
    );
    s.message().to_owned()
}

#[track_caller]
fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("expected an error").code()
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_wants_its_token_and_xds_does_not() {
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::spawn(data.path()).await;

    // The generated token: random, private.
    let mode = std::fs::metadata(data.path().join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(cp.token.len(), 64);

    for header in [
        None,
        Some("Bearer not-the-token-at-all".to_owned()),
        Some(cp.token.clone()),
        Some(format!("Basic {}", cp.token)),
    ] {
        let mut c = admin(cp.addr, header.as_deref()).await;
        let r = c.list_services(pb::ListServicesRequest {}).await;
        assert_eq!(code(r), Code::Unauthenticated, "{header:?}");
        let r = c.create_service(create("sneaky")).await;
        assert_eq!(code(r), Code::Unauthenticated, "{header:?}");
    }
    let mut c = cp.client().await;
    let r = c.list_services(pb::ListServicesRequest {}).await.unwrap();
    assert!(r.into_inner().services.is_empty(), "nothing was created");

    // xDS on the same port takes no token; the node shows up in Status.
    c.create_service(create("greeter")).await.unwrap();
    let mut ads = AggregatedDiscoveryServiceClient::connect(cp.url())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let node = Node {
        id: "node-1".into(),
        cluster: "web".into(),
        user_agent_name: "e2e".into(),
        ..Default::default()
    };
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("ADS without a token")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("a CDS response")
        .unwrap()
        .expect("stream open");
    assert_eq!(first.resources.len(), 1);
    tx.send(DiscoveryRequest {
        type_url: CDS.into(),
        version_info: first.version_info.clone(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    eventually(
        "Status shows the node's ACK",
        Duration::from_secs(10),
        || {
            let mut c = c.clone();
            let want = first.version_info.clone();
            async move {
                let status = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
                status
                    .nodes
                    .first()
                    .is_some_and(|n| n.acked.get(CDS) == Some(&want))
            }
        },
    )
    .await;
    let status = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    let n = &status.nodes[0];
    assert_eq!(
        (
            n.node_id.as_str(),
            n.service.as_str(),
            n.user_agent.as_str()
        ),
        ("node-1", "web", "e2e")
    );
    assert!(n.connected && n.pushes >= 1 && n.connected_since.is_some());
    assert_eq!(status.version, 1);
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_the_environment_replaces_the_file() {
    let data = tempfile::tempdir().unwrap();
    let token = "from-the-environment-0123456789";
    let cp = ControlPlaneProcess::spawn_with(data.path(), None, &[("MESHWIRE_ADMIN_TOKEN", token)])
        .await;
    assert!(!data.path().join("admin.token").exists());
    let mut c = cp.client().await;
    c.create_service(create("greeter")).await.unwrap();
    let out = meshctl(
        data.path(),
        &["--server", &cp.url(), "service", "list"],
        &[("MESHWIRE_ADMIN_TOKEN", token)],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("greeter"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_endpoints_through_the_api() {
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let mut c = cp.client().await;

    let mut watch = c.watch(pb::WatchRequest {}).await.unwrap().into_inner();
    let current = watch.message().await.unwrap().unwrap();
    assert_eq!(
        (current.version, current.kind()),
        (0, pb::ChangeKind::Current)
    );
    let mut versions = Vec::new();

    // Services.
    let mut s = service("greeter");
    s.lb_policy = pb::LbPolicy::RoundRobin.into();
    s.request_timeout = secs(5);
    let r = c
        .create_service(pb::CreateServiceRequest { service: Some(s) })
        .await
        .unwrap()
        .into_inner();
    versions.push(r.version);
    let got = r.service.unwrap();
    assert_eq!(got.lb_policy(), pb::LbPolicy::RoundRobin);
    assert_eq!(got.connect_timeout, secs(1), "default connect timeout");
    assert_eq!(got.request_timeout, secs(5));
    assert_eq!(got.active_request_bias, None);
    assert_eq!(
        code(c.create_service(create("greeter")).await),
        Code::AlreadyExists
    );
    versions.push(
        c.create_service(create("billing"))
            .await
            .unwrap()
            .into_inner()
            .version,
    );

    let mut s = service("greeter");
    s.lb_policy = pb::LbPolicy::LeastRequest.into();
    s.active_request_bias = Some(1.5);
    s.authority = Some("greeter.internal:50051".into());
    let update = pb::UpdateServiceRequest {
        service: Some(s),
        update_mask: Some(prost_types::FieldMask {
            paths: vec![
                "lb_policy".into(),
                "active_request_bias".into(),
                "authority".into(),
                "request_timeout".into(),
            ],
        }),
    };
    let r = c.update_service(update.clone()).await.unwrap().into_inner();
    versions.push(r.version);
    let got = r.service.unwrap();
    assert_eq!(got.lb_policy(), pb::LbPolicy::LeastRequest);
    assert_eq!(got.active_request_bias, Some(1.5));
    assert_eq!(got.authority.as_deref(), Some("greeter.internal:50051"));
    assert_eq!(got.request_timeout, None, "cleared: in the mask, unset");
    assert_eq!(got.connect_timeout, secs(1), "not in the mask: kept");
    // The same update again changes nothing and commits nothing.
    let again = c.update_service(update.clone()).await.unwrap().into_inner();
    assert_eq!(again.version, r.version);
    let mut missing = update.clone();
    missing.service.as_mut().unwrap().name = "nobody".into();
    assert_eq!(code(c.update_service(missing).await), Code::NotFound);

    let list = c
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["billing", "greeter"]);
    assert_eq!(list.version, r.version);

    // Endpoints.
    let mut ep = pb::Endpoint {
        address: "10.0.0.2:15006".into(),
        weight: Some(3),
        zone: "eu-1a".into(),
        identity: Some("spiffe://mesh.local/ns/default/sa/greeter".into()),
        ..Default::default()
    };
    ep.metadata.insert("version".into(), "v2".into());
    let r = c
        .add_endpoint(pb::AddEndpointRequest {
            service: "greeter".into(),
            endpoint: Some(ep.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    versions.push(r.version);
    let got = r.endpoint.unwrap();
    assert_eq!(got.service, "greeter");
    assert_eq!((got.weight, got.zone.as_str()), (Some(3), "eu-1a"));
    assert_eq!(got.metadata["version"], "v2");
    let r = c
        .add_endpoint(add("greeter", "10.0.0.1:15006", None))
        .await
        .unwrap()
        .into_inner();
    versions.push(r.version);
    assert_eq!(r.endpoint.unwrap().weight, Some(1), "default weight");
    assert_eq!(
        code(
            c.add_endpoint(add("greeter", "10.0.0.1:15006", Some(2)))
                .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.add_endpoint(add("nobody", "10.0.0.1:15006", None)).await),
        Code::NotFound
    );

    let r = c
        .set_endpoint_weight(weight("greeter", "10.0.0.1:15006", 7))
        .await
        .unwrap()
        .into_inner();
    versions.push(r.version);
    assert_eq!(r.endpoint.unwrap().weight, Some(7));
    let same = c
        .set_endpoint_weight(weight("greeter", "10.0.0.1:15006", 7))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.version, r.version, "no change, no new version");
    assert_eq!(
        code(
            c.set_endpoint_weight(weight("greeter", "10.9.9.9:15006", 7))
                .await
        ),
        Code::NotFound
    );
    let drain = |draining| pb::DrainEndpointRequest {
        service: "greeter".into(),
        address: "10.0.0.2:15006".into(),
        draining,
    };
    let r = c.drain_endpoint(drain(None)).await.unwrap().into_inner();
    versions.push(r.version);
    assert!(r.endpoint.unwrap().draining);
    let r = c
        .drain_endpoint(drain(Some(false)))
        .await
        .unwrap()
        .into_inner();
    versions.push(r.version);
    assert!(!r.endpoint.unwrap().draining);

    let eps = c
        .list_endpoints(pb::ListEndpointsRequest {
            service: "greeter".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<_> = eps
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.weight.unwrap()))
        .collect();
    assert_eq!(listed, [("10.0.0.1:15006", 7), ("10.0.0.2:15006", 3)]);
    let got = c
        .get_service(pb::GetServiceRequest {
            name: "greeter".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.service.unwrap().endpoint_count, 2);
    assert_eq!(got.endpoints, eps.endpoints);

    let remove = pb::RemoveEndpointRequest {
        service: "greeter".into(),
        address: "10.0.0.1:15006".into(),
    };
    versions.push(
        c.remove_endpoint(remove.clone())
            .await
            .unwrap()
            .into_inner()
            .version,
    );
    assert_eq!(code(c.remove_endpoint(remove).await), Code::NotFound);

    let r = c
        .delete_service(pb::DeleteServiceRequest {
            name: "greeter".into(),
        })
        .await
        .unwrap()
        .into_inner();
    versions.push(r.version);
    assert_eq!(r.endpoints_removed, 1);
    let gone = c
        .get_service(pb::GetServiceRequest {
            name: "greeter".into(),
        })
        .await;
    assert_eq!(code(gone), Code::NotFound);

    // Every mutation got the next version, and Watch saw each one, in order.
    let expected: Vec<u64> = (1..=versions.len() as u64).collect();
    assert_eq!(versions, expected);
    use pb::ChangeKind as K;
    let kinds = [
        K::ServiceCreated,
        K::ServiceCreated,
        K::ServiceUpdated,
        K::EndpointAdded,
        K::EndpointAdded,
        K::EndpointUpdated,
        K::EndpointUpdated,
        K::EndpointUpdated,
        K::EndpointRemoved,
        K::ServiceDeleted,
    ];
    for (v, kind) in versions.iter().zip(kinds) {
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("watch event")
            .unwrap()
            .unwrap();
        assert_eq!((ev.version, ev.kind()), (*v, kind), "{ev:?}");
    }

    // What xDS serves catches up with the store.
    let last = *versions.last().unwrap();
    eventually("published version", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
            s.version == last && s.published_version == last
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_arguments_name_the_field_and_change_nothing() {
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let mut c = cp.client().await;
    let v = c
        .create_service(create("greeter"))
        .await
        .unwrap()
        .into_inner()
        .version;
    c.add_endpoint(add("greeter", "10.0.0.1:80", None))
        .await
        .unwrap();

    // Services.
    let msg = invalid(c.create_service(create("Bad_Name")).await, "service.name");
    assert!(msg.contains("'B'"), "{msg}");
    invalid(c.create_service(create("")).await, "service.name");
    invalid(
        c.create_service(pb::CreateServiceRequest { service: None })
            .await,
        "service",
    );
    let mut s = service("x");
    s.active_request_bias = Some(11.0);
    invalid(
        c.create_service(pb::CreateServiceRequest { service: Some(s) })
            .await,
        "service.active_request_bias",
    );
    let mut s = service("x");
    s.lb_policy = pb::LbPolicy::RoundRobin.into();
    s.active_request_bias = Some(1.0);
    invalid(
        c.create_service(pb::CreateServiceRequest { service: Some(s) })
            .await,
        "service.active_request_bias",
    );
    let mut s = service("x");
    s.connect_timeout = secs(0);
    invalid(
        c.create_service(pb::CreateServiceRequest { service: Some(s) })
            .await,
        "service.connect_timeout",
    );
    let mut s = service("x");
    s.authority = Some("not a host".into());
    invalid(
        c.create_service(pb::CreateServiceRequest { service: Some(s) })
            .await,
        "service.authority",
    );
    let update = |paths: &[&str], s: pb::Service| pb::UpdateServiceRequest {
        service: Some(s),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    };
    invalid(
        c.update_service(update(&[], service("greeter"))).await,
        "update_mask",
    );
    let msg = invalid(
        c.update_service(update(&["connect_timeout", "colour"], service("greeter")))
            .await,
        "update_mask.paths[1]",
    );
    assert!(msg.contains("\"colour\""), "{msg}");
    let mut s = service("greeter");
    s.connect_timeout = Some(prost_types::Duration {
        seconds: 301,
        nanos: 0,
    });
    invalid(
        c.update_service(update(&["connect_timeout"], s)).await,
        "service.connect_timeout",
    );
    invalid(
        c.delete_service(pb::DeleteServiceRequest {
            name: "UPPER".into(),
        })
        .await,
        "name",
    );

    // Endpoints.
    let msg = invalid(
        c.add_endpoint(add("greeter", "10.0.0.2:80", Some(0))).await,
        "endpoint.weight",
    );
    assert!(msg.contains("between 1 and 10000, got 0"), "{msg}");
    invalid(
        c.add_endpoint(add("greeter", "10.0.0.2:80", Some(10_001)))
            .await,
        "endpoint.weight",
    );
    for bad in [
        "nope",
        "10.0.0.2",
        "10.0.0.2:99999",
        "0.0.0.0:80",
        "10.0.0.2:0",
        "",
    ] {
        invalid(
            c.add_endpoint(add("greeter", bad, None)).await,
            "endpoint.address",
        );
    }
    invalid(
        c.add_endpoint(add("Greeter", "10.0.0.2:80", None)).await,
        "service",
    );
    invalid(
        c.add_endpoint(pb::AddEndpointRequest {
            service: "greeter".into(),
            endpoint: None,
        })
        .await,
        "endpoint",
    );
    let mut e = pb::Endpoint {
        address: "10.0.0.2:80".into(),
        identity: Some(String::new()),
        ..Default::default()
    };
    invalid(
        c.add_endpoint(pb::AddEndpointRequest {
            service: "greeter".into(),
            endpoint: Some(e.clone()),
        })
        .await,
        "endpoint.identity",
    );
    e.identity = None;
    e.metadata.insert(String::new(), "v".into());
    invalid(
        c.add_endpoint(pb::AddEndpointRequest {
            service: "greeter".into(),
            endpoint: Some(e),
        })
        .await,
        "endpoint.metadata",
    );
    let msg = invalid(
        c.set_endpoint_weight(weight("greeter", "10.0.0.1:80", 0))
            .await,
        "weight",
    );
    assert!(msg.contains("got 0"), "{msg}");
    invalid(
        c.set_endpoint_weight(weight("greeter", "10.0.0.1:80", 20_000))
            .await,
        "weight",
    );
    invalid(
        c.set_endpoint_weight(weight("greeter", "10.0.0.1", 2))
            .await,
        "address",
    );
    invalid(
        c.remove_endpoint(pb::RemoveEndpointRequest {
            service: "greeter".into(),
            address: "localhost:80".into(),
        })
        .await,
        "address",
    );

    // None of it changed anything.
    let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.version, v + 1);
    let eps = c
        .list_endpoints(pb::ListEndpointsRequest {
            service: "greeter".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints;
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].weight, Some(1));
    let names: Vec<_> = c
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .services
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["greeter"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_prints_tables_and_json_and_fails_clearly() {
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let url = cp.url();
    let dir = data.path().to_str().unwrap().to_owned();
    let cwd = tempfile::tempdir().unwrap();
    let ctl = |args: &[&str]| {
        let mut all = vec!["--server", url.as_str(), "--data-dir", dir.as_str()];
        all.extend_from_slice(args);
        let all: Vec<String> = all.iter().map(|s| (*s).to_owned()).collect();
        let cwd = cwd.path().to_owned();
        async move {
            let args: Vec<&str> = all.iter().map(String::as_str).collect();
            meshctl(&cwd, &args, &[]).await
        }
    };

    let out = ctl(&["service", "create", "greeter", "--request-timeout", "5s"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "created service greeter (version 1)\n");
    let out = ctl(&[
        "service",
        "create",
        "billing",
        "--lb",
        "round-robin",
        "--authority",
        "billing.internal",
    ])
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = ctl(&[
        "endpoint",
        "add",
        "greeter",
        "10.0.0.1:15006",
        "--weight",
        "3",
        "--zone",
        "eu-1a",
        "--meta",
        "team=core",
        "--meta",
        "v=2",
    ])
    .await;
    assert_eq!(
        out.stdout,
        "added endpoint 10.0.0.1:15006 to greeter (version 3)\n"
    );
    ctl(&["endpoint", "add", "greeter", "10.0.0.2:15006"]).await;
    let out = ctl(&["endpoint", "drain", "greeter", "10.0.0.2:15006"]).await;
    assert_eq!(
        out.stdout,
        "endpoint 10.0.0.2:15006 of greeter: draining (version 5)\n"
    );
    let out = ctl(&["endpoint", "weight", "greeter", "10.0.0.2:15006", "9"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = ctl(&["service", "update", "billing", "--connect-timeout", "2s"]).await;
    assert_eq!(out.stdout, "updated service billing (version 7)\n");

    // Tables: a header, one row per item, columns aligned.
    let out = ctl(&["service", "list"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    let header = lines[0];
    assert!(header.starts_with("NAME"), "{header}");
    let cell = |row: &str, col: &str| -> String {
        let at = header
            .find(col)
            .unwrap_or_else(|| panic!("no {col} in {header}"));
        row[at..].split_whitespace().next().unwrap_or("").to_owned()
    };
    let (billing, greeter) = (lines[1], lines[2]);
    assert_eq!(cell(greeter, "NAME"), "greeter");
    assert_eq!(cell(greeter, "LB"), "least-request");
    assert_eq!(cell(greeter, "REQUEST"), "5s");
    assert_eq!(cell(greeter, "ENDPOINTS"), "2");
    assert_eq!(cell(billing, "LB"), "round-robin");
    assert_eq!(cell(billing, "CONNECT"), "2s");
    assert_eq!(cell(billing, "AUTHORITY"), "billing.internal");
    assert!(
        out.stdout.lines().all(|l| l == l.trim_end()),
        "no trailing spaces"
    );

    let out = ctl(&["endpoint", "list", "greeter"]).await;
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    let header = lines[0];
    let cell = |row: &str, col: &str| -> String {
        let at = header.find(col).unwrap();
        row[at..].split_whitespace().next().unwrap_or("").to_owned()
    };
    assert_eq!(cell(lines[1], "WEIGHT"), "3");
    assert_eq!(cell(lines[1], "ZONE"), "eu-1a");
    assert_eq!(cell(lines[1], "METADATA"), "team=core,v=2");
    assert_eq!(cell(lines[2], "STATE"), "draining");
    assert_eq!(cell(lines[2], "WEIGHT"), "9");

    let out = ctl(&["service", "get", "greeter"]).await;
    assert!(out.stdout.contains("request timeout: 5s"), "{}", out.stdout);
    assert!(out.stdout.contains("10.0.0.2:15006"), "{}", out.stdout);
    let out = ctl(&["status"]).await;
    assert!(out.stdout.starts_with("version 7"), "{}", out.stdout);

    // JSON for scripts.
    let json = |out: &Out| -> serde_json::Value {
        assert_eq!(out.code, 0, "{out:?}");
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
    };
    let v = json(&ctl(&["--output", "json", "service", "list"]).await);
    assert_eq!(v["version"], 7);
    assert_eq!(v["services"][1]["name"], "greeter");
    assert_eq!(v["services"][1]["endpoints"], 2);
    assert_eq!(v["services"][1]["request_timeout"], "5s");
    assert_eq!(v["services"][0]["lb_policy"], "round_robin");
    let v = json(&ctl(&["-o", "json", "endpoint", "list", "greeter"]).await);
    assert_eq!(v["endpoints"][0]["metadata"]["team"], "core");
    assert_eq!(v["endpoints"][1]["draining"], true);
    let v = json(
        &ctl(&[
            "-o",
            "json",
            "endpoint",
            "weight",
            "greeter",
            "10.0.0.1:15006",
            "4",
        ])
        .await,
    );
    assert_eq!(
        (v["version"].as_u64(), v["endpoint"]["weight"].as_u64()),
        (Some(8), Some(4))
    );
    let v = json(&ctl(&["-o", "json", "service", "get", "greeter"]).await);
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 2);
    let v = json(&ctl(&["-o", "json", "status"]).await);
    assert_eq!(v["version"], 8);

    // Errors: one line on stderr, the gRPC code, a non-zero exit.
    let out = ctl(&["endpoint", "weight", "greeter", "10.0.0.1:15006", "0"]).await;
    failed(
        &out,
        1,
        "meshctl: INVALID_ARGUMENT: weight: must be between 1 and 10000, got 0",
    );
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    let out = ctl(&["endpoint", "add", "greeter", "10.0.0.1"]).await;
    failed(&out, 1, "INVALID_ARGUMENT: endpoint.address: \"10.0.0.1\"");
    failed(
        &ctl(&["service", "create", "Bad"]).await,
        1,
        "INVALID_ARGUMENT: service.name",
    );
    failed(
        &ctl(&["service", "get", "nobody"]).await,
        1,
        "NOT_FOUND: service \"nobody\" not found",
    );
    failed(
        &ctl(&["service", "create", "greeter"]).await,
        1,
        "ALREADY_EXISTS",
    );
    failed(
        &ctl(&["service", "update", "greeter"]).await,
        2,
        "nothing to change",
    );
    failed(&ctl(&["service", "frobnicate"]).await, 2, "frobnicate");
    failed(
        &ctl(&["endpoint", "weight", "greeter", "10.0.0.1:15006", "-3"]).await,
        2,
        "-3",
    );
    failed(&ctl(&["--output", "yaml", "status"]).await, 2, "yaml");

    // No token (no --data-dir, nothing in ./meshwire-data): the server says why.
    let out = meshctl(cwd.path(), &["--server", &url, "service", "list"], &[]).await;
    failed(&out, 1, "UNAUTHENTICATED: missing admin token");
    let out = meshctl(
        cwd.path(),
        &["--server", &url, "--token", "wrong-wrong-wrong", "status"],
        &[],
    )
    .await;
    failed(&out, 1, "UNAUTHENTICATED: invalid admin token");
    // The token by flag or environment instead of the data directory.
    let out = meshctl(
        cwd.path(),
        &["--server", &url, "--token", &cp.token, "status"],
        &[],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = meshctl(
        cwd.path(),
        &["status"],
        &[
            ("MESHCTL_SERVER", url.as_str()),
            ("MESHWIRE_DATA_DIR", dir.as_str()),
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = meshctl(
        cwd.path(),
        &["--server", &url, "--data-dir", "/nonexistent", "status"],
        &[],
    )
    .await;
    failed(&out, 2, "/nonexistent/admin.token");

    // Nothing listening.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let out = meshctl(
        cwd.path(),
        &["--server", &dead_url, "--data-dir", &dir, "service", "list"],
        &[],
    )
    .await;
    failed(&out, 3, &format!("cannot connect to {dead_url}"));
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_watch_prints_each_change() {
    use std::io::BufRead;

    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let mut c = cp.client().await;
    c.create_service(create("greeter")).await.unwrap();

    let mut child = Command::new(MESHCTL)
        .args(["--server", &cp.url(), "--output", "json", "watch"])
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("MESHWIRE_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut next = async || -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.recv())
            .await
            .expect("a line from meshctl watch")
            .expect("meshctl watch still running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let first = next().await;
    assert_eq!(
        (first["kind"].as_str(), first["version"].as_u64()),
        (Some("current"), Some(1))
    );
    c.add_endpoint(add("greeter", "10.0.0.1:80", Some(2)))
        .await
        .unwrap();
    let ev = next().await;
    assert_eq!(ev["kind"], "endpoint_added");
    assert_eq!(ev["version"], 2);
    assert_eq!(ev["service"], "greeter");
    assert_eq!(ev["endpoint_state"]["weight"], 2);
    c.delete_service(pb::DeleteServiceRequest {
        name: "greeter".into(),
    })
    .await
    .unwrap();
    let ev = next().await;
    assert_eq!(
        (ev["kind"].as_str(), ev["version"].as_u64()),
        (Some("service_deleted"), Some(3))
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_everything_and_versions_keep_increasing() {
    let data = tempfile::tempdir().unwrap();
    let mut cp = ControlPlaneProcess::spawn(data.path()).await;
    let token = cp.token.clone();
    let mut c = cp.client().await;
    let mut s = service("greeter");
    s.lb_policy = pb::LbPolicy::RoundRobin.into();
    s.request_timeout = secs(3);
    c.create_service(pb::CreateServiceRequest { service: Some(s) })
        .await
        .unwrap();
    c.create_service(create("billing")).await.unwrap();
    for p in 1..=20 {
        c.add_endpoint(add("greeter", &format!("10.0.1.{p}:15006"), Some(p)))
            .await
            .unwrap();
    }
    c.drain_endpoint(pb::DrainEndpointRequest {
        service: "greeter".into(),
        address: "10.0.1.3:15006".into(),
        draining: None,
    })
    .await
    .unwrap();
    c.remove_endpoint(pb::RemoveEndpointRequest {
        service: "greeter".into(),
        address: "10.0.1.20:15006".into(),
    })
    .await
    .unwrap();
    let before_services = c
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    let before = c
        .get_service(pb::GetServiceRequest {
            name: "greeter".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.version, 24);

    // Long-lived streams do not hold up a graceful stop: Watch ends with
    // UNAVAILABLE, ADS streams end, nothing waits for the shutdown timeout.
    let mut watch = c.watch(pb::WatchRequest {}).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().version, 24);
    let (ads_tx, ads_rx) = tokio::sync::mpsc::channel(1);
    ads_tx
        .send(DiscoveryRequest {
            node: Some(Node {
                id: "n".into(),
                ..Default::default()
            }),
            type_url: CDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut ads = AggregatedDiscoveryServiceClient::connect(cp.url())
        .await
        .unwrap()
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(ads_rx))
        .await
        .unwrap()
        .into_inner();
    ads.message().await.unwrap().expect("a CDS response");

    cp.signal("TERM");
    assert_eq!(
        cp.wait_exit(Duration::from_secs(10)).await,
        Some(0),
        "{}",
        cp.log()
    );
    let log = cp.log();
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(!log.contains("shutdown timeout"), "{log}");
    let ended = watch.message().await.expect_err("watch ends with the stop");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    drop((cp, ads, ads_tx));

    let cp = ControlPlaneProcess::spawn(data.path()).await;
    assert_eq!(cp.token, token, "the token is reused");
    let mut c = cp.client().await;
    let after_services = c
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after_services, before_services);
    let after = c
        .get_service(pb::GetServiceRequest {
            name: "greeter".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, before);
    let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((s.version, s.published_version), (24, 24));
    let r = c
        .set_endpoint_weight(weight("greeter", "10.0.1.1:15006", 50))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, 25, "versions go on from where they were");
}

/// What one writer of the burst got acknowledged.
#[derive(Debug, Default)]
struct Acked {
    added: Vec<String>,
    weighted: Vec<String>,
    max_version: u64,
    cut_off: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_a_burst_loses_no_acknowledged_change() {
    let data = tempfile::tempdir().unwrap();
    let mut cp = ControlPlaneProcess::spawn(data.path()).await;
    let c = cp.client().await;
    c.clone().create_service(create("burst")).await.unwrap();

    // Eight concurrent writers, each adding endpoints and re-weighting them.
    let acked_calls = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..8u8 {
        let mut c = c.clone();
        let count = acked_calls.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Acked::default();
            for k in 0..1000u16 {
                let addr = format!("10.{w}.{}.{}:15006", k / 200, k % 200 + 1);
                match c.add_endpoint(add("burst", &addr, Some(1))).await {
                    Ok(r) => acked.max_version = acked.max_version.max(r.into_inner().version),
                    Err(_) => {
                        acked.cut_off = true;
                        break;
                    }
                }
                acked.added.push(addr.clone());
                count.fetch_add(1, Ordering::Relaxed);
                match c.set_endpoint_weight(weight("burst", &addr, 2)).await {
                    Ok(r) => acked.max_version = acked.max_version.max(r.into_inner().version),
                    Err(_) => {
                        acked.cut_off = true;
                        break;
                    }
                }
                acked.weighted.push(addr);
                count.fetch_add(1, Ordering::Relaxed);
            }
            acked
        }));
    }
    eventually("200 acknowledged changes", Duration::from_secs(60), || {
        let n = acked_calls.load(Ordering::Relaxed);
        async move { n >= 200 }
    })
    .await;
    cp.signal("KILL");
    assert_eq!(cp.wait_exit(Duration::from_secs(10)).await, None, "killed");
    let mut results = Vec::new();
    for w in writers {
        results.push(w.await.unwrap());
    }
    assert!(
        results.iter().all(|r| r.cut_off),
        "the kill landed in the middle of the burst"
    );
    drop(cp);

    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let mut c = cp.client().await;
    let stored: BTreeMap<String, u32> = c
        .list_endpoints(pb::ListEndpointsRequest {
            service: "burst".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints
        .into_iter()
        .map(|e| (e.address, e.weight.unwrap()))
        .collect();
    let mut max_acked = 0;
    let mut checked = 0;
    for r in &results {
        for a in &r.added {
            assert!(stored.contains_key(a), "acknowledged add of {a} lost");
            checked += 1;
        }
        for a in &r.weighted {
            assert_eq!(stored.get(a), Some(&2), "acknowledged weight of {a} lost");
            checked += 1;
        }
        max_acked = max_acked.max(r.max_version);
    }
    assert!(checked >= 200, "{checked}");
    let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert!(s.version >= max_acked, "{} < {max_acked}", s.version);
    // Whatever was in flight either happened or not: at most one per writer.
    assert!(stored.len() <= results.iter().map(|r| r.added.len() + 1).sum::<usize>());
    let r = c
        .add_endpoint(add("burst", "10.99.0.1:15006", None))
        .await
        .unwrap()
        .into_inner();
    assert!(r.version > s.version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_control_plane_on_the_same_data_dir_exits_clearly() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_owned();
    // Configured from the environment only; the first one holds the directory.
    let mut first = ControlPlaneProcess::spawn_with(data.path(), None, &[]).await;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(CP)
            .env_remove("MESHWIRE_ADMIN_TOKEN")
            .env("MESHWIRE_CP_LISTEN", "127.0.0.1:0")
            .env("MESHWIRE_DATA_DIR", dir)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("another control plane"), "{err}");
    first.signal("INT");
    assert_eq!(first.wait_exit(Duration::from_secs(10)).await, Some(0));
}

//! One function per command group: build the request(s) from the flags,
//! call the admin API, print the answer.

use meshwire_proto::admin::v1 as pb;
use serde_json::json;
use tonic::Request;

use super::Failure;
use super::args::{
    CaCmd, Cli, Command, CpCmd, EndpointCmd, Lb, LimitPerArg, OnOff, Output, PolicyCmd,
    ProtocolArg, ServiceCmd, ServiceOpts, TokenCmd,
};
use super::client::{Client, connect, req};
use super::output::{
    Printer, ca_json, endpoint_json, policy_json, policy_text, rfc3339, service_json, short_fp,
    timestamp,
};

pub(super) async fn run(cli: Cli) -> Result<(), Failure> {
    let mut client = connect(&cli).await?;
    let out = Printer {
        json: cli.output == Output::Json,
    };
    match &cli.command {
        Command::Service(cmd) => service(&cli, &mut client, &out, cmd).await,
        Command::Endpoint(cmd) => endpoint(&cli, &mut client, &out, cmd).await,
        Command::Token(cmd) => token_cmd(&cli, &mut client, &out, cmd).await,
        Command::Ca(cmd) => ca_cmd(&cli, &mut client, &out, cmd).await,
        Command::Status => {
            let s = client
                .status(req(&cli, pb::StatusRequest {}))
                .await?
                .into_inner();
            out.status(&s);
            Ok(())
        }
        Command::Cp(CpCmd::Status) => {
            let s = client
                .control_plane_status(req(&cli, pb::ControlPlaneStatusRequest {}))
                .await?
                .into_inner();
            out.cp_status(&s);
            Ok(())
        }
        Command::Watch => {
            let mut stream = client
                .watch(Request::new(pb::WatchRequest {}))
                .await?
                .into_inner();
            out.watch_header();
            while let Some(ev) = stream.message().await? {
                if !out.event(&ev) {
                    break; // stdout closed
                }
            }
            Ok(())
        }
    }
}

fn service_msg(name: &str, opts: &ServiceOpts) -> (pb::Service, Vec<String>) {
    let mut s = pb::Service {
        name: name.to_owned(),
        ..Default::default()
    };
    let mut paths = Vec::new();
    if let Some(lb) = opts.lb {
        s.lb_policy = match lb {
            Lb::LeastRequest => pb::LbPolicy::LeastRequest,
            Lb::RoundRobin => pb::LbPolicy::RoundRobin,
            Lb::RingHash => pb::LbPolicy::RingHash,
            Lb::Maglev => pb::LbPolicy::Maglev,
        }
        .into();
        paths.push("lb_policy".to_owned());
    }
    if !opts.hash_policy.is_empty() {
        s.hash_policy = opts.hash_policy.clone();
        paths.push("hash_policy".to_owned());
    }
    if let Some(f) = opts.hash_balance_factor {
        s.hash_balance_factor = Some(f);
        paths.push("hash_balance_factor".to_owned());
    }
    if let Some(b) = opts.bias {
        s.active_request_bias = Some(b);
        paths.push("active_request_bias".to_owned());
    }
    if let Some(t) = opts.connect_timeout {
        s.connect_timeout = prost_types::Duration::try_from(t).ok();
        paths.push("connect_timeout".to_owned());
    }
    if let Some(t) = opts.request_timeout {
        s.request_timeout = prost_types::Duration::try_from(t).ok();
        paths.push("request_timeout".to_owned());
    }
    if let Some(a) = &opts.authority {
        s.authority = Some(a.clone());
        paths.push("authority".to_owned());
    }
    if opts.permissive {
        s.permissive = true;
        paths.push("permissive".to_owned());
    }
    if let Some(p) = opts.protocol {
        s.protocol = match p {
            ProtocolArg::Grpc => pb::Protocol::Grpc,
            ProtocolArg::Http => pb::Protocol::Http,
            ProtocolArg::Tcp => pb::Protocol::Tcp,
        }
        .into();
        paths.push("protocol".to_owned());
    }
    if let Some(z) = opts.zone_aware {
        s.zone_aware = Some(z == OnOff::On);
        paths.push("zone_aware".to_owned());
    }
    if let Some(f) = opts.zone_min_healthy {
        s.zone_min_healthy = Some(f);
        paths.push("zone_min_healthy".to_owned());
    }
    opts.resilience.fill(&mut s, &mut paths);
    let rl = &opts.rate_limit;
    if let Some(rate) = &rl.rate_limit {
        s.rate_limit = Some(pb::RateLimit {
            rate: rate.clone(),
            burst: rl.burst,
            per: match rl.rate_limit_per {
                None | Some(LimitPerArg::Service) => pb::RateLimitPer::Service,
                Some(LimitPerArg::Caller) => pb::RateLimitPer::Caller,
                Some(LimitPerArg::Ip) => pb::RateLimitPer::Ip,
            }
            .into(),
            overrides: rl
                .rate_limit_override
                .iter()
                .map(|(caller, rate)| pb::RateLimitOverride {
                    caller: caller.clone(),
                    rate: rate.clone(),
                    burst: None,
                })
                .collect(),
        });
        paths.push("rate_limit".to_owned());
    }
    (s, paths)
}

async fn service(
    cli: &Cli,
    client: &mut Client,
    out: &Printer,
    cmd: &ServiceCmd,
) -> Result<(), Failure> {
    match cmd {
        ServiceCmd::Create { name, opts } => {
            let (s, _) = service_msg(name, opts);
            let r = client
                .create_service(req(cli, pb::CreateServiceRequest { service: Some(s) }))
                .await?
                .into_inner();
            out.done(
                json!({"version": r.version, "service": r.service.as_ref().map(service_json)}),
                &format!("created service {name}"),
                r.version,
            );
        }
        ServiceCmd::Update {
            name,
            opts,
            no_request_timeout,
            no_authority,
            no_permissive,
            no_rate_limit,
        } => {
            let (s, mut paths) = service_msg(name, opts);
            if *no_rate_limit {
                paths.push("rate_limit".to_owned());
            }
            if *no_permissive {
                paths.push("permissive".to_owned());
            }
            if *no_request_timeout {
                paths.push("request_timeout".to_owned());
            }
            if *no_authority {
                paths.push("authority".to_owned());
            }
            if paths.is_empty() {
                return Err(Failure::Usage(
                    "service update: nothing to change (give --lb, --bias, --connect-timeout, --request-timeout, --authority, --permissive, --protocol, --no-request-timeout, --no-authority, --no-permissive, --rate-limit, --no-rate-limit or a resilience flag such as --max-requests)".into(),
                ));
            }
            let r = client
                .update_service(req(
                    cli,
                    pb::UpdateServiceRequest {
                        service: Some(s),
                        update_mask: Some(prost_types::FieldMask { paths }),
                    },
                ))
                .await?
                .into_inner();
            out.done(
                json!({"version": r.version, "service": r.service.as_ref().map(service_json)}),
                &format!("updated service {name}"),
                r.version,
            );
        }
        ServiceCmd::Delete { name } => {
            let r = client
                .delete_service(req(cli, pb::DeleteServiceRequest { name: name.clone() }))
                .await?
                .into_inner();
            out.done(
                json!({"version": r.version, "endpoints_removed": r.endpoints_removed}),
                &format!(
                    "deleted service {name} and its {} endpoint{}",
                    r.endpoints_removed,
                    if r.endpoints_removed == 1 { "" } else { "s" }
                ),
                r.version,
            );
        }
        ServiceCmd::List => {
            let r = client
                .list_services(req(cli, pb::ListServicesRequest {}))
                .await?
                .into_inner();
            out.services(r.version, &r.services);
        }
        ServiceCmd::Get { name } => {
            let r = client
                .get_service(req(cli, pb::GetServiceRequest { name: name.clone() }))
                .await?
                .into_inner();
            out.service(&r);
        }
        ServiceCmd::Policy(cmd) => policy_cmd(cli, client, out, cmd).await?,
    }
    Ok(())
}

/// Reads a policy file (YAML or JSON; `-` is stdin) into the API's shape.
fn read_policy(path: &std::path::Path) -> Result<pb::Policy, Failure> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Failure::Usage(format!("--file -: {e}")))?;
        s
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("--file {}: {e}", path.display())))?
    };
    // JSON is YAML, so one parser reads both (with line and column on errors).
    let p: meshwire_mesh::policy::Policy = serde_yaml_ng::from_str(&text)
        .map_err(|e| Failure::Usage(format!("--file {}: {e}", path.display())))?;
    Ok(crate::api::policy_pb(&p))
}

async fn policy_cmd(
    cli: &Cli,
    client: &mut Client,
    out: &Printer,
    cmd: &PolicyCmd,
) -> Result<(), Failure> {
    let (name, policy) = match cmd {
        PolicyCmd::Set { name, file } => (name, Some(read_policy(file)?)),
        PolicyCmd::Clear { name } => (name, None),
        PolicyCmd::Get { name } => {
            let r = client
                .get_service(req(cli, pb::GetServiceRequest { name: name.clone() }))
                .await?
                .into_inner();
            let p = r.service.and_then(|s| s.policy);
            if out.json {
                out.print_json(
                    &json!({"version": r.version, "policy": p.as_ref().map(policy_json)}),
                );
            } else {
                out.print(&policy_text(p.as_ref()));
            }
            return Ok(());
        }
    };
    let cleared = policy.is_none();
    let s = pb::Service {
        name: name.clone(),
        policy,
        ..Default::default()
    };
    let r = client
        .update_service(req(
            cli,
            pb::UpdateServiceRequest {
                service: Some(s),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["policy".to_owned()],
                }),
            },
        ))
        .await?
        .into_inner();
    let what = if cleared {
        format!("cleared the policy of {name}")
    } else {
        format!("set the policy of {name}")
    };
    out.done(
        json!({"version": r.version, "service": r.service.as_ref().map(service_json)}),
        &what,
        r.version,
    );
    Ok(())
}

async fn token_cmd(
    cli: &Cli,
    client: &mut Client,
    out: &Printer,
    cmd: &TokenCmd,
) -> Result<(), Failure> {
    let TokenCmd::Create {
        service,
        namespace,
        ttl,
    } = cmd;
    let r = client
        .create_join_token(req(
            cli,
            pb::CreateJoinTokenRequest {
                service: service.clone(),
                namespace: namespace.clone(),
                ttl: prost_types::Duration::try_from(*ttl).ok(),
            },
        ))
        .await?
        .into_inner();
    if out.json {
        out.print_json(&json!({
            "token": r.token,
            "spiffe_id": r.spiffe_id,
            "expires_at": rfc3339(timestamp(r.expires_at.as_ref())),
        }));
    } else {
        // The token alone on stdout, so `$(meshctl token create ...)` works.
        out.print(&format!("{}\n", r.token));
    }
    Ok(())
}

async fn ca_cmd(cli: &Cli, client: &mut Client, out: &Printer, cmd: &CaCmd) -> Result<(), Failure> {
    match cmd {
        CaCmd::Show => {
            let r = client
                .get_ca(req(cli, pb::GetCaRequest {}))
                .await?
                .into_inner();
            out.ca(&r);
        }
        CaCmd::Bundle => {
            let r = client
                .get_ca(req(cli, pb::GetCaRequest {}))
                .await?
                .into_inner();
            if out.json {
                out.print_json(&json!({
                    "trust_domain": r.trust_domain,
                    "fingerprints": r.roots.iter().map(|x| &x.fingerprint).collect::<Vec<_>>(),
                    "trust_bundle_pem": r.trust_bundle_pem,
                }));
            } else {
                out.print(&r.trust_bundle_pem);
            }
        }
        CaCmd::AddRoot => {
            let before = client
                .get_ca(req(cli, pb::GetCaRequest {}))
                .await?
                .into_inner();
            let r = client
                .add_root(req(cli, pb::AddRootRequest {}))
                .await?
                .into_inner();
            let added = r
                .roots
                .iter()
                .find(|x| !before.roots.iter().any(|b| b.fingerprint == x.fingerprint))
                .map(|x| x.fingerprint.clone())
                .unwrap_or_default();
            if out.json {
                let mut v = ca_json(&r);
                v["added"] = json!(added);
                out.print_json(&v);
            } else {
                out.print(&format!(
                    "added root {added} (trusted, not signing yet: once every sidecar has the new bundle, `meshctl ca activate {}`)\n",
                    short_fp(&added)
                ));
            }
        }
        CaCmd::Activate { fingerprint } => {
            let r = client
                .activate_root(req(
                    cli,
                    pb::ActivateRootRequest {
                        fingerprint: fingerprint.clone(),
                    },
                ))
                .await?
                .into_inner();
            let fp = r
                .roots
                .iter()
                .find(|x| x.signing)
                .map(|x| x.fingerprint.clone())
                .unwrap_or_default();
            if out.json {
                out.print_json(&ca_json(&r));
            } else {
                out.print(&format!(
                    "root {fp} now signs new certificates (sidecars renew early; remove the old root once they have)\n"
                ));
            }
        }
        CaCmd::RemoveRoot { fingerprint } => {
            let before = client
                .get_ca(req(cli, pb::GetCaRequest {}))
                .await?
                .into_inner();
            let r = client
                .remove_root(req(
                    cli,
                    pb::RemoveRootRequest {
                        fingerprint: fingerprint.clone(),
                    },
                ))
                .await?
                .into_inner();
            let removed = before
                .roots
                .iter()
                .find(|b| !r.roots.iter().any(|x| x.fingerprint == b.fingerprint))
                .map(|x| x.fingerprint.clone())
                .unwrap_or_default();
            if out.json {
                let mut v = ca_json(&r);
                v["removed"] = json!(removed);
                out.print_json(&v);
            } else {
                out.print(&format!("removed root {removed} from the trust bundle\n"));
            }
        }
    }
    Ok(())
}

async fn endpoint(
    cli: &Cli,
    client: &mut Client,
    out: &Printer,
    cmd: &EndpointCmd,
) -> Result<(), Failure> {
    let done = |r: pb::EndpointResponse, what: String| {
        out.done(
            json!({"version": r.version, "endpoint": r.endpoint.as_ref().map(endpoint_json)}),
            &what,
            r.version,
        );
    };
    match cmd {
        EndpointCmd::Add {
            service,
            address,
            weight,
            zone,
            identity,
            meta,
            draining,
        } => {
            let e = pb::Endpoint {
                address: address.clone(),
                weight: *weight,
                zone: zone.clone().unwrap_or_default(),
                metadata: meta.iter().cloned().collect(),
                identity: identity.clone(),
                draining: *draining,
                ..Default::default()
            };
            let r = client
                .add_endpoint(req(
                    cli,
                    pb::AddEndpointRequest {
                        service: service.clone(),
                        endpoint: Some(e),
                    },
                ))
                .await?
                .into_inner();
            done(r, format!("added endpoint {address} to {service}"));
        }
        EndpointCmd::Remove { service, address } => {
            let r = client
                .remove_endpoint(req(
                    cli,
                    pb::RemoveEndpointRequest {
                        service: service.clone(),
                        address: address.clone(),
                    },
                ))
                .await?
                .into_inner();
            out.done(
                json!({"version": r.version}),
                &format!("removed endpoint {address} from {service}"),
                r.version,
            );
        }
        EndpointCmd::List { service } => {
            let r = client
                .list_endpoints(req(
                    cli,
                    pb::ListEndpointsRequest {
                        service: service.clone(),
                    },
                ))
                .await?
                .into_inner();
            out.endpoints(r.version, &r.endpoints);
        }
        EndpointCmd::Weight {
            service,
            address,
            weight,
        } => {
            let r = client
                .set_endpoint_weight(req(
                    cli,
                    pb::SetEndpointWeightRequest {
                        service: service.clone(),
                        address: address.clone(),
                        weight: *weight,
                    },
                ))
                .await?
                .into_inner();
            done(
                r,
                format!("endpoint {address} of {service}: weight {weight}"),
            );
        }
        EndpointCmd::Drain {
            service,
            address,
            undo,
        } => {
            let r = client
                .drain_endpoint(req(
                    cli,
                    pb::DrainEndpointRequest {
                        service: service.clone(),
                        address: address.clone(),
                        draining: Some(!undo),
                    },
                ))
                .await?
                .into_inner();
            let state = if *undo { "active" } else { "draining" };
            done(r, format!("endpoint {address} of {service}: {state}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::args::parse_cli;
    use super::super::output::hash_summary;
    use super::*;

    #[test]
    fn hash_flags_keep_their_order() {
        use pb::hash_source::Source;
        let cli = parse_cli([
            "meshctl",
            "service",
            "create",
            "cart",
            "--lb",
            "ring-hash",
            "--hash-cookie",
            "sticky",
            "--cookie-ttl",
            "10m",
            "--hash-header",
            "x-user",
            "--hash-source-ip",
            "--hash-header",
            "x-tenant",
            "--hash-balance-factor",
            "1.25",
        ])
        .unwrap();
        let Command::Service(ServiceCmd::Create { name, opts }) = cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        let (s, paths) = service_msg(&name, &opts);
        assert_eq!(paths, ["lb_policy", "hash_policy", "hash_balance_factor"]);
        assert_eq!(s.lb_policy, i32::from(pb::LbPolicy::RingHash));
        let got: Vec<_> = s
            .hash_policy
            .iter()
            .map(|h| h.source.clone().unwrap())
            .collect();
        assert_eq!(
            got,
            vec![
                Source::Cookie(pb::HashCookie {
                    name: "sticky".into(),
                    ttl: Some(prost_types::Duration {
                        seconds: 600,
                        nanos: 0
                    }),
                }),
                Source::Header("x-user".into()),
                Source::SourceIp(true),
                Source::Header("x-tenant".into()),
            ]
        );
        assert_eq!(
            hash_summary(&s),
            "cookie:sticky (ttl 10m), header:x-user, source-ip, header:x-tenant, balance factor 1.25"
        );
        let e = parse_cli(["meshctl", "service", "create", "a", "--cookie-ttl", "1m"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--hash-cookie"), "{e}");
    }

    #[test]
    fn zone_flags_name_their_paths() {
        let cli = Cli::try_parse_from([
            "meshctl",
            "service",
            "update",
            "echo",
            "--zone-aware",
            "off",
            "--zone-min-healthy",
            "0.5",
        ])
        .unwrap();
        let Command::Service(ServiceCmd::Update { name, opts, .. }) = cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        let (s, paths) = service_msg(&name, &opts);
        assert_eq!(paths, ["zone_aware", "zone_min_healthy"]);
        assert_eq!((s.zone_aware, s.zone_min_healthy), (Some(false), Some(0.5)));
        assert_eq!(super::super::output::zones_summary(&s), "off");
        let on = pb::Service {
            zone_aware: Some(true),
            zone_min_healthy: Some(0.7),
            ..Default::default()
        };
        assert_eq!(
            super::super::output::zones_summary(&on),
            "on (min healthy 0.7)"
        );
        let e = Cli::try_parse_from(["meshctl", "service", "update", "a", "--zone-aware", "maybe"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("on") && e.contains("off"), "{e}");
    }

    #[test]
    fn resilience_flags_name_their_paths_and_reset_with_default() {
        let cli = Cli::try_parse_from([
            "meshctl",
            "service",
            "update",
            "echo",
            "--max-requests",
            "500",
            "--retry-attempts",
            "3",
            "--retry-on",
            "unavailable,internal",
            "--per-try-timeout",
            "200ms",
            "--eject-after",
            "5",
            "--ejection-time",
            "1s",
            "--max-ejection",
            "50%",
            "--slow-start",
            "default",
        ])
        .unwrap();
        let Command::Service(ServiceCmd::Update { name, opts, .. }) = cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        let (s, paths) = service_msg(&name, &opts);
        assert_eq!(
            paths,
            [
                "slow_start",
                "circuit_breakers.max_requests",
                "retry.max_attempts",
                "retry.retry_on",
                "retry.per_try_timeout",
                "outlier.consecutive_failures",
                "outlier.base_ejection_time",
                "outlier.max_ejection_percent",
            ]
        );
        assert_eq!(s.slow_start, None, "`default`: named, unset");
        assert_eq!(s.circuit_breakers.unwrap().max_requests, Some(500));
        let r = s.retry.unwrap();
        assert_eq!(r.max_attempts, Some(3));
        assert_eq!(r.retry_on, ["internal", "unavailable"]);
        assert_eq!(r.per_try_timeout.unwrap().nanos, 200_000_000);
        assert_eq!(s.outlier.unwrap().max_ejection_percent, Some(50));
        let e = Cli::try_parse_from(["meshctl", "service", "update", "a", "--retry-on", "nope"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown gRPC code"), "{e}");
    }

    #[test]
    fn flags_parse_into_requests() {
        let cli = Cli::try_parse_from([
            "meshctl",
            "service",
            "update",
            "greeter",
            "--lb",
            "round-robin",
            "--request-timeout",
            "5s",
            "--no-authority",
        ])
        .unwrap();
        let Command::Service(ServiceCmd::Update {
            name,
            opts,
            no_authority,
            ..
        }) = cli.command
        else {
            panic!("parsed {:?}", cli.command);
        };
        let (s, paths) = service_msg(&name, &opts);
        assert!(no_authority);
        assert_eq!(paths, ["lb_policy", "request_timeout"]);
        assert_eq!(s.lb_policy, i32::from(pb::LbPolicy::RoundRobin));
        assert_eq!(s.request_timeout.unwrap().seconds, 5);

        let e = Cli::try_parse_from(["meshctl", "endpoint", "add", "s", "a", "--meta", "novalue"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not key=value"), "{e}");
        assert!(
            Cli::try_parse_from([
                "meshctl",
                "service",
                "update",
                "s",
                "--authority",
                "a",
                "--no-authority"
            ])
            .is_err()
        );
    }
}

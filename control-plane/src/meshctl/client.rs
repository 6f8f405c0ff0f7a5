//! Connecting to the control plane: plaintext with the admin token, or TLS
//! verified against the trust bundle (with the token or an admin client
//! certificate).

use std::path::PathBuf;

use meshwire_proto::admin::v1::mesh_admin_client::MeshAdminClient;
use tonic::Request;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::args::Cli;
use super::{Failure, chain};
use crate::auth::Bearer;

pub(super) type Client = MeshAdminClient<InterceptedService<Channel, Bearer>>;

/// The token from `--token`/`MESHWIRE_ADMIN_TOKEN`, else from the data
/// directory's `admin.token` (if there is one: without a token the server's
/// answer says what is missing).
fn token(cli: &Cli) -> Result<Option<String>, Failure> {
    if let Some(t) = cli.token.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(t.trim().to_owned()));
    }
    let (dir, explicit) = match &cli.data_dir {
        Some(d) => (d.clone(), true),
        None => (PathBuf::from("./meshwire-data"), false),
    };
    let path = crate::token_file(&dir);
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(Some(t.trim().to_owned())),
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Failure::Usage(format!(
            "--data-dir: cannot read the admin token {}: {e}",
            path.display()
        ))),
    }
}

/// Connects to the first `--server` that answers.
pub(super) async fn connect(cli: &Cli) -> Result<Client, Failure> {
    let mut last = None;
    for server in &cli.server {
        match connect_to(cli, server).await {
            Err(e @ Failure::Connect { .. }) => last = Some(e),
            r => return r,
        }
    }
    Err(last.unwrap_or_else(|| Failure::Usage("--server: give at least one".into())))
}

async fn connect_to(cli: &Cli, server_arg: &str) -> Result<Client, Failure> {
    let tls = server_arg.starts_with("https://");
    // An admin certificate replaces the token, unless one is given explicitly.
    let token = if tls && cli.cert.is_some() && cli.token.as_ref().is_none_or(|t| t.is_empty()) {
        None
    } else {
        token(cli)?
    };
    let bearer = Bearer::new(token.as_deref()).map_err(|e| Failure::Usage(e.to_string()))?;
    let server = if tls {
        with_default_port(server_arg)?
    } else {
        server_arg.to_owned()
    };
    let endpoint = tonic::transport::Endpoint::from_shared(server)
        .map_err(|e| Failure::Usage(format!("--server {server_arg:?}: {}", chain(&e))))?
        .connect_timeout(cli.timeout);
    let connected = if tls {
        endpoint.connect_with_connector(tls_connector(cli)?).await
    } else {
        if cli.cert.is_some() {
            return Err(Failure::Usage(format!(
                "--cert needs an https:// --server (the control plane's TLS port, default 15012), not {server_arg:?}"
            )));
        }
        endpoint.connect().await
    };
    let channel = connected.map_err(|e| Failure::Connect {
        server: server_arg.to_owned(),
        reason: chain(&e),
    })?;
    Ok(MeshAdminClient::with_interceptor(channel, bearer))
}

/// `https://host` means the TLS port, 15012.
fn with_default_port(server: &str) -> Result<String, Failure> {
    let uri: http::Uri = server
        .parse()
        .map_err(|e| Failure::Usage(format!("--server {server:?}: {e}")))?;
    if uri.port().is_some() {
        return Ok(server.to_owned());
    }
    let host = uri
        .host()
        .ok_or_else(|| Failure::Usage(format!("--server {server:?}: no host")))?;
    Ok(format!("https://{host}:15012"))
}

/// TLS to the control plane: its certificate verified against the trust
/// bundle and carrying the control plane's identity; ours if given.
fn tls_connector(cli: &Cli) -> Result<meshwire_tls::TlsConnector, Failure> {
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("{flag} {}: {e}", path.display())))
    };
    let (bundle_path, flag) = match &cli.ca_bundle {
        Some(p) => (p.clone(), "--ca-bundle"),
        None => {
            let dir = cli
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("./meshwire-data"));
            let p = dir.join("ca").join("bundle.pem");
            if !p.is_file() {
                return Err(Failure::Usage(format!(
                    "an https:// --server needs --ca-bundle FILE (the trust bundle: `meshctl ca bundle` over http, or <data-dir>/ca/bundle.pem); {} does not exist",
                    p.display()
                )));
            }
            (p, "--ca-bundle")
        }
    };
    let bundle = meshwire_tls::TrustBundle::from_pem(&read(flag, &bundle_path)?)
        .map_err(|e| Failure::Usage(format!("{flag} {}: {e}", bundle_path.display())))?;
    let creds = match (&cli.cert, &cli.key) {
        (Some(cert), Some(key)) => {
            let chain = meshwire_tls::certs_from_pem(&read("--cert", cert)?)
                .map_err(|e| Failure::Usage(format!("--cert {}: {e}", cert.display())))?;
            if chain.is_empty() {
                return Err(Failure::Usage(format!(
                    "--cert {}: no certificate in it",
                    cert.display()
                )));
            }
            check_validity(cert, &chain[0], std::time::SystemTime::now())?;
            let key_der = meshwire_tls::key_from_pem(&read("--key", key)?)
                .map_err(|e| Failure::Usage(format!("--key {}: {e}", key.display())))?;
            Some(meshwire_tls::Credentials {
                chain,
                key: key_der,
            })
        }
        _ => None,
    };
    let expect = meshwire_tls::SpiffeId::for_service(
        &cli.trust_domain,
        crate::ca::CONTROL_PLANE_NAMESPACE,
        crate::ca::CONTROL_PLANE_SERVICE,
    )
    .map_err(|e| Failure::Usage(format!("--trust-domain {:?}: {e}", cli.trust_domain)))?;
    crate::tls::connector(&bundle, creds.as_ref(), Some(&expect))
        .map_err(|e| Failure::Usage(format!("--cert/--key: {e}")))
}

/// A client certificate out of its validity period would be refused by
/// the control plane after the handshake, which meshctl could only report
/// as a transport error: say so before connecting, naming the dates.
fn check_validity(
    path: &std::path::Path,
    leaf: &[u8],
    now: std::time::SystemTime,
) -> Result<(), Failure> {
    let info = meshwire_tls::cert_info(leaf)
        .map_err(|e| Failure::Usage(format!("--cert {}: {e}", path.display())))?;
    let at = |t| humantime::format_rfc3339_seconds(t);
    let renew =
        "make a new one with `meshwire-control-plane admin-cert` on the control plane's host";
    if info.not_after <= now {
        return Err(Failure::Usage(format!(
            "--cert {}: the certificate expired at {} (its not-after); {renew}",
            path.display(),
            at(info.not_after)
        )));
    }
    if info.not_before > now {
        return Err(Failure::Usage(format!(
            "--cert {}: the certificate is not valid before {} (its not-before; check this host's clock)",
            path.display(),
            at(info.not_before)
        )));
    }
    Ok(())
}

/// A unary request bounded by `--timeout`.
pub(super) fn req<T>(cli: &Cli, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(cli.timeout);
    r
}

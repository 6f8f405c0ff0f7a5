//! Getting and keeping a certificate from the control plane's CA
//! (`meshwire.identity.v1.Identity`, on its TLS port).
//!
//! The first certificate comes with a single-use join token, over TLS whose
//! server is verified by a trust bundle file or a pinned root fingerprint
//! (the sidecar has no certificate yet). Renewals and the trust-bundle watch
//! run over mutual TLS with the certificate being renewed. Failures are
//! retried with jittered backoff, on the next control-plane replica when
//! several are given; the current certificate keeps serving.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use meshwire_proto::identity::v1 as pb;
use meshwire_proto::identity::v1::identity_client::IdentityClient;
use meshwire_tls::{Credentials, IdentityError, TlsConnector, TrustBundle};
use rustls::pki_types::PrivateKeyDer;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{Installed, MeshTls};

/// The path of the control plane's own SPIFFE ID: a sidecar talks to no
/// other workload when it asks for certificates.
const CONTROL_PLANE_PATH: &str = "/ns/meshwire-system/sa/control-plane";
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How the sidecar knows the control plane before it has a certificate.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// The mesh's trust bundle (`--trust-bundle FILE`).
    Bundle(TrustBundle),
    /// The SHA-256 fingerprint of the signing root (`--ca-fingerprint`).
    Fingerprint(String),
}

#[derive(Debug, Clone)]
pub struct IdentityClientConfig {
    /// The control plane's TLS address, `https://HOST:15012`; several
    /// replicas comma-separated, tried in turn.
    pub server: String,
    /// From `meshctl token create --service NAME`.
    pub join_token: String,
    pub bootstrap: Bootstrap,
    pub connect_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityClientError {
    #[error("control-plane address {0:?}: {1}")]
    Address(String, String),
    #[error("control plane: {code:?}: {message}")]
    Rpc { code: tonic::Code, message: String },
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error(
        "the join token is for {issued}, but this sidecar runs --service {service}: create a token with `meshctl token create --service {service}` (the certificate is not used)"
    )]
    WrongService { issued: String, service: String },
}

impl From<tonic::Status> for IdentityClientError {
    fn from(s: tonic::Status) -> Self {
        IdentityClientError::Rpc {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

impl IdentityClientError {
    /// Retrying cannot help: the token or the request is refused as such.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            IdentityClientError::Address(..)
                | IdentityClientError::WrongService { .. }
                | IdentityClientError::Rpc {
                    code: tonic::Code::Unauthenticated
                        | tonic::Code::InvalidArgument
                        | tonic::Code::PermissionDenied,
                    ..
                }
        )
    }
}

impl IdentityClientConfig {
    /// The replicas' URLs, in order.
    pub fn servers(&self) -> Vec<&str> {
        self.server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }
}

fn channel(
    cfg: &IdentityClientConfig,
    server: &str,
    connector: TlsConnector,
) -> Result<Channel, IdentityClientError> {
    let bad = |why: &str| IdentityClientError::Address(server.to_owned(), why.to_owned());
    let rest = server
        .strip_prefix("https://")
        .ok_or_else(|| bad("must start with https:// (certificates are only issued over TLS)"))?;
    // Our connector does the TLS: tonic sees a plain origin.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{rest}"))
        .map_err(|e| bad(&e.to_string()))?
        .connect_timeout(cfg.connect_timeout)
        .timeout(RPC_TIMEOUT)
        .tcp_nodelay(true);
    Ok(endpoint.connect_with_connector_lazy(connector))
}

fn install(
    tls: &MeshTls,
    key: PrivateKeyDer<'static>,
    cert: pb::Certificate,
) -> Result<Arc<Installed>, IdentityError> {
    let chain = meshwire_tls::certs_from_pem(&cert.cert_chain_pem)?;
    let b = cert
        .trust_bundle
        .ok_or_else(|| IdentityError::Certificate("the answer carries no trust bundle".into()))?;
    let bundle = TrustBundle::from_pem(&b.roots_pem)?;
    tls.install(
        Credentials { chain, key },
        bundle,
        b.signing_fingerprint,
        b.version,
    )
}

/// The first certificate, for the join token: from the first replica that
/// answers (a refused token is not offered to the others); refused unless it
/// is for `service` (when given: the sidecar's `--service`).
pub async fn issue(
    cfg: &IdentityClientConfig,
    tls: &MeshTls,
    service: Option<&str>,
) -> Result<(), IdentityClientError> {
    let mut last = IdentityClientError::Address(cfg.server.clone(), "no URL".into());
    for server in cfg.servers() {
        match issue_from(cfg, server, tls, service).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => {
                tracing::warn!(%server, error = %e, "no certificate from this control plane; trying the next");
                last = e;
            }
        }
    }
    Err(last)
}

async fn issue_from(
    cfg: &IdentityClientConfig,
    server: &str,
    tls: &MeshTls,
    service: Option<&str>,
) -> Result<(), IdentityClientError> {
    let config = match &cfg.bootstrap {
        Bootstrap::Bundle(b) => meshwire_tls::client_config(None, b)?,
        Bootstrap::Fingerprint(fp) => meshwire_tls::pinned_client_config(fp)?,
    };
    let connector = TlsConnector {
        config: Arc::new(ArcSwap::new(config)),
        expect: Some(CONTROL_PLANE_PATH.to_owned()),
    };
    let mut client = IdentityClient::new(channel(cfg, server, connector)?);
    let (key, csr_pem) = meshwire_tls::new_key_and_csr()?;
    let cert = client
        .issue(pb::IssueRequest {
            join_token: cfg.join_token.clone(),
            csr_pem,
        })
        .await?
        .into_inner();
    if let Some(service) = service
        && !cert.spiffe_id.ends_with(&format!("/sa/{service}"))
    {
        return Err(IdentityClientError::WrongService {
            issued: cert.spiffe_id,
            service: service.to_owned(),
        });
    }
    install(tls, key, cert)?;
    Ok(())
}

/// Gets the first certificate (retrying while it makes sense; one for
/// another service than `service` is refused), then keeps it renewed and the
/// trust bundle current until `shutdown`; with a `reporter`, also reports
/// the app's health ([`super::report`]).
pub async fn run(
    cfg: IdentityClientConfig,
    tls: Arc<MeshTls>,
    service: Option<String>,
    reporter: Option<super::report::Reporter>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let r = tokio::select! {
            () = shutdown.cancelled() => return,
            r = issue(&cfg, &tls, service.as_deref()) => r,
        };
        match r {
            Ok(()) => break,
            Err(e) => {
                failures += 1;
                // A refused token stays refused; keep saying so, slowly.
                let wait = if e.is_permanent() {
                    BACKOFF_MAX
                } else {
                    backoff(failures)
                };
                tracing::error!(error = %e, retry_in = ?wait, "cannot get a certificate from the control plane");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    let Some(cur) = tls.current() else { return };
    let expect = cur
        .cert
        .spiffe_id
        .as_deref()
        .and_then(|id| meshwire_tls::SpiffeId::parse(id).ok())
        .map(|id| format!("spiffe://{}{CONTROL_PLANE_PATH}", id.trust_domain()));
    let connector = tls.control_plane_connector(expect);
    let chs: Result<Vec<Channel>, _> = cfg
        .servers()
        .into_iter()
        .map(|s| channel(&cfg, s, connector.clone()))
        .collect();
    let chs: Arc<[Channel]> = match chs {
        Ok(c) if !c.is_empty() => c.into(),
        Ok(_) => return,
        Err(e) => {
            tracing::error!(error = %e, "identity channel");
            return;
        }
    };
    let renew_now = Arc::new(Notify::new());
    let servers: Vec<String> = cfg.servers().into_iter().map(str::to_owned).collect();
    let report = {
        let chs = chs.clone();
        async move {
            match reporter {
                Some(r) => super::report::run(chs, servers, r).await,
                None => std::future::pending().await,
            }
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = renew_loop(chs.clone(), tls.clone(), renew_now.clone()) => {}
        () = watch_bundle(chs, tls, renew_now) => {}
        () = report => {}
    }
}

/// When to renew: about two-thirds of the way from receiving the certificate
/// to its expiry, jittered ±5 % so a fleet does not renew in step.
fn renew_at(cur: &Installed) -> tokio::time::Instant {
    let jitter = 0.95 + fastrand::f64() * 0.10;
    tokio::time::Instant::now()
        + renew_delay(
            cur.installed_at,
            cur.cert.not_after,
            SystemTime::now(),
            jitter,
        )
}

/// How long from `now` until renewal: `jitter` × 2/3 of the way from
/// `installed_at` to `not_after` (at once if that is past).
fn renew_delay(
    installed_at: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    jitter: f64,
) -> Duration {
    let life = not_after.duration_since(installed_at).unwrap_or_default();
    let after = life.mul_f64(2.0 / 3.0 * jitter);
    let elapsed = now.duration_since(installed_at).unwrap_or_default();
    after.saturating_sub(elapsed)
}

/// Renews before expiry; a failed renewal is retried on the next replica.
async fn renew_loop(chs: Arc<[Channel]>, tls: Arc<MeshTls>, renew_now: Arc<Notify>) {
    let mut at = 0usize;
    loop {
        let Some(cur) = tls.current() else { return };
        tokio::select! {
            () = tokio::time::sleep_until(renew_at(&cur)) => {}
            () = renew_now.notified() => {
                tracing::info!("the signing root changed; renewing early");
            }
        }
        let mut failures = 0u32;
        loop {
            let mut client = IdentityClient::new(chs[at % chs.len()].clone());
            match renew(&mut client, &tls).await {
                Ok(()) => {
                    tls.renewals
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    failures += 1;
                    tls.renew_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    at = at.wrapping_add(1);
                    let wait = backoff(failures);
                    tracing::warn!(error = %e, retry_in = ?wait, "certificate renewal failed; the current one keeps serving");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

async fn renew(
    client: &mut IdentityClient<Channel>,
    tls: &MeshTls,
) -> Result<(), IdentityClientError> {
    let (key, csr_pem) = meshwire_tls::new_key_and_csr()?;
    let cert = client
        .renew(pb::RenewRequest { csr_pem })
        .await?
        .into_inner();
    install(tls, key, cert)?;
    Ok(())
}

async fn watch_bundle(chs: Arc<[Channel]>, tls: Arc<MeshTls>, renew_now: Arc<Notify>) {
    let mut failures = 0u32;
    loop {
        // After a failure, the next replica.
        let mut client = IdentityClient::new(chs[failures as usize % chs.len()].clone());
        match client
            .watch_trust_bundle(pb::WatchTrustBundleRequest {})
            .await
        {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(b)) => {
                            failures = 0;
                            apply_bundle(&tls, &b, &renew_now);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "trust bundle watch ended");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "trust bundle watch failed"),
        }
        failures += 1;
        tokio::time::sleep(backoff(failures)).await;
    }
}

fn apply_bundle(tls: &MeshTls, b: &pb::TrustBundle, renew_now: &Notify) {
    let bundle = match TrustBundle::from_pem(&b.roots_pem) {
        Ok(bundle) => bundle,
        Err(e) => {
            tracing::warn!(error = %e, version = b.version, "ignoring an invalid trust bundle");
            return;
        }
    };
    if let Err(e) = tls.set_bundle(bundle, b.version) {
        tracing::warn!(error = %e, version = b.version, "cannot use the new trust bundle");
        return;
    }
    tracing::info!(
        version = b.version,
        roots = b.fingerprints.len(),
        "trust bundle updated"
    );
    if let Some(cur) = tls.current()
        && !b.signing_fingerprint.is_empty()
        && cur.signed_by != b.signing_fingerprint
    {
        renew_now.notify_one();
    }
}

/// Jittered exponential backoff: 0.5 s, 1 s, 2 s, ... up to 30 s, ±50 %.
pub(super) fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1 << failures.saturating_sub(1).min(8));
    exp.min(BACKOFF_MAX).mul_f64(0.5 + fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_two_thirds_of_the_lifetime_jittered() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let exp = t0 + Duration::from_secs(60);
        assert_eq!(renew_delay(t0, exp, t0, 1.0), Duration::from_secs(40));
        let early = renew_delay(t0, exp, t0, 0.95);
        let late = renew_delay(t0, exp, t0, 1.05);
        assert!(early >= Duration::from_secs(37) && late <= Duration::from_secs(43));
        // Time already spent counts; past the point, renew at once.
        assert_eq!(
            renew_delay(t0, exp, t0 + Duration::from_secs(30), 1.0),
            Duration::from_secs(10)
        );
        assert_eq!(
            renew_delay(t0, exp, t0 + Duration::from_secs(59), 1.0),
            Duration::ZERO
        );
        // An already expired certificate: at once.
        assert_eq!(renew_delay(exp, t0, exp, 1.0), Duration::ZERO);
    }

    #[test]
    fn backoff_grows_jittered_and_caps() {
        for failures in 1..20 {
            let b = backoff(failures);
            let exp = BACKOFF_BASE
                .saturating_mul(1 << (failures - 1).min(8))
                .min(BACKOFF_MAX);
            assert!(
                b >= exp.mul_f64(0.5) && b <= exp.mul_f64(1.5),
                "{failures}: {b:?}"
            );
        }
        assert!(backoff(30) <= BACKOFF_MAX.mul_f64(1.5));
    }

    #[test]
    fn permanent_errors_are_not_retried_fast() {
        let e = IdentityClientError::from(tonic::Status::unauthenticated("used token"));
        assert!(e.is_permanent());
        let e = IdentityClientError::from(tonic::Status::unavailable("down"));
        assert!(!e.is_permanent());
    }
}

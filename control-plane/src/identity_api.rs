//! The Identity gRPC service (`meshwire.identity.v1.Identity`, see
//! `proto/meshwire/identity/v1/identity.proto`): workload certificates from
//! the mesh [`Ca`].
//!
//! Served on both ports, but only the TLS port issues: a join token and a
//! certificate are secrets worth a confidential channel, and the caller must
//! have verified who it talks to. On the plaintext port every call is
//! FAILED_PRECONDITION, which says where to go instead.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use meshwire_proto::identity::v1 as pb;
use meshwire_proto::identity::v1::identity_server::{Identity, IdentityServer};
use meshwire_tls::to_pem;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::ca::{BundleState, Ca, CaError, Issued};
use crate::health::{AckStream, HealthReports};
use crate::tls::TlsConnectInfo;

/// Longest CSR accepted (a PEM CSR is well under 2 KiB).
const MAX_CSR: usize = 16 << 10;

#[derive(Debug, Clone)]
pub struct IdentityApi {
    ca: Arc<Ca>,
    shutdown: CancellationToken,
    health: Option<Arc<HealthReports>>,
}

impl IdentityApi {
    /// `shutdown` ends `WatchTrustBundle` streams.
    pub fn new(ca: Arc<Ca>, shutdown: CancellationToken) -> Self {
        Self {
            ca,
            shutdown,
            health: None,
        }
    }

    /// Accepts `ReportHealth` streams (UNIMPLEMENTED without).
    pub fn with_health(mut self, health: Arc<HealthReports>) -> Self {
        self.health = Some(health);
        self
    }

    pub fn into_service(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ca) -> Result<T, CaError> + Send + 'static,
    ) -> Result<T, Status> {
        crate::api::status::ca_call(&self.ca, f).await
    }

    fn certificate(&self, issued: &Issued) -> pb::Certificate {
        let secs = |t: std::time::SystemTime| {
            t.duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        };
        pb::Certificate {
            cert_chain_pem: issued
                .chain
                .iter()
                .map(|c| to_pem("CERTIFICATE", c))
                .collect(),
            spiffe_id: issued.spiffe_id.to_string(),
            not_before: secs(issued.not_before),
            not_after: secs(issued.not_after),
            trust_bundle: Some(bundle_pb(&self.ca.bundle())),
        }
    }
}

pub fn bundle_pb(b: &BundleState) -> pb::TrustBundle {
    pb::TrustBundle {
        roots_pem: b.bundle.to_pem(),
        fingerprints: b.fingerprints.clone(),
        signing_fingerprint: b.signing_fingerprint.clone(),
        version: b.version,
    }
}

fn tls_only<T>(req: &Request<T>) -> Result<&TlsConnectInfo, Status> {
    req.extensions().get::<TlsConnectInfo>().ok_or_else(|| {
        Status::failed_precondition(
            "certificates are only served over TLS: use the control plane's TLS port (default 15012), verified against the trust bundle",
        )
    })
}

fn csr(field: &str, pem: &str) -> Result<String, Status> {
    if pem.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: is required")));
    }
    if pem.len() > MAX_CSR {
        return Err(Status::invalid_argument(format!(
            "{field}: must be at most {MAX_CSR} bytes"
        )));
    }
    Ok(pem.to_owned())
}

type BundleStream = Pin<Box<dyn Stream<Item = Result<pb::TrustBundle, Status>> + Send>>;

#[tonic::async_trait]
impl Identity for IdentityApi {
    async fn issue(
        &self,
        req: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::Certificate>, Status> {
        let remote = tls_only(&req)?.remote_addr;
        let req = req.into_inner();
        if req.join_token.is_empty() {
            return Err(Status::invalid_argument(
                "join_token: is required (meshctl token create --service NAME)",
            ));
        }
        let csr = csr("csr_pem", &req.csr_pem)?;
        let token = req.join_token;
        let issued = self
            .blocking(move |ca| ca.issue_with_token(&token, &csr))
            .await
            .inspect_err(|s| {
                tracing::warn!(%remote, code = ?s.code(), reason = s.message(), "certificate refused");
            })?;
        Ok(Response::new(self.certificate(&issued)))
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::Certificate>, Status> {
        let info = tls_only(&req)?;
        let Some(id) = info.peer_id.clone() else {
            return Err(Status::unauthenticated(
                "renewal needs the current certificate: present it as the TLS client certificate (a first certificate comes from Issue with a join token)",
            ));
        };
        let csr = csr("csr_pem", &req.into_inner().csr_pem)?;
        let issued = self.blocking(move |ca| ca.renew(&id, &csr)).await?;
        Ok(Response::new(self.certificate(&issued)))
    }

    type WatchTrustBundleStream = BundleStream;

    async fn watch_trust_bundle(
        &self,
        req: Request<pb::WatchTrustBundleRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        tls_only(&req)?;
        let rx = self.ca.watch_bundle();
        let shutdown = self.shutdown.clone();
        // The current bundle first, then one message per change (a watcher
        // that is slow sees the latest, never a backlog).
        let stream = futures_util::stream::unfold((rx, true), move |(mut rx, first)| {
            let shutdown = shutdown.clone();
            async move {
                if !first {
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        r = rx.changed() => r.ok()?,
                    }
                }
                let b = bundle_pb(&rx.borrow_and_update());
                Some((Ok(b), (rx, false)))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type ReportHealthStream = AckStream;

    async fn report_health(
        &self,
        req: Request<Streaming<pb::HealthReport>>,
    ) -> Result<Response<AckStream>, Status> {
        let info = tls_only(&req)?;
        let (peer, remote) = (
            info.peer_id.as_ref().map(ToString::to_string),
            info.remote_addr,
        );
        let Some(health) = &self.health else {
            return Err(Status::unimplemented(
                "this control plane takes no health reports",
            ));
        };
        let acks = health.open(peer, remote, req.into_inner()).await?;
        Ok(Response::new(acks))
    }
}

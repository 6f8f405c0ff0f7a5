//! The sidecar's workload identity: its certificate and private key, the
//! mesh's trust bundle, and the TLS configurations made from them.
//!
//! ```text
//! start: key pair + CSR made here ─▶ Identity.Issue(join token) over TLS
//!        (server verified by the bundle file or a pinned root) ─▶ MeshTls::install
//!        ─▶ rustls client + server configs ─▶ the inbound listener starts accepting
//! at ~2/3 of the lifetime (jittered): new key + CSR ─▶ Identity.Renew over mTLS ─▶ install
//! WatchTrustBundle: a root added or removed ─▶ install with the new bundle;
//!                   the signing root changed ─▶ renew now (root rotation)
//! ReportHealth (with an app): the app's health on every change ─▶ the control
//!                   plane, which pushes it to every caller in EDS ([`report`])
//! ```
//!
//! New connections read the configs current at their handshake; open
//! connections keep theirs, so a rotation drops no connection and no call.
//! The private key never leaves this process.

pub mod client;
pub mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use meshwire_tls::{CertInfo, Credentials, IdentityError, TrustBundle};
use tokio::sync::watch;

pub use client::{Bootstrap, IdentityClientConfig, IdentityClientError};

/// One certificate with the bundle it is verified against, and the TLS
/// configurations built from both.
#[derive(Debug)]
pub struct Installed {
    /// Outbound hop: our certificate, the peer's chain verified by the bundle.
    pub client: Arc<rustls::ClientConfig>,
    /// Inbound hop: TLS 1.3, ALPN h2, a client certificate chained to the bundle required.
    pub server: Arc<rustls::ServerConfig>,
    pub creds: Credentials,
    pub bundle: TrustBundle,
    /// Our leaf certificate.
    pub cert: CertInfo,
    /// The root (or the user's intermediate) that signed our certificate.
    pub signed_by: String,
    pub bundle_version: u64,
    /// When this certificate arrived (kept across bundle changes): renewal
    /// is timed from it.
    pub installed_at: SystemTime,
}

/// The identity a sidecar holds now; empty until the first certificate.
#[derive(Debug)]
pub struct MeshTls {
    current: ArcSwapOption<Installed>,
    /// The client config the control-plane channels use, kept in step with
    /// `current` (a placeholder until then: nothing connects before it).
    control_plane: Arc<ArcSwap<rustls::ClientConfig>>,
    ready: watch::Sender<bool>,
    /// Certificates installed after the first.
    pub renewals: AtomicU64,
    pub renew_failures: AtomicU64,
}

impl MeshTls {
    pub fn new() -> Arc<Self> {
        let placeholder = rustls::ClientConfig::builder_with_provider(meshwire_tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Arc::new(Self {
            current: ArcSwapOption::empty(),
            control_plane: Arc::new(ArcSwap::from_pointee(placeholder)),
            ready: watch::channel(false).0,
            renewals: AtomicU64::new(0),
            renew_failures: AtomicU64::new(0),
        })
    }

    /// An identity from files or memory, installed at once (no rotation).
    pub fn fixed(creds: Credentials, bundle: TrustBundle) -> Result<Arc<Self>, IdentityError> {
        let tls = Self::new();
        let signed_by = bundle.fingerprints().first().cloned().unwrap_or_default();
        tls.install(creds, bundle, signed_by, 0)?;
        Ok(tls)
    }

    pub fn current(&self) -> Option<Arc<Installed>> {
        self.current.load_full()
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Resolves once a certificate is installed.
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// A connector to the control plane with our current credentials.
    pub fn control_plane_connector(&self, expect: Option<String>) -> meshwire_tls::TlsConnector {
        meshwire_tls::TlsConnector {
            config: self.control_plane.clone(),
            expect,
        }
    }

    /// Validates and installs a certificate chain, its key and a bundle.
    pub fn install(
        &self,
        creds: Credentials,
        bundle: TrustBundle,
        signed_by: String,
        bundle_version: u64,
    ) -> Result<Arc<Installed>, IdentityError> {
        self.install_at(creds, bundle, signed_by, bundle_version, SystemTime::now())
    }

    fn install_at(
        &self,
        creds: Credentials,
        bundle: TrustBundle,
        signed_by: String,
        bundle_version: u64,
        installed_at: SystemTime,
    ) -> Result<Arc<Installed>, IdentityError> {
        let leaf = creds
            .chain
            .first()
            .ok_or_else(|| IdentityError::Certificate("empty certificate chain".into()))?;
        let cert = meshwire_tls::cert_info(leaf)?;
        if cert.spiffe_id.is_none() {
            return Err(IdentityError::Certificate(
                "the certificate carries no SPIFFE ID".into(),
            ));
        }
        let client = meshwire_tls::client_config(Some(&creds), &bundle)?;
        let server = meshwire_tls::server_config(&creds, &bundle, true)?;
        let first = self.current.load().is_none();
        let installed = Arc::new(Installed {
            client: client.clone(),
            server,
            creds,
            bundle,
            cert,
            signed_by,
            bundle_version,
            installed_at,
        });
        self.control_plane.store(client);
        self.current.store(Some(installed.clone()));
        if first {
            self.ready.send_replace(true);
        }
        tracing::info!(
            spiffe_id = installed.cert.spiffe_id.as_deref().unwrap_or(""),
            serial = %installed.cert.serial,
            not_after = unix(installed.cert.not_after),
            roots = installed.bundle.roots().len(),
            "identity installed"
        );
        Ok(installed)
    }

    /// A new trust bundle for the certificate we hold.
    pub fn set_bundle(&self, bundle: TrustBundle, version: u64) -> Result<(), IdentityError> {
        let Some(cur) = self.current() else {
            return Ok(());
        };
        if cur.bundle == bundle {
            return Ok(());
        }
        self.install_at(
            cur.creds.clone(),
            bundle,
            cur.signed_by.clone(),
            version,
            cur.installed_at,
        )?;
        Ok(())
    }

    /// What `/certs` shows.
    pub fn describe(&self) -> serde_json::Value {
        let Some(cur) = self.current() else {
            return serde_json::json!({ "ready": false });
        };
        serde_json::json!({
            "ready": true,
            "spiffe_id": cur.cert.spiffe_id,
            "serial": cur.cert.serial,
            "not_before": unix(cur.cert.not_before),
            "not_after": unix(cur.cert.not_after),
            "signed_by": cur.signed_by,
            "renewals": self.renewals.load(Ordering::Relaxed),
            "renew_failures": self.renew_failures.load(Ordering::Relaxed),
            "trust_bundle": {
                "version": cur.bundle_version,
                "fingerprints": cur.bundle.fingerprints(),
            },
        })
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

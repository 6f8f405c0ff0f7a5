//! Workload identity and TLS for the mesh, shared by the control plane and
//! the sidecars: SPIFFE IDs, trust bundles, certificate verification and the
//! rustls configurations of every hop.
//!
//! Every hop is TLS 1.3 with ALPN `h2`, both sides presenting certificates
//! issued by the mesh CA. Verification is by chain to the trust bundle (which
//! may hold several roots during a root rotation), never by host name: the
//! identity that matters is the peer's SPIFFE ID (`spiffe://<trust-domain>/ns/
//! <namespace>/sa/<service>`), read from its certificate after the handshake
//! ([`peer_id`]) and compared with the one the control plane pushed for that
//! endpoint, before a single request byte is sent.
//!
//! A certificate flows: a sidecar makes a key and CSR ([`new_key_and_csr`]),
//! the control plane's CA signs it, and the sidecar builds its
//! [`server_config`] and [`client_config`] from the returned chain and the
//! [`TrustBundle`]; before its first certificate it reaches the control plane
//! through a [`TlsConnector`] over [`pinned_client_config`].

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;

/// Why an identity, a certificate or a TLS configuration was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)")]
    BadSpiffeId(String),
    #[error("cannot parse PEM: {0}")]
    Pem(String),
    #[error("cannot parse certificate: {0}")]
    Certificate(String),
    #[error("the trust bundle is empty")]
    EmptyBundle,
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("peer presented {got:?}, expected {want:?}")]
    WrongPeer { got: Option<String>, want: String },
}

// === SPIFFE IDs ===

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(String);

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::BadSpiffeId(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (td, path) = rest.split_once('/').ok_or_else(bad)?;
        let td_ok = !td.is_empty()
            && td
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c));
        let path_ok = !path.is_empty()
            && path.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
            });
        if td_ok && path_ok && s.len() <= 2048 {
            Ok(Self(s.to_owned()))
        } else {
            Err(bad())
        }
    }

    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service>`.
    pub fn for_service(
        trust_domain: &str,
        namespace: &str,
        service: &str,
    ) -> Result<Self, IdentityError> {
        Self::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service}"
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn trust_domain(&self) -> &str {
        self.0["spiffe://".len()..].split('/').next().unwrap_or("")
    }

    /// `<service>` of a workload ID `spiffe://<td>/ns/<ns>/sa/<service>`;
    /// `None` for any other path.
    pub fn service(&self) -> Option<&str> {
        let path = &self.0["spiffe://".len() + self.trust_domain().len()..];
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["", "ns", _, "sa", service] => Some(service),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === certificates ===

/// What the mesh cares about in a certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct CertInfo {
    pub spiffe_id: Option<String>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// SHA-256 of the DER, hex.
    pub fingerprint: String,
    pub is_ca: bool,
    pub subject: String,
}

pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(der))
}

pub fn cert_info(der: &[u8]) -> Result<CertInfo, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let spiffe_id = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                    Some((*u).to_owned())
                }
                _ => None,
            })
        });
    let ts = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok(CertInfo {
        spiffe_id,
        serial: cert.tbs_certificate.raw_serial_as_string().replace(':', ""),
        not_before: ts(cert.validity().not_before),
        not_after: ts(cert.validity().not_after),
        fingerprint: fingerprint(der),
        is_ca: cert.is_ca(),
        subject: cert.subject().to_string(),
    })
}

/// The SPIFFE ID in a peer's end-entity certificate.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    cert_info(certs?.first()?).ok()?.spiffe_id
}

pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Pem(e.to_string()))
}

pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, IdentityError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| IdentityError::Pem(e.to_string()))?
        .ok_or_else(|| IdentityError::Pem("no private key".into()))
}

pub fn to_pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

// === trust bundle ===

/// The roots a mesh trusts. Several during a root rotation.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, IdentityError> {
        if roots.is_empty() {
            return Err(IdentityError::EmptyBundle);
        }
        for r in &roots {
            cert_info(r)?;
        }
        Ok(Self { roots })
    }

    pub fn from_pem(pem: &str) -> Result<Self, IdentityError> {
        Self::new(certs_from_pem(pem)?)
    }

    pub fn to_pem(&self) -> String {
        self.roots
            .iter()
            .map(|r| to_pem("CERTIFICATE", r))
            .collect()
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// SHA-256 fingerprints of the roots, hex.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(|r| fingerprint(r)).collect()
    }

    fn store(&self) -> Result<Arc<RootCertStore>, IdentityError> {
        let mut store = RootCertStore::empty();
        for r in &self.roots {
            store
                .add(r.clone())
                .map_err(|e| IdentityError::Tls(format!("trust bundle root: {e}")))?;
        }
        Ok(Arc::new(store))
    }
}

// === TLS configurations ===

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key (the key never leaves its owner).
#[derive(Debug)]
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Server side of a mesh hop: TLS 1.3, ALPN h2, a client certificate chained
/// to the bundle required (or, for the control plane, optional).
pub fn server_config(
    creds: &Credentials,
    bundle: &TrustBundle,
    client_cert_required: bool,
) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
    let tls = |e: rustls::Error| IdentityError::Tls(e.to_string());
    let builder = WebPkiClientVerifier::builder_with_provider(bundle.store()?, provider());
    let verifier = if client_cert_required {
        builder.build()
    } else {
        builder.allow_unauthenticated().build()
    }
    .map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(tls)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client side of a mesh hop: TLS 1.3, ALPN h2, our certificate (if any),
/// and the server's chain verified against the bundle without a host name
/// check: the caller compares the peer's SPIFFE ID after the handshake.
pub fn client_config(
    creds: Option<&Credentials>,
    bundle: &TrustBundle,
) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
    let tls = |e: rustls::Error| IdentityError::Tls(e.to_string());
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(BundleVerifier {
            anchors: Anchors::Bundle(bundle.store()?),
            provider: provider(),
        }));
    let mut cfg = match creds {
        Some(c) => builder
            .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
            .map_err(tls)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client side of the first contact with the control plane when the sidecar
/// knows only the fingerprint of a root (`--ca-fingerprint`): the server's
/// chain must include that root and verify against it. Also TLS 1.3, ALPN h2.
pub fn pinned_client_config(fingerprint: &str) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
    let pin = fingerprint.trim().to_ascii_lowercase().replace(':', "");
    if pin.len() != 64 || !pin.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(IdentityError::Tls(format!(
            "{fingerprint:?} is not a SHA-256 fingerprint (64 hex digits)"
        )));
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(BundleVerifier {
            anchors: Anchors::Pinned(pin),
            provider: provider(),
        }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A fresh key pair and a PKCS#10 request for it (PEM). The mesh CA takes
/// only the public key from it: the identity comes from the join token or
/// the client certificate, so the request names nothing.
pub fn new_key_and_csr() -> Result<(PrivateKeyDer<'static>, String), IdentityError> {
    let err = |e: rcgen::Error| IdentityError::Certificate(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(err)?
        .serialize_request(&key)
        .map_err(err)?
        .pem()
        .map_err(err)?;
    let der = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    Ok((der, csr))
}

/// The SNI the mesh sends; certificates are not checked against it.
pub fn mesh_server_name() -> ServerName<'static> {
    ServerName::try_from("meshwire.mesh").expect("a valid DNS name")
}

/// What a server's chain must lead to.
#[derive(Debug)]
enum Anchors {
    /// Any root of the trust bundle.
    Bundle(Arc<RootCertStore>),
    /// The one root with this SHA-256 fingerprint, which the server must send
    /// in its chain (a sidecar's first contact, `--ca-fingerprint`).
    Pinned(String),
}

/// Verifies a server's chain against its anchors, ignoring its name: the
/// mesh checks SPIFFE IDs, not host names.
#[derive(Debug)]
struct BundleVerifier {
    anchors: Anchors,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for BundleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned;
        let roots = match &self.anchors {
            Anchors::Bundle(roots) => roots,
            Anchors::Pinned(pin) => {
                let root = intermediates
                    .iter()
                    .find(|c| fingerprint(c) == *pin)
                    .ok_or_else(|| {
                        rustls::Error::General(format!(
                            "the server's chain does not include the pinned root {pin}"
                        ))
                    })?;
                let mut store = RootCertStore::empty();
                store.add(root.clone().into_owned())?;
                pinned = Arc::new(store);
                &pinned
            }
        };
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The mesh speaks TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Checks that a TLS peer is who the control plane said it would be.
pub(crate) fn check_peer(
    certs: Option<&[CertificateDer<'_>]>,
    want: &str,
) -> Result<(), IdentityError> {
    match peer_id(certs) {
        Some(got) if got == want => Ok(()),
        got => Err(IdentityError::WrongPeer {
            got,
            want: want.to_owned(),
        }),
    }
}

// === a tonic connector for TLS to the control plane ===

/// Connects tonic channels over TLS with the mesh's client configuration
/// (read at every connect, so rotated certificates are used), and checks
/// the server's SPIFFE ID when one is expected: `expect` is a whole SPIFFE ID,
/// or just its path (any trust domain).
#[derive(Clone)]
pub struct TlsConnector {
    pub config: Arc<arc_swap::ArcSwap<rustls::ClientConfig>>,
    pub expect: Option<String>,
}

impl fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector")
            .field("expect", &self.expect)
            .finish()
    }
}

type IoResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

impl tower_service::Service<http::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn std::future::Future<Output = IoResult<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.config.load_full();
        let expect = self.expect.clone();
        Box::pin(async move {
            let host = uri.host().ok_or("no host in the control-plane address")?;
            let port = uri.port_u16().unwrap_or(15010);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let tcp = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => tokio::net::TcpStream::connect(SocketAddr::new(ip, port)).await?,
                Err(_) => tokio::net::TcpStream::connect((host, port)).await?,
            };
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(mesh_server_name(), tcp)
                .await?;
            if let Some(want) = &expect {
                if want.starts_with("spiffe://") {
                    check_peer(tls.get_ref().1.peer_certificates(), want)?;
                } else {
                    // A path (`/ns/meshwire-system/sa/control-plane`): before
                    // its first certificate a sidecar does not know the trust
                    // domain, only which workload the control plane is.
                    let got = peer_id(tls.get_ref().1.peer_certificates());
                    if !got.as_deref().is_some_and(|g| {
                        g.strip_prefix("spiffe://")
                            .and_then(|r| r.find('/').map(|i| &r[i..]))
                            == Some(want.as_str())
                    }) {
                        return Err(IdentityError::WrongPeer {
                            got,
                            want: want.clone(),
                        }
                        .into());
                    }
                }
            }
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// A throwaway CA for tests (this crate's and the end-to-end tests): real
/// certificates made at run time, never written to the repository.
pub mod testing {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use rustls::pki_types::PrivateKeyDer;

    use super::{Credentials, TrustBundle};

    /// A root CA and a way to issue leaf certificates from it.
    pub struct TestCa {
        cert: rcgen::Certificate,
        issuer: Issuer<'static, KeyPair>,
    }

    impl std::fmt::Debug for TestCa {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("TestCa").finish_non_exhaustive()
        }
    }

    impl TestCa {
        /// Panics on failure: for tests only.
        pub fn new(name: &str) -> Self {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = p.self_signed(&key).expect("self-signed");
            Self {
                cert,
                issuer: Issuer::new(p, key),
            }
        }

        pub fn bundle(&self) -> TrustBundle {
            TrustBundle::new(vec![self.root().clone()]).expect("bundle")
        }

        /// The root certificate.
        pub fn root(&self) -> &rustls::pki_types::CertificateDer<'static> {
            self.cert.der()
        }

        /// A leaf certificate carrying the SPIFFE ID `id`.
        pub fn leaf(&self, id: &str) -> Credentials {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.subject_alt_names = vec![SanType::URI(id.try_into().expect("URI SAN"))];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &self.issuer).expect("signed");
            Credentials {
                chain: vec![cert.der().clone()],
                key: PrivateKeyDer::try_from(key.serialize_der()).expect("key DER"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use testing::TestCa;

    /// One handshake over an in-memory pipe; the server's view of the client.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (
        Result<Option<String>, String>,
        Result<Option<String>, String>,
    ) {
        let (a, b) = tokio::io::duplex(64 << 10);
        let s = tokio::spawn(async move {
            tokio_rustls::TlsAcceptor::from(server)
                .accept(a)
                .await
                .map(|t| peer_id(t.get_ref().1.peer_certificates()))
                .map_err(|e| e.to_string())
        });
        let c = tokio_rustls::TlsConnector::from(client)
            .connect(mesh_server_name(), b)
            .await;
        // Keep the client's end open until the server has finished with it.
        let server_side = s.await.unwrap();
        let c = c
            .map(|t| {
                assert_eq!(t.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
                peer_id(t.get_ref().1.peer_certificates())
            })
            .map_err(|e| e.to_string());
        (server_side, c)
    }

    const A: &str = "spiffe://mesh.local/ns/default/sa/a";
    const B: &str = "spiffe://mesh.local/ns/default/sa/b";

    #[tokio::test]
    async fn mutual_tls_with_spiffe_ids_both_ways() {
        let ca = TestCa::new("root");
        let srv = server_config(&ca.leaf(B), &ca.bundle(), true).unwrap();
        let cli = client_config(Some(&ca.leaf(A)), &ca.bundle()).unwrap();
        let (s, c) = handshake(srv, cli).await;
        assert_eq!(
            s.unwrap().as_deref(),
            Some(A),
            "server sees the client's identity"
        );
        assert_eq!(
            c.unwrap().as_deref(),
            Some(B),
            "client sees the server's identity"
        );
    }

    #[tokio::test]
    async fn a_pinned_root_must_be_in_the_servers_chain() {
        let ca = TestCa::new("root");
        let mut leaf = ca.leaf(B);
        // Without the root in its chain, the server cannot satisfy a pin.
        let srv = server_config(&leaf, &ca.bundle(), false).unwrap();
        let pin = fingerprint(ca.root());
        let (_, c) = handshake(srv, pinned_client_config(&pin).unwrap()).await;
        assert!(c.unwrap_err().contains("pinned root"));
        // With it (as the control plane sends), the pin verifies the chain.
        leaf.chain.push(ca.root().clone());
        let srv = server_config(&leaf, &ca.bundle(), false).unwrap();
        let (_, c) = handshake(
            srv.clone(),
            pinned_client_config(&pin.to_uppercase()).unwrap(),
        )
        .await;
        assert_eq!(c.unwrap().as_deref(), Some(B));
        // Another root's fingerprint: refused.
        let other = fingerprint(TestCa::new("other").root());
        let (_, c) = handshake(srv, pinned_client_config(&other).unwrap()).await;
        assert!(c.is_err());
        // A forged chain that carries the pinned root but is signed by another CA.
        let forger = TestCa::new("forger");
        let mut fake = forger.leaf(B);
        fake.chain.push(ca.root().clone());
        let srv = server_config(&fake, &forger.bundle(), false).unwrap();
        let (_, c) = handshake(srv, pinned_client_config(&pin).unwrap()).await;
        assert!(
            c.is_err(),
            "a chain not signed by the pinned root was accepted"
        );
        assert!(pinned_client_config("abc").is_err());
    }

    #[tokio::test]
    async fn no_client_cert_or_another_ca_is_refused() {
        let ca = TestCa::new("root");
        let other = TestCa::new("other");
        let srv = server_config(&ca.leaf(B), &ca.bundle(), true).unwrap();
        let (s, _) = handshake(srv.clone(), client_config(None, &ca.bundle()).unwrap()).await;
        assert!(s.is_err(), "client without a certificate accepted");
        let (s, _) = handshake(
            srv,
            client_config(Some(&other.leaf(A)), &ca.bundle()).unwrap(),
        )
        .await;
        assert!(s.is_err(), "client certificate from another CA accepted");
        // And the client refuses a server from another CA.
        let srv = server_config(&other.leaf(B), &other.bundle(), false).unwrap();
        let (_, c) = handshake(srv, client_config(None, &ca.bundle()).unwrap()).await;
        assert!(c.is_err(), "server from another CA accepted");
    }

    #[tokio::test]
    async fn a_bundle_of_two_roots_trusts_both() {
        let old = TestCa::new("old");
        let new = TestCa::new("new");
        let both = TrustBundle::new(vec![old.root().clone(), new.root().clone()]).unwrap();
        assert_eq!(both.fingerprints().len(), 2);
        let srv = server_config(&new.leaf(B), &both, true).unwrap();
        let (s, c) = handshake(srv, client_config(Some(&old.leaf(A)), &both).unwrap()).await;
        assert_eq!(s.unwrap().as_deref(), Some(A));
        assert_eq!(c.unwrap().as_deref(), Some(B));
        assert_eq!(TrustBundle::from_pem(&both.to_pem()).unwrap(), both);
    }

    #[test]
    fn the_service_of_a_workload_id() {
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        assert_eq!(
            id("spiffe://m.local/ns/default/sa/echo").service(),
            Some("echo")
        );
        assert_eq!(id("spiffe://m.local/ns/default/sa/echo/x").service(), None);
        assert_eq!(id("spiffe://m.local/workload/echo").service(), None);
        assert_eq!(id("spiffe://m.local/ns/sa/echo").service(), None);
    }

    #[test]
    fn spiffe_ids_and_peer_checks() {
        assert!(SpiffeId::parse("spiffe://mesh.local/ns/default/sa/web").is_ok());
        for bad in [
            "http://x/y",
            "spiffe://",
            "spiffe://td",
            "spiffe://TD/x",
            "spiffe://td/a//b",
            "spiffe://td/../x",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
        let id = SpiffeId::for_service("mesh.local", "prod", "web").unwrap();
        assert_eq!(id.as_str(), "spiffe://mesh.local/ns/prod/sa/web");
        assert_eq!(id.trust_domain(), "mesh.local");
        let ca = TestCa::new("root");
        let leaf = ca.leaf(A);
        assert!(check_peer(Some(&leaf.chain), A).is_ok());
        let e = check_peer(Some(&leaf.chain), B).unwrap_err();
        assert!(
            e.to_string().contains(A) && e.to_string().contains(B),
            "{e}"
        );
        assert!(check_peer(None, A).is_err());
        let info = cert_info(&leaf.chain[0]).unwrap();
        assert_eq!(info.spiffe_id.as_deref(), Some(A));
        assert!(!info.is_ca && cert_info(ca.root()).unwrap().is_ca);
    }
}

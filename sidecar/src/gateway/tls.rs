//! The gateway's public TLS: certificates chosen by SNI, reloaded from their
//! files when they change, without a restart and without touching open
//! connections.
//!
//! A [`CertStore`] is the `rustls` certificate resolver of a listener's one
//! `ServerConfig`. Its certificates are an immutable [`CertSet`] behind an
//! `ArcSwap`: a handshake does one atomic load and a hash lookup; a reload
//! ([`CertStore::reload_if_changed`], polled by [`watch`]) builds a whole new
//! set and swaps it in, or keeps the old one if any file fails to load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("the key does not belong to the certificate, or is unsupported: {0}")]
    Key(rustls::Error),
    #[error("no server name: give server_names or use a certificate with DNS names")]
    NoNames,
    #[error("{0}")]
    Config(rustls::Error),
}

/// One certificate as configured: its files and the names it serves.
#[derive(Debug, Clone)]
pub struct CertSource {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Explicit names (`api.example.com`, `*.example.com`); empty: the
    /// certificate's DNS subject alternative names.
    pub server_names: Vec<String>,
}

/// The certificates of one listener at one moment.
#[derive(Debug)]
pub struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`: matches one label more.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// For clients that send no SNI, or a name no certificate has: the first.
    default: Arc<CertifiedKey>,
}

impl CertSet {
    /// The certificate for `sni` (lower-case host name).
    pub fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        if let Some(c) = self.exact.get(name) {
            return c.clone();
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(c) = self.wildcard.get(parent)
        {
            return c.clone();
        }
        self.default.clone()
    }
}

/// File identity used to notice a change: modification time and length.
type Stamp = Vec<Option<(SystemTime, u64)>>;

/// A listener's certificate resolver, reloadable.
#[derive(Debug)]
pub struct CertStore {
    sources: Vec<CertSource>,
    current: ArcSwap<CertSet>,
    stamp: std::sync::Mutex<Stamp>,
    /// Successful reloads, for tests and `/metrics`.
    pub reloads: std::sync::atomic::AtomicU64,
}

fn stamp_of(sources: &[CertSource]) -> Stamp {
    sources
        .iter()
        .flat_map(|s| [&s.cert, &s.key])
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads one certificate; the error is `(which field, error)`.
/// A loaded certificate and the names it serves.
type Loaded = (Arc<CertifiedKey>, Vec<String>);

fn load_one(s: &CertSource) -> Result<Loaded, (&'static str, TlsError)> {
    let parse = |path: &Path, e: &dyn std::fmt::Display| TlsError::Parse {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let chain = meshwire_tls::certs_from_pem(&read(&s.cert).map_err(|e| ("cert", e))?)
        .map_err(|e| ("cert", parse(&s.cert, &e)))?;
    let Some(leaf) = chain.first() else {
        return Err(("cert", parse(&s.cert, &"no certificate in the file")));
    };
    let names = if s.server_names.is_empty() {
        dns_names(leaf).map_err(|e| ("cert", parse(&s.cert, &e)))?
    } else {
        s.server_names
            .iter()
            .map(|n| n.to_ascii_lowercase())
            .collect()
    };
    if names.is_empty() {
        return Err(("server_names", TlsError::NoNames));
    }
    let key = meshwire_tls::key_from_pem(&read(&s.key).map_err(|e| ("key", e))?)
        .map_err(|e| ("key", parse(&s.key, &e)))?;
    let ck = CertifiedKey::from_der(chain, key, &meshwire_tls::provider())
        .map_err(|e| ("key", TlsError::Key(e)))?;
    Ok((Arc::new(ck), names))
}

fn dns_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    Ok(cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Builds a set from every source; the error names the source's index and field.
fn load_set(sources: &[CertSource]) -> Result<CertSet, (usize, &'static str, TlsError)> {
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    let mut default = None;
    for (i, s) in sources.iter().enumerate() {
        let (ck, names) = load_one(s).map_err(|(f, e)| (i, f, e))?;
        for n in names {
            match n.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_owned()),
                None => exact.entry(n),
            }
            .or_insert_with(|| ck.clone());
        }
        default.get_or_insert(ck);
    }
    let default = default.ok_or((0, "certificates", TlsError::NoNames))?;
    Ok(CertSet {
        exact,
        wildcard,
        default,
    })
}

impl CertStore {
    /// Loads every certificate now; an error names the certificate's index
    /// and field (`cert`, `key`, `server_names`).
    pub fn load(sources: Vec<CertSource>) -> Result<Arc<Self>, (usize, &'static str, TlsError)> {
        let stamp = stamp_of(&sources);
        let set = load_set(&sources)?;
        Ok(Arc::new(Self {
            sources,
            current: ArcSwap::from_pointee(set),
            stamp: std::sync::Mutex::new(stamp),
            reloads: Default::default(),
        }))
    }

    pub fn current(&self) -> Arc<CertSet> {
        self.current.load_full()
    }

    /// Reloads when a file's modification time or size changed. A set that
    /// fails to load is not installed (the old one keeps serving) and is
    /// tried again at the next change.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp_of(&self.sources);
        {
            let mut seen = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        match load_set(&self.sources) {
            Ok(set) => {
                self.current.store(Arc::new(set));
                self.reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    certificates = self.sources.len(),
                    "gateway certificates reloaded"
                );
                true
            }
            Err((i, field, e)) => {
                tracing::warn!(certificate = i, field, error = %e, "gateway certificate reload failed; keeping the current ones");
                false
            }
        }
    }

    /// The listener's TLS config: TLS 1.2 and/or 1.3, ALPN h2 and http/1.1,
    /// no client certificate, certificates from this store.
    pub fn server_config(
        self: &Arc<Self>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(meshwire_tls::provider())
            .with_protocol_versions(versions)
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(str::to_ascii_lowercase);
        Some(self.current.load().pick(sni.as_deref()))
    }
}

/// Polls the stores' files every `every` until `stop` (a bounded poll: one
/// `stat` per file and tick, files are few).
pub fn watch(stores: Vec<Arc<CertStore>>, every: Duration, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            for s in &stores {
                // A stat and, rarely, a parse: off the async workers.
                let s = s.clone();
                let _ = tokio::task::spawn_blocking(move || s.reload_if_changed()).await;
            }
        }
    });
}

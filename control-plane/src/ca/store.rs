//! The CA on disk: opening it (generating a root on first start, or loading
//! the user's CA), roots as `<data-dir>/ca/roots/<fingerprint>.{crt,key}`,
//! the signing root's fingerprint in `signing`, and the published trust
//! bundle (`bundle.pem`, and the watch channel sidecars' streams follow).

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use meshwire_tls::{SpiffeId, TrustBundle};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

use super::{
    BACKDATE, BundleState, Ca, CaConfig, CaError, MIN_CERT_LIFETIME, ROOT_LIFETIME, Root, Signing,
    State, UserCa, random_bytes,
};

pub(super) fn file_err(path: &Path, e: impl std::fmt::Display) -> CaError {
    CaError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| file_err(path, e))
}

/// Writes `data` to `path` atomically (temp file, fsync, rename), `0600` if private.
pub(super) fn write_atomic(path: &Path, data: &[u8], private: bool) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(&tmp).map_err(|e| file_err(&tmp, e))?;
    f.write_all(data).map_err(|e| file_err(&tmp, e))?;
    f.sync_all().map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

pub(super) fn new_root(trust_domain: &str) -> Result<(CertificateDer<'static>, KeyPair), CaError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::OrganizationName, "Meshwire");
    let stamp = hex::encode(random_bytes::<4>()?);
    p.distinguished_name.push(
        DnType::CommonName,
        format!("Meshwire root {trust_domain} {stamp}"),
    );
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    p.not_before = (now - BACKDATE).into();
    p.not_after = (now + ROOT_LIFETIME).into();
    p.serial_number = Some(SerialNumber::from_slice(&random_bytes::<16>()?));
    let cert = p.self_signed(&key)?;
    Ok((cert.der().clone(), key))
}

impl Ca {
    /// Loads the CA from `<data_dir>/ca`, generating a root on first start
    /// (or takes the user's CA).
    pub fn open(data_dir: &Path, cfg: &CaConfig) -> Result<Arc<Self>, CaError> {
        Self::open_with(data_dir, cfg, None)
    }

    /// Loads the CA shared by the replicas on etcd (see [`super::shared`]):
    /// roots and tokens from etcd (the user's CA still from its files),
    /// generating and storing a root if there is none. Blocks on etcd: call
    /// it from a blocking thread.
    pub fn open_shared(
        data_dir: &Path,
        cfg: &CaConfig,
        shared: super::shared::Shared,
    ) -> Result<Arc<Self>, CaError> {
        Self::open_with(data_dir, cfg, Some(shared))
    }

    fn open_with(
        data_dir: &Path,
        cfg: &CaConfig,
        shared: Option<super::shared::Shared>,
    ) -> Result<Arc<Self>, CaError> {
        SpiffeId::for_service(&cfg.trust_domain, "default", "x").map_err(|_| {
            CaError::InvalidArgument(format!(
                "--trust-domain {:?}: must be lowercase letters, digits, '-', '.', '_'",
                cfg.trust_domain
            ))
        })?;
        if cfg.cert_lifetime < MIN_CERT_LIFETIME {
            return Err(CaError::InvalidArgument(format!(
                "--cert-lifetime {:?}: must be at least {:?}",
                cfg.cert_lifetime, MIN_CERT_LIFETIME
            )));
        }
        let dir = data_dir.join("ca");
        std::fs::create_dir_all(dir.join("roots")).map_err(|e| file_err(&dir, e))?;
        let (state, user_managed) = match (&cfg.user_ca, &shared) {
            (Some(u), _) => (Self::load_user(u)?, true),
            (None, Some(sh)) => (sh.load_or_generate(&cfg.trust_domain)?, false),
            (None, None) => (Self::load_or_generate(&dir, &cfg.trust_domain)?, false),
        };
        // On etcd the tokens are read there, one at a time.
        let tokens = match shared {
            Some(_) => Default::default(),
            None => super::tokens::load(&dir)?,
        };
        let bundle = Self::bundle_state(&state)?;
        let (bundle_tx, _) = watch::channel(Arc::new(bundle));
        let ca = Arc::new(Self {
            dir,
            trust_domain: cfg.trust_domain.clone(),
            lifetime: cfg.cert_lifetime,
            user_managed,
            state: Mutex::new(state),
            tokens: Mutex::new(tokens),
            bundle_tx,
            shared,
        });
        ca.write_bundle()?;
        tracing::info!(
            trust_domain = %ca.trust_domain,
            signing = %ca.bundle().signing_fingerprint,
            roots = ca.bundle().fingerprints.len(),
            user_managed,
            on_etcd = ca.shared.is_some(),
            "certificate authority ready"
        );
        Ok(ca)
    }

    fn load_user(u: &UserCa) -> Result<State, CaError> {
        let cert_pem = read(&u.cert)?;
        let key_pem = read(&u.key)?;
        let cert = meshwire_tls::certs_from_pem(&cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| file_err(&u.cert, "no certificate"))?;
        let info = meshwire_tls::cert_info(&cert)?;
        if !info.is_ca {
            return Err(file_err(&u.cert, "not a CA certificate"));
        }
        let key = KeyPair::from_pem(&key_pem).map_err(|e| file_err(&u.key, e))?;
        // The key must belong to the certificate.
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&cert).map_err(|e| file_err(&u.cert, e))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(file_err(&u.key, "does not match --ca-cert"));
        }
        let bundle_pem = match &u.bundle {
            Some(b) => read(b)?,
            None => cert_pem.clone(),
        };
        let bundle_certs = meshwire_tls::certs_from_pem(&bundle_pem)?;
        let fp = meshwire_tls::fingerprint(&cert);
        let is_root = bundle_certs
            .iter()
            .any(|r| meshwire_tls::fingerprint(r) == fp);
        if !is_root && u.bundle.is_none() {
            return Err(file_err(
                &u.cert,
                "not self-signed: give the roots it chains to with --ca-bundle",
            ));
        }
        let mut roots = Vec::new();
        for der in bundle_certs {
            roots.push(Root {
                info: meshwire_tls::cert_info(&der)?,
                der,
                key: None,
                generated: false,
            });
        }
        if roots.is_empty() {
            return Err(CaError::Identity(meshwire_tls::IdentityError::EmptyBundle));
        }
        let signing = Signing {
            fingerprint: if is_root {
                fp
            } else {
                // Which root the intermediate chains to is for the bundle to
                // say; renewals are keyed on the intermediate itself.
                meshwire_tls::fingerprint(&cert)
            },
            chain_tail: if is_root {
                Vec::new()
            } else {
                vec![cert.clone()]
            },
            der: cert,
        };
        Ok(State {
            roots,
            signing,
            user_key: Some(key),
            version: 1,
        })
    }

    fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<State, CaError> {
        let roots_dir = dir.join("roots");
        let mut roots = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(&roots_dir)
            .map_err(|e| file_err(&roots_dir, e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "crt"))
            .collect();
        entries.sort();
        for path in entries {
            let der = meshwire_tls::certs_from_pem(&read(&path)?)?
                .into_iter()
                .next()
                .ok_or_else(|| file_err(&path, "no certificate"))?;
            let key_path = path.with_extension("key");
            let key = match std::fs::read_to_string(&key_path) {
                Ok(pem) => Some(KeyPair::from_pem(&pem).map_err(|e| file_err(&key_path, e))?),
                Err(_) => None,
            };
            roots.push(Root {
                info: meshwire_tls::cert_info(&der)?,
                der,
                key,
                generated: true,
            });
        }
        let signing_path = dir.join("signing");
        let signing_fp = match std::fs::read_to_string(&signing_path) {
            Ok(s) => Some(s.trim().to_owned()),
            Err(_) => None,
        };
        if roots.is_empty() {
            let (der, key) = new_root(trust_domain)?;
            let root = Self::persist_root(dir, der, key)?;
            write_atomic(&signing_path, root.info.fingerprint.as_bytes(), false)?;
            tracing::info!(fingerprint = %root.info.fingerprint, "generated the mesh root CA");
            let signing = Signing {
                fingerprint: root.info.fingerprint.clone(),
                der: root.der.clone(),
                chain_tail: Vec::new(),
            };
            return Ok(State {
                roots: vec![root],
                signing,
                user_key: None,
                version: 1,
            });
        }
        let signing_fp = signing_fp.ok_or_else(|| file_err(&signing_path, "missing"))?;
        let root = roots
            .iter()
            .find(|r| r.info.fingerprint == signing_fp && r.key.is_some())
            .ok_or_else(|| file_err(&signing_path, "names no root with a key"))?;
        let signing = Signing {
            fingerprint: signing_fp,
            der: root.der.clone(),
            chain_tail: Vec::new(),
        };
        Ok(State {
            roots,
            signing,
            user_key: None,
            version: 1,
        })
    }

    pub(super) fn persist_root(
        dir: &Path,
        der: CertificateDer<'static>,
        key: KeyPair,
    ) -> Result<Root, CaError> {
        let info = meshwire_tls::cert_info(&der)?;
        let base = dir.join("roots").join(&info.fingerprint);
        write_atomic(
            &base.with_extension("key"),
            key.serialize_pem().as_bytes(),
            true,
        )?;
        write_atomic(
            &base.with_extension("crt"),
            meshwire_tls::to_pem("CERTIFICATE", &der).as_bytes(),
            false,
        )?;
        Ok(Root {
            der,
            info,
            key: Some(key),
            generated: true,
        })
    }

    fn bundle_state(st: &State) -> Result<BundleState, CaError> {
        // The signing root first: clients that only look at the first root
        // during bootstrap pick the right one.
        let mut roots: Vec<&Root> = st.roots.iter().collect();
        roots.sort_by_key(|r| r.info.fingerprint != st.signing.fingerprint);
        let bundle = TrustBundle::new(roots.iter().map(|r| r.der.clone()).collect())?;
        Ok(BundleState {
            fingerprints: bundle.fingerprints(),
            bundle,
            signing_fingerprint: st.signing.fingerprint.clone(),
            version: st.version,
        })
    }

    pub(super) fn publish(&self, st: &State) -> Result<(), CaError> {
        let b = Self::bundle_state(st)?;
        self.bundle_tx.send_replace(Arc::new(b));
        self.write_bundle()
    }

    fn write_bundle(&self) -> Result<(), CaError> {
        let pem = self.bundle().bundle.to_pem();
        write_atomic(&self.dir.join("bundle.pem"), pem.as_bytes(), false)
    }
}

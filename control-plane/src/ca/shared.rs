//! The CA shared by control-plane replicas on etcd (`--etcd`): every replica
//! signs with the same root, trusts the same bundle and honours the same
//! join tokens, each used once across all of them.
//!
//! Keys under the store's prefix (see `crate::store::etcd`):
//! - `ca/state` → JSON [`StateRecord`]: a version, the signing root's
//!   fingerprint and every root — its certificate, and its private key
//!   sealed with AES-256-GCM under the key every replica is given
//!   (`--etcd-encryption-key-file`), the root's fingerprint as associated
//!   data (a sealed key moved to another root does not open). One key, so a
//!   rotation step is one compare-and-swap on its mod revision. A CA from
//!   files (`--ca-cert`/`--ca-key`) is not stored: each replica has the files.
//! - `ca/tokens/<id>` → JSON token record (the secret only as its SHA-256);
//!   spent by a Txn that sets `used_unix` only if the key's mod revision is
//!   still the one read: of two replicas presented the same token at once,
//!   exactly one succeeds.
//! - `ca/housekeeping` → JSON [`Housekeeping`]: written by the leader with
//!   every sweep of expired and used tokens, in the same fenced Txn.
//!
//! ```text
//! meshctl ca add-root ─▶ replica A: new root, key sealed ─▶ CAS ca/state (version + 1)
//!   ─▶ every replica's follow (etcd watch on ca/state) ─▶ open the keys ─▶ publish the
//!      bundle ─▶ WatchTrustBundle streams of its sidecars; its serving certificate follows
//! ```
//!
//! The CA's operations already run on blocking threads (key generation,
//! signing, file writes); their etcd calls are blocked on there
//! ([`tokio::runtime::Handle::block_on`]) rather than making the CA async.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::KeyPair;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Ca, CaError, Root, Signing, State, random_bytes, unix};
use crate::store::etcd::LeaderOp;
use crate::store::{EtcdKv, StoreError};

pub(super) const STATE_KEY: &str = "ca/state";
pub(super) const TOKENS: &str = "ca/tokens/";
pub const HOUSEKEEPING_KEY: &str = "ca/housekeeping";
/// How often the leader sweeps expired and used join tokens by default.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

// === sealing ===

/// The key that seals the roots' private keys in etcd: 32 bytes, given to
/// every replica as 64 hex digits (`openssl rand -hex 32`).
pub struct SealKey(LessSafeKey);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// From 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text.trim())
            .map_err(|_| "must be 64 hex digits (openssl rand -hex 32)".to_owned())?;
        if bytes.len() != 32 {
            return Err(format!(
                "must be 64 hex digits (32 bytes), got {} bytes",
                bytes.len()
            ));
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| "not an AES-256 key")?;
        Ok(Self(LessSafeKey::new(key)))
    }

    /// Reads [`Self::from_hex`] from a file; the error names the flag.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--etcd-encryption-key-file {}: {e}", path.display()))?;
        Self::from_hex(&text)
            .map_err(|e| format!("--etcd-encryption-key-file {}: {e}", path.display()))
    }

    /// `hex(nonce ‖ ciphertext ‖ tag)`; a random nonce per seal.
    fn seal(&self, aad: &str, plain: &[u8]) -> Result<String, CaError> {
        let nonce = random_bytes::<NONCE_LEN>()?;
        let mut buf = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .map_err(|_| CaError::Rcgen("sealing a root key failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(hex::encode(out))
    }

    fn open(&self, aad: &str, sealed: &str) -> Result<Vec<u8>, CaError> {
        let wrong = || {
            CaError::FailedPrecondition(format!(
                "the key of root {aad} in etcd does not open with this --etcd-encryption-key-file: every replica needs the same key"
            ))
        };
        let mut buf = hex::decode(sealed).map_err(|_| wrong())?;
        if buf.len() < NONCE_LEN {
            return Err(wrong());
        }
        let mut sealed = buf.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&buf).map_err(|_| wrong())?;
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut sealed)
            .map_err(|_| wrong())?;
        Ok(plain.to_vec())
    }
}

// === records ===

/// The CA's state as stored in `ca/state`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StateRecord {
    version: u64,
    signing: String,
    roots: Vec<RootRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RootRecord {
    cert_pem: String,
    /// The private key (PKCS#8 PEM), sealed; see [`SealKey`].
    key_sealed: String,
}

/// What the leader's last sweep did (`ca/housekeeping`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Housekeeping {
    /// The leader that swept.
    pub leader: String,
    /// The leader key's create revision: one per term of leadership.
    pub term: i64,
    pub at_unix: u64,
    /// Join tokens deleted (expired, or used).
    pub removed: usize,
}

// === the shared CA ===

/// What a CA on etcd needs: the keys, the sealing key (not for a CA from
/// files) and the runtime its etcd calls are made on.
#[derive(Debug)]
pub struct Shared {
    kv: EtcdKv,
    seal: Option<Arc<SealKey>>,
    rt: tokio::runtime::Handle,
}

impl Shared {
    pub fn new(kv: EtcdKv, seal: Option<Arc<SealKey>>, rt: tokio::runtime::Handle) -> Self {
        Self { kv, seal, rt }
    }

    /// Runs one etcd call from a blocking thread.
    pub(super) fn block<T>(
        &self,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, CaError> {
        self.rt.block_on(f).map_err(CaError::Store)
    }

    pub(super) fn kv(&self) -> &EtcdKv {
        &self.kv
    }

    fn seal_key(&self) -> Result<&Arc<SealKey>, CaError> {
        self.seal.as_ref().ok_or_else(|| {
            CaError::FailedPrecondition(
                "a CA on etcd needs --etcd-encryption-key-file (or --ca-cert/--ca-key)".into(),
            )
        })
    }

    fn encode(&self, st: &State) -> Result<Vec<u8>, CaError> {
        let seal = self.seal_key()?;
        let mut roots = Vec::with_capacity(st.roots.len());
        for r in &st.roots {
            let key = r.key.as_ref().ok_or_else(|| {
                CaError::FailedPrecondition(format!("root {} has no key", r.info.fingerprint))
            })?;
            roots.push(RootRecord {
                cert_pem: meshwire_tls::to_pem("CERTIFICATE", &r.der),
                key_sealed: seal.seal(&r.info.fingerprint, key.serialize_pem().as_bytes())?,
            });
        }
        let rec = StateRecord {
            version: st.version,
            signing: st.signing.fingerprint.clone(),
            roots,
        };
        serde_json::to_vec(&rec).map_err(|e| CaError::Rcgen(format!("encoding the CA state: {e}")))
    }

    fn decode(&self, value: &[u8]) -> Result<State, CaError> {
        let corrupt = |e: String| CaError::FailedPrecondition(format!("{STATE_KEY} in etcd: {e}"));
        let rec: StateRecord = serde_json::from_slice(value).map_err(|e| corrupt(e.to_string()))?;
        let seal = self.seal_key()?;
        let mut roots = Vec::with_capacity(rec.roots.len());
        for r in rec.roots {
            let der = meshwire_tls::certs_from_pem(&r.cert_pem)?
                .into_iter()
                .next()
                .ok_or_else(|| corrupt("a root without a certificate".into()))?;
            let info = meshwire_tls::cert_info(&der)?;
            let pem = seal.open(&info.fingerprint, &r.key_sealed)?;
            let key = KeyPair::from_pem(&String::from_utf8_lossy(&pem))
                .map_err(|e| corrupt(format!("root {}: {e}", info.fingerprint)))?;
            roots.push(Root {
                der,
                info,
                key: Some(key),
                generated: true,
            });
        }
        let root = roots
            .iter()
            .find(|r| r.info.fingerprint == rec.signing)
            .ok_or_else(|| {
                corrupt(format!(
                    "signing root {} is not among the roots",
                    rec.signing
                ))
            })?;
        let signing = Signing {
            fingerprint: rec.signing.clone(),
            der: root.der.clone(),
            chain_tail: Vec::new(),
        };
        Ok(State {
            roots,
            signing,
            user_key: None,
            version: rec.version,
        })
    }

    /// The stored state, or a new root stored as the first one (of replicas
    /// starting together, the first to create the key wins; the others read it).
    pub(super) fn load_or_generate(&self, trust_domain: &str) -> Result<State, CaError> {
        loop {
            if let Some(v) = self.block(self.kv.get(STATE_KEY))? {
                return self.decode(&v.value);
            }
            let (der, key) = super::store::new_root(trust_domain)?;
            let info = meshwire_tls::cert_info(&der)?;
            let st = State {
                signing: Signing {
                    fingerprint: info.fingerprint.clone(),
                    der: der.clone(),
                    chain_tail: Vec::new(),
                },
                roots: vec![Root {
                    der,
                    info,
                    key: Some(key),
                    generated: true,
                }],
                user_key: None,
                version: 1,
            };
            let value = self.encode(&st)?;
            if self.block(self.kv.put_if(STATE_KEY, value, 0))? {
                tracing::info!(fingerprint = %st.signing.fingerprint, "generated the mesh root CA (stored in etcd, key sealed)");
                return Ok(st);
            }
            // Another replica stored one first: use that.
        }
    }
}

/// A rotation step, applied to the state read from etcd.
pub(super) enum Step {
    /// Trust a new root (its certificate, its key as PEM).
    Add(rustls::pki_types::CertificateDer<'static>, String),
    Activate(String),
    Remove(String),
}

impl Ca {
    /// One rotation step on the shared state: read, apply, compare-and-swap;
    /// re-read and apply again if another replica wrote in between.
    pub(super) fn rotate_shared(&self, sh: &Shared, step: &Step) -> Result<String, CaError> {
        loop {
            let cur = sh.block(sh.kv.get(STATE_KEY))?.ok_or_else(|| {
                CaError::FailedPrecondition(format!("{STATE_KEY} is missing in etcd"))
            })?;
            let mut st = sh.decode(&cur.value)?;
            let fp = match step {
                Step::Add(der, key_pem) => {
                    let info = meshwire_tls::cert_info(der)?;
                    let key = KeyPair::from_pem(key_pem)?;
                    let fp = info.fingerprint.clone();
                    st.roots.push(Root {
                        der: der.clone(),
                        info,
                        key: Some(key),
                        generated: true,
                    });
                    fp
                }
                Step::Activate(prefix) => {
                    let root = Self::find(&st, prefix)?;
                    let fp = root.info.fingerprint.clone();
                    if fp == st.signing.fingerprint {
                        self.install(st)?;
                        return Ok(fp);
                    }
                    st.signing = Signing {
                        fingerprint: fp.clone(),
                        der: root.der.clone(),
                        chain_tail: Vec::new(),
                    };
                    fp
                }
                Step::Remove(prefix) => {
                    let fp = Self::find(&st, prefix)?.info.fingerprint.clone();
                    if fp == st.signing.fingerprint {
                        return Err(CaError::FailedPrecondition(format!(
                            "root {fp} signs new certificates; activate another root first"
                        )));
                    }
                    st.roots.retain(|r| r.info.fingerprint != fp);
                    fp
                }
            };
            st.version += 1;
            let value = sh.encode(&st)?;
            if sh.block(sh.kv.put_if(STATE_KEY, value, cur.mod_revision))? {
                self.install(st)?;
                return Ok(fp);
            }
            tracing::debug!(
                "CA state changed by another replica meanwhile; applying the step again"
            );
        }
    }

    /// Takes `st` if it is newer than what we hold, and publishes it.
    pub(super) fn install(&self, st: State) -> Result<bool, CaError> {
        let mut cur = self.lock();
        if st.version <= cur.version {
            return Ok(false);
        }
        *cur = st;
        self.publish(&cur)?;
        tracing::info!(
            version = cur.version,
            signing = %cur.signing.fingerprint,
            roots = cur.roots.len(),
            "CA state applied"
        );
        Ok(true)
    }

    pub(super) fn shared(&self) -> Option<&Shared> {
        self.shared.as_ref()
    }
}

/// Follows `ca/state` in etcd: every replica's rotation reaches this one's
/// trust bundle (and so its sidecars and its serving certificate). Nothing
/// for a CA from files or on the embedded store. Ends on `shutdown`.
pub async fn follow(ca: Arc<Ca>, shutdown: CancellationToken) {
    let Some(sh) = ca.shared() else { return };
    if ca.user_managed {
        return;
    }
    let mut rx = sh.kv.follow_key(STATE_KEY);
    loop {
        let v = tokio::select! {
            () = shutdown.cancelled() => return,
            v = rx.recv() => match v { Some(v) => v, None => return },
        };
        let Some(v) = v else {
            tracing::error!("{STATE_KEY} was deleted from etcd; keeping the CA state we have");
            continue;
        };
        let ca2 = ca.clone();
        let r = tokio::task::spawn_blocking(move || {
            let sh = ca2.shared().expect("a shared CA");
            let st = sh.decode(&v.value)?;
            ca2.install(st)
        })
        .await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot use the CA state from etcd; keeping ours")
            }
            Err(e) => tracing::error!(error = %e, "CA state task failed"),
        }
    }
}

/// The leader's periodic CA work: every `every`, while this replica holds
/// the leader key, delete expired and used join tokens and record the sweep
/// in `ca/housekeeping`, in one Txn fenced on the leader key (a replica that
/// lost its lease without noticing yet is refused by etcd). Nothing on the
/// embedded store. Ends on `shutdown`.
pub async fn housekeeping(ca: Arc<Ca>, every: Duration, shutdown: CancellationToken) {
    let Some(sh) = ca.shared() else { return };
    let leadership = sh.kv.leadership();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(lead) = leadership.borrow().clone() else {
            continue;
        };
        match sweep(&sh.kv, &lead).await {
            Ok(removed) if removed.is_empty() => {
                tracing::debug!(
                    term = lead.create_revision,
                    "join tokens swept: none to remove"
                );
            }
            Ok(removed) => tracing::info!(
                term = lead.create_revision,
                removed = removed.len(),
                token_ids = %removed.join(","),
                "join tokens swept"
            ),
            Err(StoreError::NotLeader) => tracing::warn!(
                term = lead.create_revision,
                "leader-only write refused by etcd: this replica no longer holds the leader key (fenced)"
            ),
            Err(e) => tracing::warn!(error = %e, "join token sweep failed; next time"),
        }
    }
}

async fn sweep(kv: &EtcdKv, lead: &crate::store::Leadership) -> Result<Vec<String>, StoreError> {
    let now = unix(SystemTime::now());
    let tokens = kv.list(TOKENS).await?;
    let mut removed = Vec::new();
    let mut ops = Vec::new();
    for (id, v) in tokens {
        let done = match serde_json::from_slice::<super::tokens::TokenRecord>(&v.value) {
            Ok(t) => t.used_unix.is_some() || t.expires_unix <= now,
            // Unreadable: of no use to anyone.
            Err(_) => true,
        };
        if done {
            ops.push(LeaderOp::Delete(format!("{TOKENS}{id}")));
            removed.push(id);
        }
    }
    let record = Housekeeping {
        leader: lead.replica.clone(),
        term: lead.create_revision,
        at_unix: now,
        removed: removed.len(),
    };
    ops.push(LeaderOp::Put(
        HOUSEKEEPING_KEY.into(),
        serde_json::to_vec(&record).expect("records serialize"),
    ));
    kv.txn_as_leader(lead, &ops).await?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_with_their_key_and_root() {
        let k = SealKey::from_hex(&"ab".repeat(32)).unwrap();
        let sealed = k.seal("fp1", b"-----BEGIN PRIVATE KEY-----").unwrap();
        assert!(!sealed.contains("PRIVATE"));
        assert_eq!(
            k.open("fp1", &sealed).unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        // Moved to another root: refused.
        assert!(k.open("fp2", &sealed).is_err());
        // Another key: refused, naming the flag.
        let other = SealKey::from_hex(&"cd".repeat(32)).unwrap();
        let e = other.open("fp1", &sealed).unwrap_err().to_string();
        assert!(e.contains("--etcd-encryption-key-file"), "{e}");
        assert!(SealKey::from_hex("abcd").is_err());
        assert!(SealKey::from_hex("zz").is_err());
    }
}

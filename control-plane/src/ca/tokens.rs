//! Join tokens: `mwjt.<id>.<secret>`, single use, bound to one SPIFFE ID,
//! stored as a hash in `<data-dir>/ca/tokens.json` (fsync before a
//! certificate is signed for one), or on etcd as `ca/tokens/<id>`, spent by
//! a compare-and-swap on the key's mod revision so that a token presented
//! to several replicas at once is honoured by exactly one.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use meshwire_tls::SpiffeId;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::shared::{Shared, TOKENS};
use super::store::{file_err, write_atomic};
use super::{Ca, CaError, MAX_TOKEN_TTL, random_bytes, unix};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct TokenRecord {
    sha256: String,
    spiffe_id: String,
    service: String,
    pub(super) expires_unix: u64,
    #[serde(default)]
    pub(super) used_unix: Option<u64>,
}

/// The tokens file of the CA directory `dir` (none yet: no tokens).
pub(super) fn load(dir: &Path) -> Result<BTreeMap<String, TokenRecord>, CaError> {
    let path = dir.join("tokens.json");
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| file_err(&path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(file_err(&path, e)),
    }
}

impl Ca {
    /// A new single-use token for `service` in `namespace`.
    pub fn create_token(
        &self,
        namespace: &str,
        service: &str,
        ttl: Duration,
    ) -> Result<(String, SpiffeId, SystemTime), CaError> {
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(CaError::InvalidArgument(format!(
                "ttl: must be between 1s and {}, got {}",
                humantime::format_duration(MAX_TOKEN_TTL),
                humantime::format_duration(ttl)
            )));
        }
        let id = self.spiffe_id(namespace, service)?;
        let token_id = hex::encode(random_bytes::<8>()?);
        let secret = hex::encode(random_bytes::<24>()?);
        let token = format!("mwjt.{token_id}.{secret}");
        let expires = SystemTime::now() + ttl;
        let record = TokenRecord {
            sha256: hex::encode(sha2::Sha256::digest(secret.as_bytes())),
            spiffe_id: id.to_string(),
            service: service.to_owned(),
            expires_unix: unix(expires),
            used_unix: None,
        };
        if let Some(sh) = self.shared() {
            let json = serde_json::to_vec(&record)
                .map_err(|e| CaError::Rcgen(format!("encoding a token: {e}")))?;
            if !sh.block(sh.kv().put_if(&format!("{TOKENS}{token_id}"), json, 0))? {
                return Err(CaError::Rcgen(format!(
                    "token id {token_id} already exists"
                )));
            }
            tracing::info!(spiffe_id = %id, token_id, ttl = ?ttl, "join token created (etcd)");
            return Ok((token, id, expires));
        }
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let now = unix(SystemTime::now());
        // Forget tokens that can no longer be used, so the file stays small.
        tokens.retain(|_, t| t.used_unix.is_none() && t.expires_unix > now);
        tokens.insert(token_id.clone(), record);
        self.save_tokens(&tokens)?;
        tracing::info!(spiffe_id = %id, token_id, ttl = ?ttl, "join token created");
        Ok((token, id, expires))
    }

    pub(super) fn consume_token(&self, token: &str) -> Result<SpiffeId, CaError> {
        let mut parts = token.trim().splitn(3, '.');
        let (Some("mwjt"), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(CaError::BadToken);
        };
        if let Some(sh) = self.shared() {
            return self.consume_shared(sh, id, secret);
        }
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let rec = tokens.get_mut(id).ok_or(CaError::BadToken)?;
        let hash = hex::encode(sha2::Sha256::digest(secret.as_bytes()));
        let now = unix(SystemTime::now());
        if !constant_time_eq(hash.as_bytes(), rec.sha256.as_bytes())
            || rec.used_unix.is_some()
            || rec.expires_unix <= now
        {
            tracing::warn!(
                token_id = id,
                "refused a join token (wrong, used or expired)"
            );
            return Err(CaError::BadToken);
        }
        rec.used_unix = Some(now);
        let spiffe = SpiffeId::parse(&rec.spiffe_id)?;
        // Durable before the certificate exists: a crash cannot make it reusable.
        self.save_tokens(&tokens)?;
        Ok(spiffe)
    }

    /// Reads the token's record, checks it, then marks it used only if
    /// nobody wrote it since the read (Txn on its mod revision): the loser
    /// of a race between replicas gets [`CaError::BadToken`].
    fn consume_shared(&self, sh: &Shared, id: &str, secret: &str) -> Result<SpiffeId, CaError> {
        let key = format!("{TOKENS}{id}");
        let Some(v) = sh.block(sh.kv().get(&key))? else {
            tracing::warn!(token_id = id, "refused a join token (unknown)");
            return Err(CaError::BadToken);
        };
        let mut rec: TokenRecord =
            serde_json::from_slice(&v.value).map_err(|_| CaError::BadToken)?;
        let hash = hex::encode(sha2::Sha256::digest(secret.as_bytes()));
        let now = unix(SystemTime::now());
        if !constant_time_eq(hash.as_bytes(), rec.sha256.as_bytes())
            || rec.used_unix.is_some()
            || rec.expires_unix <= now
        {
            tracing::warn!(
                token_id = id,
                "refused a join token (wrong, used or expired)"
            );
            return Err(CaError::BadToken);
        }
        rec.used_unix = Some(now);
        let spiffe = SpiffeId::parse(&rec.spiffe_id)?;
        let json = serde_json::to_vec(&rec)
            .map_err(|e| CaError::Rcgen(format!("encoding a token: {e}")))?;
        // Durable in etcd before the certificate exists.
        if !sh.block(sh.kv().put_if(&key, json, v.mod_revision))? {
            tracing::warn!(
                token_id = id,
                "refused a join token (spent at the same moment through another replica)"
            );
            return Err(CaError::BadToken);
        }
        Ok(spiffe)
    }

    fn save_tokens(&self, tokens: &BTreeMap<String, TokenRecord>) -> Result<(), CaError> {
        let json = serde_json::to_vec_pretty(tokens)
            .map_err(|e| CaError::Rcgen(format!("encoding tokens: {e}")))?;
        write_atomic(&self.dir.join("tokens.json"), &json, true)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::ca::CaConfig;
    use crate::ca::tests::csr;

    #[test]
    fn tokens_bind_identity_and_are_single_use() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open(dir.path(), &CaConfig::default()).unwrap();
        let (token, id, _) = ca
            .create_token("default", "a", Duration::from_secs(60))
            .unwrap();
        let issued = ca.issue_with_token(&token, &csr()).unwrap();
        let info = meshwire_tls::cert_info(&issued.chain[0]).unwrap();
        // The CSR asked for another identity; the token decides.
        assert_eq!(info.spiffe_id.as_deref(), Some(id.as_str()));
        assert_eq!(id.as_str(), "spiffe://meshwire.local/ns/default/sa/a");
        assert!(matches!(
            ca.issue_with_token(&token, &csr()),
            Err(CaError::BadToken)
        ));
        // A tampered secret is refused too.
        let (t2, _, _) = ca
            .create_token("default", "a", Duration::from_secs(60))
            .unwrap();
        let bad = format!("{}0", &t2[..t2.len() - 1]);
        let bad = if bad == t2 {
            format!("{}1", &t2[..t2.len() - 1])
        } else {
            bad
        };
        assert!(matches!(
            ca.issue_with_token(&bad, &csr()),
            Err(CaError::BadToken)
        ));
        // A garbage CSR does not spend the token.
        assert!(matches!(
            ca.issue_with_token(&t2, "nope"),
            Err(CaError::BadCsr(_))
        ));
        ca.issue_with_token(&t2, &csr()).unwrap();
    }
}

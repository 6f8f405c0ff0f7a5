//! Root rotation without an outage: [`Ca::add_root`] (trusted everywhere,
//! not signing), [`Ca::activate`] (signs; sidecars renew early), then
//! [`Ca::remove_root`] of the old one. Only for roots the control plane
//! generated.

use super::shared::Step;
use super::store::{file_err, new_root, write_atomic};
use super::{Ca, CaError, Root, Signing, State};

impl Ca {
    fn generated_only(&self) -> Result<(), CaError> {
        if self.user_managed {
            Err(CaError::FailedPrecondition(
                "the CA was supplied with --ca-cert/--ca-key; rotate it by restarting with new files"
                    .into(),
            ))
        } else {
            Ok(())
        }
    }

    pub(super) fn find<'s>(st: &'s State, prefix: &str) -> Result<&'s Root, CaError> {
        let prefix = prefix.trim().to_ascii_lowercase();
        if prefix.len() < 4 {
            return Err(CaError::InvalidArgument(format!(
                "fingerprint {prefix:?}: give at least 4 hex digits"
            )));
        }
        let mut m = st
            .roots
            .iter()
            .filter(|r| r.info.fingerprint.starts_with(&prefix));
        match (m.next(), m.next()) {
            (Some(r), None) => Ok(r),
            (None, _) => Err(CaError::UnknownRoot(prefix)),
            (Some(_), Some(_)) => Err(CaError::AmbiguousRoot(prefix)),
        }
    }

    /// Generates a root and trusts it (it does not sign yet).
    pub fn add_root(&self) -> Result<String, CaError> {
        self.generated_only()?;
        let (der, key) = new_root(&self.trust_domain)?;
        if let Some(sh) = self.shared() {
            let fp = self.rotate_shared(sh, &Step::Add(der, key.serialize_pem()))?;
            tracing::info!(fingerprint = %fp, "root added to the trust bundle");
            return Ok(fp);
        }
        let root = Self::persist_root(&self.dir, der, key)?;
        let fp = root.info.fingerprint.clone();
        let mut st = self.lock();
        st.roots.push(root);
        st.version += 1;
        self.publish(&st)?;
        tracing::info!(fingerprint = %fp, "root added to the trust bundle");
        Ok(fp)
    }

    /// Makes a trusted root the signing one.
    pub fn activate(&self, prefix: &str) -> Result<String, CaError> {
        self.generated_only()?;
        if let Some(sh) = self.shared() {
            let fp = self.rotate_shared(sh, &Step::Activate(prefix.to_owned()))?;
            tracing::info!(fingerprint = %fp, "root now signs new certificates");
            return Ok(fp);
        }
        let mut st = self.lock();
        let root = Self::find(&st, prefix)?;
        if root.key.is_none() {
            return Err(CaError::FailedPrecondition(format!(
                "root {} has no key here",
                root.info.fingerprint
            )));
        }
        let fp = root.info.fingerprint.clone();
        if fp == st.signing.fingerprint {
            return Ok(fp);
        }
        write_atomic(&self.dir.join("signing"), fp.as_bytes(), false)?;
        st.signing = Signing {
            fingerprint: fp.clone(),
            der: root.der.clone(),
            chain_tail: Vec::new(),
        };
        st.version += 1;
        self.publish(&st)?;
        tracing::info!(fingerprint = %fp, "root now signs new certificates");
        Ok(fp)
    }

    /// Removes a root that does not sign from the trust bundle.
    pub fn remove_root(&self, prefix: &str) -> Result<String, CaError> {
        self.generated_only()?;
        if let Some(sh) = self.shared() {
            let fp = self.rotate_shared(sh, &Step::Remove(prefix.to_owned()))?;
            tracing::info!(fingerprint = %fp, "root removed from the trust bundle");
            return Ok(fp);
        }
        let mut st = self.lock();
        let fp = Self::find(&st, prefix)?.info.fingerprint.clone();
        if fp == st.signing.fingerprint {
            return Err(CaError::FailedPrecondition(format!(
                "root {fp} signs new certificates; activate another root first"
            )));
        }
        let base = self.dir.join("roots").join(&fp);
        for ext in ["crt", "key"] {
            let p = base.with_extension(ext);
            if let Err(e) = std::fs::remove_file(&p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(file_err(&p, e));
            }
        }
        st.roots.retain(|r| r.info.fingerprint != fp);
        st.version += 1;
        self.publish(&st)?;
        tracing::info!(fingerprint = %fp, "root removed from the trust bundle");
        Ok(fp)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use meshwire_tls::TrustBundle;

    use crate::ca::tests::csr;
    use crate::ca::{Ca, CaConfig};

    #[test]
    fn state_survives_a_restart_and_rotation_keeps_old_roots_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open(dir.path(), &CaConfig::default()).unwrap();
        let first = ca.bundle().signing_fingerprint.clone();
        let (token, _, _) = ca
            .create_token("default", "a", Duration::from_secs(60))
            .unwrap();
        drop(ca);
        let ca = Ca::open(dir.path(), &CaConfig::default()).unwrap();
        assert_eq!(ca.bundle().signing_fingerprint, first);
        ca.issue_with_token(&token, &csr()).unwrap();

        let second = ca.add_root().unwrap();
        assert_eq!(ca.bundle().fingerprints.len(), 2);
        assert_eq!(ca.bundle().signing_fingerprint, first);
        assert!(ca.remove_root(&first).is_err(), "the signing root stays");
        ca.activate(&second[..8]).unwrap();
        let b = ca.bundle();
        assert_eq!(b.signing_fingerprint, second);
        assert_eq!(b.fingerprints[0], second, "signing root first");
        ca.remove_root(&first).unwrap();
        drop(ca);
        let ca = Ca::open(dir.path(), &CaConfig::default()).unwrap();
        assert_eq!(ca.bundle().fingerprints, vec![second.clone()]);
        let id = ca.spiffe_id("default", "a").unwrap();
        let issued = ca.renew(&id, &csr()).unwrap();
        let bundle =
            TrustBundle::from_pem(&std::fs::read_to_string(ca.bundle_file()).unwrap()).unwrap();
        assert_eq!(bundle.fingerprints(), vec![second]);
        assert!(!issued.chain.is_empty());
    }
}

//! Signing: workload certificates (for a join token, or renewing the
//! identity of a valid client certificate), the control plane's serving
//! certificate and admin client certificates.

use std::time::{Duration, SystemTime};

use meshwire_tls::{Credentials, SpiffeId};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::PrivateKeyDer;

use super::{
    ADMIN_SERVICE, BACKDATE, CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE, Ca, CaError, Issued,
    random_bytes, unix,
};

/// The key types a CSR may have, for error messages.
const SUPPORTED_KEYS: &str = "ECDSA P-256 or P-384 (SHA-256/384), Ed25519, or RSA of 2048 to 8192 bits (PKCS#1 v1.5 with SHA-256/384/512, or PSS)";

/// Parses `csr_pem` and checks it is signed by its own key, saying what is
/// wrong when it is not: not a CSR, a key type or signature algorithm we
/// do not verify (naming those we do), an RSA key under 2048 bits, or a
/// signature that does not verify.
fn check_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, CaError> {
    use x509_parser::prelude::FromDer;
    let bad = |m: String| CaError::BadCsr(m);
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).map_err(|_| {
        bad("not a PEM certificate request (-----BEGIN CERTIFICATE REQUEST-----)".into())
    })?;
    let (_, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| bad(format!("not a PKCS#10 certificate request: {e}")))?;
    if let Err(e) = req.verify_signature() {
        let spki = &req.certification_request_info.subject_pki;
        let rsa_bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(k)) => Some(k.key_size()),
            _ => None,
        };
        return Err(bad(match (e, rsa_bits) {
            (_, Some(bits)) if bits < 2048 => {
                format!(
                    "an RSA key of {bits} bits is too small (at least 2048); supported: {SUPPORTED_KEYS}"
                )
            }
            (x509_parser::error::X509Error::SignatureUnsupportedAlgorithm, _) => format!(
                "the CSR's key or signature algorithm ({}) is not supported; supported: {SUPPORTED_KEYS}",
                req.signature_algorithm.algorithm
            ),
            _ => "the CSR's signature does not verify with its own public key".into(),
        }));
    }
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        bad(format!(
            "{e} (signature algorithm {}); supported: {SUPPORTED_KEYS}",
            req.signature_algorithm.algorithm
        ))
    })
}

impl Ca {
    /// Signs a certificate for `id` with the public key of `csr_pem`.
    fn sign(&self, csr_pem: &str, id: &SpiffeId, lifetime: Duration) -> Result<Issued, CaError> {
        let csr = check_csr(csr_pem)?;
        self.sign_key(&csr.public_key, id, &[], lifetime)
    }

    /// Signs a leaf for `id` (and DNS/IP `names`) over `public_key`.
    fn sign_key(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        id: &SpiffeId,
        names: &[String],
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let mut p = CertificateParams::new(names.to_vec())?;
        p.subject_alt_names.push(SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::InvalidArgument(e.to_string()))?,
        ));
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "Meshwire");
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        p.not_before = (now - BACKDATE).into();
        p.not_after = (now + lifetime).into();
        p.serial_number = Some(SerialNumber::from_slice(&random_bytes::<16>()?));
        let st = self.lock();
        let key = match &st.user_key {
            Some(k) => k,
            None => st
                .roots
                .iter()
                .find(|r| r.info.fingerprint == st.signing.fingerprint)
                .and_then(|r| r.key.as_ref())
                .ok_or_else(|| CaError::FailedPrecondition("the signing root has no key".into()))?,
        };
        let issuer = Issuer::from_ca_cert_der(&st.signing.der, key)?;
        let cert = p.signed_by(public_key, &issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(st.signing.chain_tail.iter().cloned());
        drop(st);
        let info = meshwire_tls::cert_info(&chain[0])?;
        Ok(Issued {
            chain,
            spiffe_id: id.clone(),
            not_before: info.not_before,
            not_after: info.not_after,
            serial: info.serial,
        })
    }

    /// A workload certificate for a join token (consumed, durably, first).
    pub fn issue_with_token(&self, token: &str, csr_pem: &str) -> Result<Issued, CaError> {
        // Check the CSR before spending the token on it.
        check_csr(csr_pem)?;
        let id = self.consume_token(token)?;
        let issued = self.sign(csr_pem, &id, self.lifetime)?;
        tracing::info!(
            spiffe_id = %issued.spiffe_id,
            serial = %issued.serial,
            not_after = unix(issued.not_after),
            how = "join-token",
            "certificate issued"
        );
        Ok(issued)
    }

    /// A new certificate for the identity a valid client certificate carries.
    /// Workload identities only: the control plane's own namespace
    /// (`meshwire-system`: the admin and control-plane identities) is
    /// refused, so an admin certificate ends at its not-after and cannot
    /// renew itself forever; a new one comes from `meshwire-control-plane
    /// admin-cert` on the control plane's host.
    pub fn renew(&self, id: &SpiffeId, csr_pem: &str) -> Result<Issued, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::InvalidArgument(format!(
                "{id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        let system = format!(
            "spiffe://{}/ns/{CONTROL_PLANE_NAMESPACE}/",
            self.trust_domain
        );
        if id.as_str().starts_with(&system) {
            return Err(CaError::PermissionDenied(format!(
                "{id} is not renewed through Renew (admin and control-plane certificates end at their not-after); make a new admin certificate with `meshwire-control-plane admin-cert` on the control plane's host"
            )));
        }
        let issued = self.sign(csr_pem, id, self.lifetime)?;
        tracing::info!(
            spiffe_id = %issued.spiffe_id,
            serial = %issued.serial,
            not_after = unix(issued.not_after),
            how = "renewal",
            "certificate issued"
        );
        Ok(issued)
    }

    /// The control plane's own credentials: a fresh key, signed by the
    /// signing root, with the given DNS/IP names beside its SPIFFE ID (the
    /// mesh checks only the SPIFFE ID; stock clients such as Envoy may check
    /// a name). The signing root goes last in the chain, so a client that
    /// pins its fingerprint finds it.
    pub fn serving_credentials(&self, names: &[String]) -> Result<Credentials, CaError> {
        let key = KeyPair::generate()?;
        let id = self.spiffe_id(CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE)?;
        let issued = self.sign_key(&key, &id, names, self.lifetime)?;
        let mut chain = issued.chain;
        chain.push(self.lock().signing.der.clone());
        let key = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| CaError::Rcgen(e.to_string()))?;
        Ok(Credentials { chain, key })
    }

    /// An admin client certificate (for meshctl with `--cert`), with its key.
    pub fn admin_credentials(&self, lifetime: Duration) -> Result<(String, String), CaError> {
        let key = KeyPair::generate()?;
        let csr = CertificateParams::new(Vec::<String>::new())?
            .serialize_request(&key)?
            .pem()?;
        let id = self.spiffe_id(CONTROL_PLANE_NAMESPACE, ADMIN_SERVICE)?;
        let issued = self.sign(&csr, &id, lifetime)?;
        tracing::info!(spiffe_id = %id, serial = %issued.serial, how = "admin", "certificate issued");
        let chain: String = issued
            .chain
            .iter()
            .map(|c| meshwire_tls::to_pem("CERTIFICATE", c))
            .collect();
        Ok((chain, key.serialize_pem()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CaConfig;

    /// RSA CSRs made by `openssl req -new -newkey rsa:BITS -subj /CN=rsa`.
    const RSA_2048: &str = include_str!("testdata/rsa2048.csr");
    const RSA_1024: &str = include_str!("testdata/rsa1024.csr");

    /// RSA (2048 bits and more) is signed like ECDSA; a key too small, a
    /// tampered signature and garbage are refused saying which and what is
    /// supported.
    #[test]
    fn rsa_csrs_are_signed_and_bad_ones_refused_saying_why() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open(dir.path(), &CaConfig::default()).unwrap();
        let id = ca.spiffe_id("default", "rsa").unwrap();
        let issued = ca.renew(&id, RSA_2048).expect("an RSA-2048 CSR is signed");
        let info = meshwire_tls::cert_info(&issued.chain[0]).unwrap();
        assert_eq!(info.spiffe_id.as_deref(), Some(id.as_str()));

        let msg = |r: Result<Issued, CaError>| match r {
            Err(CaError::BadCsr(m)) => m,
            other => panic!("{other:?}"),
        };
        let small = msg(ca.renew(&id, RSA_1024));
        assert!(
            small.contains("1024 bits") && small.contains("at least 2048"),
            "{small}"
        );
        assert!(small.contains("Ed25519"), "{small}");
        // One byte of the signature (the end of the DER) flipped.
        let (_, pem) = x509_parser::pem::parse_x509_pem(RSA_2048.as_bytes()).unwrap();
        let mut der = pem.contents.clone();
        let last = der.len() - 1;
        der[last] ^= 1;
        let tampered = meshwire_tls::to_pem("CERTIFICATE REQUEST", &der);
        let bad = msg(ca.renew(&id, &tampered));
        assert!(bad.contains("does not verify"), "{bad}");
        let garbage = msg(ca.renew(&id, "nope"));
        assert!(
            garbage.contains("not a PEM certificate request"),
            "{garbage}"
        );
    }

    /// An admin certificate cannot renew itself (nor can anything else in
    /// the control plane's namespace); workloads can.
    #[test]
    fn admin_identities_are_not_renewed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open(dir.path(), &CaConfig::default()).unwrap();
        for service in [ADMIN_SERVICE, CONTROL_PLANE_SERVICE] {
            let id = ca.spiffe_id(CONTROL_PLANE_NAMESPACE, service).unwrap();
            match ca.renew(&id, RSA_2048) {
                Err(CaError::PermissionDenied(m)) => assert!(m.contains("admin-cert"), "{m}"),
                other => panic!("{service}: {other:?}"),
            }
        }
        let web = ca.spiffe_id("default", "web").unwrap();
        ca.renew(&web, RSA_2048).expect("a workload renews");
    }
}

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

impl Ca {
    /// Signs a certificate for `id` with the public key of `csr_pem`.
    fn sign(&self, csr_pem: &str, id: &SpiffeId, lifetime: Duration) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
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
        CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
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
    pub fn renew(&self, id: &SpiffeId, csr_pem: &str) -> Result<Issued, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::InvalidArgument(format!(
                "{id} is not in trust domain {}",
                self.trust_domain
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

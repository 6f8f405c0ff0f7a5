//! The admin API's bearer token: generated on first start into
//! `<data-dir>/admin.token` (0600, reused after), or given by the operator
//! (`MESHWIRE_ADMIN_TOKEN`), and checked on every admin call.
//!
//! Over the TLS port, a client certificate with the admin identity
//! (`spiffe://<td>/ns/meshwire-system/sa/admin`, from the mesh CA) stands in
//! for the token. Only the admin service is behind this check: sidecars reach
//! the xDS and Identity services without it.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::{Request, Status};

use crate::tls::TlsConnectInfo;

/// The token file's name inside the data directory.
pub const TOKEN_FILE: &str = "admin.token";

/// Shortest token accepted from the operator.
const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

/// Checks a token's shape: it must fit an HTTP header and not be guessable
/// by its length alone.
pub fn check_token(what: &str, token: &str) -> Result<(), TokenError> {
    let invalid = |reason: &str| TokenError::Invalid {
        what: what.to_owned(),
        reason: reason.to_owned(),
    };
    if token.len() < MIN_TOKEN_LEN {
        return Err(invalid(&format!(
            "must be at least {MIN_TOKEN_LEN} characters"
        )));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "must be printable ASCII without spaces (it is sent in a header)",
        ));
    }
    Ok(())
}

/// Reads `<dir>/admin.token`, creating it (random, mode 0600) if missing.
pub fn load_or_create(dir: &Path) -> Result<String, TokenError> {
    let path = dir.join(TOKEN_FILE);
    let io = |source| TokenError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::File::open(&path) {
        Ok(mut f) => {
            let mode = f.metadata().map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "admin token file is readable by others; chmod 600 it");
            }
            let mut token = String::new();
            f.read_to_string(&mut token).map_err(io)?;
            let token = token.trim().to_owned();
            check_token(&path.display().to_string(), &token)?;
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = generate().map_err(io)?;
            // Written under a temporary name and renamed, so a crash never
            // leaves a half-written token behind.
            let tmp = dir.join(format!("{TOKEN_FILE}.tmp"));
            let _ = std::fs::remove_file(&tmp);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(format!("{token}\n").as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            tracing::info!(path = %path.display(), "admin token generated");
            Ok(token)
        }
        Err(e) => Err(io(e)),
    }
}

/// 32 random bytes from the OS, hex-encoded.
fn generate() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The admin API's request check (a tonic interceptor): the bearer token,
/// or (over TLS) a client certificate with the admin identity.
#[derive(Clone)]
pub struct RequireToken {
    expected: std::sync::Arc<str>,
    admin_id: Option<std::sync::Arc<str>>,
}

impl std::fmt::Debug for RequireToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequireToken(..)")
    }
}

impl RequireToken {
    pub fn new(token: &str) -> Self {
        Self {
            expected: token.into(),
            admin_id: None,
        }
    }

    /// Also admits TLS clients whose certificate carries `admin_id`.
    pub fn with_admin_identity(mut self, admin_id: &str) -> Self {
        self.admin_id = Some(admin_id.into());
        self
    }

    fn check(&self, md: &MetadataMap, tls: Option<&TlsConnectInfo>) -> Result<(), Status> {
        let Some(value) = md.get("authorization") else {
            let peer = tls.and_then(|t| t.peer_id.as_ref());
            return match (peer, &self.admin_id) {
                (Some(p), Some(admin)) if p.as_str() == &**admin => Ok(()),
                (Some(p), Some(admin)) => Err(Status::permission_denied(format!(
                    "client certificate {p} is not the admin identity {admin}; send the admin token or use an admin certificate"
                ))),
                _ => Err(Status::unauthenticated(
                    "missing admin token: send `authorization: Bearer <token>` (meshctl: --token, MESHWIRE_ADMIN_TOKEN or --data-dir) or, over TLS, an admin client certificate",
                )),
            };
        };
        let given = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        if !constant_time_eq(given.trim().as_bytes(), self.expected.as_bytes()) {
            return Err(Status::unauthenticated("invalid admin token"));
        }
        Ok(())
    }
}

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check(req.metadata(), req.extensions().get::<TlsConnectInfo>())
            .inspect_err(|s| {
                let remote = req
                    .extensions()
                    .get::<TlsConnectInfo>()
                    .map(|i| i.remote_addr)
                    .or_else(|| {
                        req.extensions()
                            .get::<crate::net::PlainConnectInfo>()
                            .map(|i| i.remote_addr)
                    });
                tracing::debug!(remote = ?remote, reason = s.message(), "admin call refused");
            })?;
        Ok(req)
    }
}

/// The client side of [`RequireToken`]: adds `authorization: Bearer <token>`
/// (or nothing) to every call of an admin client (meshctl, the demo, the
/// benchmarks, the tests).
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Sends `token`; `None` sends nothing (an admin certificate, or a call
    /// that is to be refused).
    pub fn new(token: Option<&str>) -> Result<Self, BadToken> {
        token
            .map(|t| format!("Bearer {t}").parse().map_err(|_| BadToken))
            .transpose()
            .map(Self)
    }

    /// Sends this `authorization` value as it is (tests send malformed ones).
    pub fn header(value: MetadataValue<Ascii>) -> Self {
        Self(Some(value))
    }
}

/// The admin token cannot travel in a header.
#[derive(Debug, thiserror::Error)]
#[error("the admin token is not printable ASCII")]
pub struct BadToken;

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Compares without stopping at the first difference, so response timing
/// does not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor;

    use super::*;

    #[test]
    fn token_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let t1 = load_or_create(dir.path()).unwrap();
        assert_eq!(t1.len(), 64);
        let meta = std::fs::metadata(dir.path().join(TOKEN_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap(), t1);

        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create(other.path()).unwrap(), t1);

        std::fs::write(dir.path().join(TOKEN_FILE), "short\n").unwrap();
        let e = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("admin.token") && e.contains("at least 16"),
            "{e}"
        );
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let token = "0123456789abcdef0123";
        let mut check = RequireToken::new(token);
        let call = |check: &mut RequireToken, header: Option<&str>| {
            let mut req = Request::new(());
            if let Some(h) = header {
                req.metadata_mut()
                    .insert("authorization", h.parse().unwrap());
            }
            check.call(req).map(|_| ()).map_err(|s| s.code())
        };
        assert_eq!(call(&mut check, Some(&format!("Bearer {token}"))), Ok(()));
        for bad in [None, Some("Bearer nope"), Some(token), Some("Basic abc")] {
            assert_eq!(
                call(&mut check, bad),
                Err(tonic::Code::Unauthenticated),
                "{bad:?}"
            );
        }
        assert!(check_token("t", "has space in it 0123").is_err());
        assert!(check_token("t", token).is_ok());
    }

    #[test]
    fn an_admin_certificate_over_tls_replaces_the_token() {
        let admin = "spiffe://meshwire.local/ns/meshwire-system/sa/admin";
        let mut check = RequireToken::new("0123456789abcdef0123").with_admin_identity(admin);
        let call = |check: &mut RequireToken, peer: Option<&str>| {
            let mut req = Request::new(());
            req.extensions_mut().insert(TlsConnectInfo {
                remote_addr: "127.0.0.1:1".parse().unwrap(),
                peer_id: peer.map(|p| meshwire_tls::SpiffeId::parse(p).unwrap()),
                activity: Default::default(),
            });
            check.call(req).map(|_| ()).map_err(|s| s.code())
        };
        assert_eq!(call(&mut check, Some(admin)), Ok(()));
        assert_eq!(
            call(
                &mut check,
                Some("spiffe://meshwire.local/ns/default/sa/web")
            ),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(call(&mut check, None), Err(tonic::Code::Unauthenticated));
        // Without TLS, the identity does not matter.
        let mut plain = Request::new(());
        plain.metadata_mut().insert("x", "y".parse().unwrap());
        assert_eq!(
            check.call(plain).map(|_| ()).map_err(|s| s.code()),
            Err(tonic::Code::Unauthenticated)
        );
    }
}

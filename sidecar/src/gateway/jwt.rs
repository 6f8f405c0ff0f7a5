//! JWT authentication: bearer tokens verified against a JWKS (RS256, ES256,
//! EdDSA, HS256) from a file or an `http://` URL on loopback (an issuer's
//! sidecar or agent), with issuer, audience and expiry (plus a bounded clock
//! skew) checked by `jsonwebtoken`.
//!
//! A verified token yields the subject and the claims the provider names;
//! the gateway passes them upstream in headers it sets itself (and removes
//! from every request first, so a client cannot send them). A JWKS file is
//! reloaded when it changes, like the certificates; a URL is fetched at
//! start and every `jwks_refresh` (until the first fetch, tokens fail as
//! signed by an unknown key).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a JWKS document: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: no usable key (RS256, ES256, EdDSA or HS256)")]
    NoKeys { path: PathBuf },
    #[error("{url}: {reason}")]
    Fetch { url: String, reason: String },
}

/// Longest JWKS document fetched from a URL.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Why a request's token was refused (the `error_description` of the
/// `WWW-Authenticate` challenge).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm not accepted")]
    Algorithm,
    #[error("no key matches the token")]
    UnknownKey,
    #[error("bad signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong audience")]
    Audience,
    #[error("wrong issuer")]
    Issuer,
    #[error("required claim missing")]
    MissingClaim,
}

const ALGORITHMS: [Algorithm; 4] = [
    Algorithm::RS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
    Algorithm::HS256,
];

/// One key of the JWKS.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The algorithm a JWK is for: its `alg`, else what its key type implies.
fn alg_of(jwk: &Jwk) -> Option<Algorithm> {
    use jsonwebtoken::jwk::{AlgorithmParameters as P, EllipticCurve};
    if let Some(a) = jwk.common.key_algorithm {
        return a.to_string().parse().ok();
    }
    match &jwk.algorithm {
        P::RSA(_) => Some(Algorithm::RS256),
        P::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Some(Algorithm::ES256),
        P::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => Some(Algorithm::EdDSA),
        P::OctetKey(_) => Some(Algorithm::HS256),
        _ => None,
    }
}

fn load_keys(path: &Path) -> Result<Vec<Key>, JwksError> {
    let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_keys(&text, path)
}

/// `path`: where the document came from (a file, or a URL as a path), for errors.
fn parse_keys(text: &str, path: &Path) -> Result<Vec<Key>, JwksError> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| JwksError::Parse {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let Some(alg) = alg_of(jwk).filter(|a| ALGORITHMS.contains(a)) else {
            tracing::warn!(path = %path.display(), kid = ?jwk.common.key_id, "JWKS key skipped: unsupported algorithm");
            continue;
        };
        match DecodingKey::from_jwk(jwk) {
            Ok(key) => keys.push(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            }),
            Err(e) => {
                tracing::warn!(path = %path.display(), kid = ?jwk.common.key_id, error = %e, "JWKS key skipped");
            }
        }
    }
    if keys.is_empty() {
        return Err(JwksError::NoKeys {
            path: path.to_owned(),
        });
    }
    Ok(keys)
}

/// A verified token.
#[derive(Debug, Clone)]
pub struct Verified {
    pub subject: Option<Arc<str>>,
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// One token issuer: where its keys are and what its tokens must say.
#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub clock_skew: Duration,
    /// Where the verified `sub` goes upstream.
    pub subject_header: HeaderName,
    /// Claims passed upstream: `(claim, header)`.
    pub claim_headers: Vec<(String, HeaderName)>,
    /// Pass the `Authorization` header on (off: the token stays at the edge).
    pub forward_token: bool,
    source: KeySource,
    keys: ArcSwap<Vec<Key>>,
    stamp: std::sync::Mutex<Option<(SystemTime, u64)>>,
}

/// Where a provider's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    File(PathBuf),
    /// `http://` on loopback, fetched every `refresh`.
    Url {
        url: http::Uri,
        refresh: Duration,
    },
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Provider {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        issuer: Option<String>,
        audiences: Vec<String>,
        clock_skew: Duration,
        source: KeySource,
        subject_header: HeaderName,
        claim_headers: Vec<(String, HeaderName)>,
        forward_token: bool,
    ) -> Result<Self, JwksError> {
        let (st, keys) = match &source {
            KeySource::File(f) => (stamp(f), load_keys(f)?),
            KeySource::Url { .. } => (None, Vec::new()),
        };
        Ok(Self {
            name,
            issuer,
            audiences,
            clock_skew,
            subject_header,
            claim_headers,
            forward_token,
            source,
            keys: ArcSwap::from_pointee(keys),
            stamp: std::sync::Mutex::new(st),
        })
    }

    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// Fetches the JWKS from its URL and installs it; on error the current
    /// keys stay.
    pub async fn fetch(&self, client: &JwksClient) -> Result<usize, JwksError> {
        use http_body_util::BodyExt;
        let KeySource::Url { url, .. } = &self.source else {
            return Ok(0);
        };
        let err = |reason: String| JwksError::Fetch {
            url: url.to_string(),
            reason,
        };
        let req = http::Request::get(url.clone())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| err(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(err(format!("answered {}", resp.status())));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES);
        let body = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .map_err(|_| err("timed out reading the body".into()))?
            .map_err(|e| err(e.to_string()))?
            .to_bytes();
        let text = std::str::from_utf8(&body).map_err(|e| err(e.to_string()))?;
        let keys = parse_keys(text, Path::new(&url.to_string()))?;
        let n = keys.len();
        self.keys.store(Arc::new(keys));
        Ok(n)
    }

    /// Reloads the JWKS if the file changed; a bad file keeps the old keys.
    pub fn reload_if_changed(&self) -> bool {
        let KeySource::File(file) = &self.source else {
            return false;
        };
        let now = stamp(file);
        {
            let mut seen = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        match load_keys(file) {
            Ok(k) => {
                tracing::info!(provider = %self.name, keys = k.len(), "JWKS reloaded");
                self.keys.store(Arc::new(k));
                true
            }
            Err(e) => {
                tracing::warn!(provider = %self.name, error = %e, "JWKS reload failed; keeping the current keys");
                false
            }
        }
    }

    /// Verifies `token` (the part after `Bearer `).
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        use jsonwebtoken::errors::ErrorKind as K;
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(TokenError::Algorithm);
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.clock_skew.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        match &self.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        let keys = self.keys.load();
        // Only keys made for this algorithm: an RSA public key is never an HMAC secret.
        let mut candidates = keys
            .iter()
            .filter(|k| k.alg == header.alg)
            .filter(|k| header.kid.is_none() || k.kid == header.kid)
            .peekable();
        if candidates.peek().is_none() {
            return Err(TokenError::UnknownKey);
        }
        let mut last = TokenError::Signature;
        for k in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &k.key,
                &validation,
            ) {
                Ok(data) => {
                    let subject = data
                        .claims
                        .get("sub")
                        .and_then(|s| s.as_str())
                        .map(Arc::from);
                    return Ok(Verified {
                        subject,
                        claims: data.claims,
                    });
                }
                Err(e) => {
                    last = match e.kind() {
                        K::InvalidSignature => TokenError::Signature,
                        K::ExpiredSignature => return Err(TokenError::Expired),
                        K::ImmatureSignature => return Err(TokenError::NotYetValid),
                        K::InvalidAudience => return Err(TokenError::Audience),
                        K::InvalidIssuer => return Err(TokenError::Issuer),
                        K::MissingRequiredClaim(_) => return Err(TokenError::MissingClaim),
                        K::InvalidAlgorithm => TokenError::Algorithm,
                        _ => TokenError::Malformed,
                    }
                }
            }
        }
        Err(last)
    }

    /// The headers this provider sets upstream (removed from every request).
    pub fn owned_headers(&self) -> impl Iterator<Item = &HeaderName> {
        std::iter::once(&self.subject_header).chain(self.claim_headers.iter().map(|(_, h)| h))
    }

    /// Sets the subject and chosen claims as upstream headers.
    pub fn set_headers(&self, v: &Verified, headers: &mut HeaderMap) {
        if let Some(sub) = &v.subject
            && let Ok(val) = HeaderValue::from_str(sub)
        {
            headers.insert(self.subject_header.clone(), val);
        }
        for (claim, name) in &self.claim_headers {
            let text = match v.claims.get(claim) {
                None | Some(serde_json::Value::Null) => continue,
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            // A claim a header cannot carry (control characters) is left out.
            if let Ok(val) = HeaderValue::from_str(&text) {
                headers.insert(name.clone(), val);
            }
        }
    }
}

/// The HTTP client of JWKS fetches (plain HTTP: the URL is on loopback).
pub type JwksClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

/// Fetches `p`'s JWKS now and then every refresh period (every second
/// while failing) until `stop`.
pub fn spawn_fetch(p: Arc<Provider>, stop: tokio_util::sync::CancellationToken) {
    let KeySource::Url { refresh, .. } = p.source().clone() else {
        return;
    };
    tokio::spawn(async move {
        let client: JwksClient =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        loop {
            let wait = match p.fetch(&client).await {
                Ok(n) => {
                    tracing::info!(provider = %p.name, keys = n, "JWKS fetched");
                    refresh
                }
                Err(e) => {
                    tracing::warn!(provider = %p.name, error = %e, "JWKS fetch failed; keeping the current keys");
                    Duration::from_secs(1).min(refresh)
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    });
}

/// The bearer token of a request, if any (`Authorization: Bearer <token>`).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

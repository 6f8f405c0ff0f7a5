//! Small HTTP/TCP checks for containers and the demo: health checks
//! (`meshwire-probe`), the echo server's "drain my sidecar first" hook and
//! the load client's wait for its sidecar.
//!
//! Container images for the mesh carry no shell tools (curl, wget), so the
//! health checks of `docker-compose.yml` run `meshwire-probe` instead.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0:?}: write http://HOST:PORT/PATH, tcp://HOST:PORT or file:///PATH")]
    Target(String),
    #[error("{target}: cannot resolve: {source}")]
    Resolve {
        target: String,
        source: std::io::Error,
    },
    #[error("{target}: cannot connect: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("{target}: {reason}")]
    Http { target: String, reason: String },
    #[error("{target}: answered {status}")]
    Status { target: String, status: StatusCode },
    #[error("{target}: no answer within {limit:?}")]
    Timeout { target: String, limit: Duration },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// What to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A GET (or POST) that must answer 2xx.
    Http { host: String, path: String },
    /// A TCP connect that must succeed.
    Tcp { host: String },
    /// A file that must exist and have been written within `max_age`.
    File { path: PathBuf },
}

impl std::str::FromStr for Target {
    type Err = ProbeError;

    fn from_str(s: &str) -> Result<Self, ProbeError> {
        let bad = || ProbeError::Target(s.to_owned());
        if let Some(rest) = s.strip_prefix("http://") {
            let (host, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            if host.is_empty() || !host.contains(':') {
                return Err(bad());
            }
            Ok(Target::Http {
                host: host.to_owned(),
                path: path.to_owned(),
            })
        } else if let Some(host) = s.strip_prefix("tcp://") {
            if host.is_empty() || !host.contains(':') || host.contains('/') {
                return Err(bad());
            }
            Ok(Target::Tcp {
                host: host.to_owned(),
            })
        } else if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad());
            }
            Ok(Target::File { path: path.into() })
        } else {
            Err(bad())
        }
    }
}

async fn connect(host: &str) -> Result<tokio::net::TcpStream, ProbeError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host)
        .await
        .map_err(|source| ProbeError::Resolve {
            target: host.to_owned(),
            source,
        })?
        .collect();
    let mut last = std::io::Error::other("no address");
    for a in addrs {
        match tokio::net::TcpStream::connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(ProbeError::Connect {
        target: host.to_owned(),
        source: last,
    })
}

/// One HTTP/1.1 request with an empty body; returns the status and body.
pub(crate) async fn http(
    method: Method,
    host: &str,
    path: &str,
) -> Result<(StatusCode, String), ProbeError> {
    let err = |reason: String| ProbeError::Http {
        target: format!("http://{host}{path}"),
        reason,
    };
    let stream = connect(host).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| err(e.to_string()))?;
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| err(e.to_string()))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| err(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| err(e.to_string()))?
        .to_bytes();
    conn.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Runs one check, bounded by `limit`; an HTTP check's response body
/// (empty for the others).
pub(crate) async fn check(
    target: &Target,
    limit: Duration,
    max_age: Duration,
) -> Result<String, ProbeError> {
    let name = || match target {
        Target::Http { host, path } => format!("http://{host}{path}"),
        Target::Tcp { host } => format!("tcp://{host}"),
        Target::File { path } => format!("file://{}", path.display()),
    };
    let work = async {
        match target {
            Target::Http { host, path } => {
                let (status, body) = http(Method::GET, host, path).await?;
                if status.is_success() {
                    Ok(body)
                } else {
                    Err(ProbeError::Status {
                        target: name(),
                        status,
                    })
                }
            }
            Target::Tcp { host } => connect(host).await.map(|_| String::new()),
            Target::File { path } => file_fresh(path, max_age).map(|()| String::new()),
        }
    };
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| ProbeError::Timeout {
            target: name(),
            limit,
        })?
}

fn file_fresh(path: &std::path::Path, max_age: Duration) -> Result<(), ProbeError> {
    let err = |reason: String| ProbeError::File {
        path: path.to_owned(),
        reason,
    };
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(|e| err(e.to_string()))?;
    let age = SystemTime::now()
        .duration_since(modified)
        .unwrap_or_default();
    if age > max_age {
        return Err(err(format!(
            "last written {age:?} ago (more than {max_age:?})"
        )));
    }
    Ok(())
}

/// Asks the sidecar whose admin port is `admin` to drain (`POST /drain`)
/// and waits, at most `limit`, until it has finished: its admin port stops
/// answering once every connection it served is closed.
///
/// An app calls this before it stops, so the callers' sidecars move their
/// calls elsewhere while this app still answers those in flight (what a
/// Kubernetes preStop hook does for a pod).
pub async fn drain_sidecar(admin: &str, limit: Duration) -> Result<(), ProbeError> {
    let (status, _) = http(Method::POST, admin, "/drain").await?;
    if !status.is_success() {
        return Err(ProbeError::Status {
            target: format!("http://{admin}/drain"),
            status,
        });
    }
    let deadline = tokio::time::Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        match http(Method::GET, admin, "/live").await {
            Err(ProbeError::Connect { .. } | ProbeError::Http { .. }) => return Ok(()),
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(ProbeError::Timeout {
                    target: format!("http://{admin} (drain)"),
                    limit,
                });
            }
            _ => {}
        }
    }
}

/// Waits, at most `limit`, until `GET http://{admin}/ready` answers 2xx.
pub(crate) async fn wait_ready(admin: &str, limit: Duration) -> Result<(), ProbeError> {
    let target = Target::Http {
        host: admin.to_owned(),
        path: "/ready".into(),
    };
    let deadline = tokio::time::Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        match check(&target, Duration::from_secs(1), Duration::ZERO).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            "http://127.0.0.1:15000/ready".parse::<Target>().unwrap(),
            Target::Http {
                host: "127.0.0.1:15000".into(),
                path: "/ready".into()
            }
        );
        assert_eq!(
            "http://localhost:80".parse::<Target>().unwrap(),
            Target::Http {
                host: "localhost:80".into(),
                path: "/".into()
            }
        );
        assert_eq!(
            "tcp://control-plane:15010".parse::<Target>().unwrap(),
            Target::Tcp {
                host: "control-plane:15010".into()
            }
        );
        assert_eq!(
            "file:///tmp/x".parse::<Target>().unwrap(),
            Target::File {
                path: "/tmp/x".into()
            }
        );
        for bad in [
            "",
            "http://",
            "http://host/ready",
            "tcp://x",
            "ftp://a:1",
            "file://rel",
        ] {
            let e = bad.parse::<Target>().unwrap_err();
            assert!(e.to_string().contains("write http://"), "{bad}: {e}");
        }
    }
}

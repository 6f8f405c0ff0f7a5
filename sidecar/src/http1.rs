//! HTTP/1.1 rules at the edges of the mesh: what an app's HTTP/1.x request
//! must not do before it is turned into an HTTP/2 stream (outbound), and the
//! `x-forwarded-for` / `forwarded` headers the inbound side adds for the
//! caller.
//!
//! hyper already answers malformed requests with 400, oversized heads with
//! 431 and conflicting `Content-Length`s with 400, and closes the connection;
//! what is left here is refused as a bad request (400, `meshwire-error:
//! bad-request`) with the reason.

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue, Request, Version, header};
use meshwire_mesh::Protocol;

use crate::respond::ProxyError;

/// Refuses what cannot be carried safely: request smuggling attempts
/// (`Content-Length` beside `Transfer-Encoding`, several lengths), an
/// HTTP/1.1 `Upgrade` (WebSocket) to a `grpc` service, and HTTP to a `tcp`
/// service.
pub(crate) fn check_request<B>(req: &Request<B>, protocol: Protocol) -> Result<(), ProxyError> {
    if protocol == Protocol::Tcp {
        return Err(ProxyError::BadRequest(
            "the service is protocol tcp: connect to its tcp port instead",
        ));
    }
    if req.version() >= Version::HTTP_2 {
        return Ok(());
    }
    let h = req.headers();
    if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
        return Err(ProxyError::BadRequest(
            "Content-Length together with Transfer-Encoding (refused: request smuggling)",
        ));
    }
    if h.get_all(header::CONTENT_LENGTH).iter().count() > 1 {
        return Err(ProxyError::BadRequest(
            "more than one Content-Length (refused: request smuggling)",
        ));
    }
    if is_upgrade(h) {
        if protocol == Protocol::Grpc {
            return Err(ProxyError::BadRequest(
                "an HTTP/1.1 Upgrade (WebSocket) to a grpc service; declare the service protocol http",
            ));
        }
        if !crate::websocket::is_upgrade(req) {
            return Err(ProxyError::BadRequest(
                "only the websocket HTTP/1.1 Upgrade is carried",
            ));
        }
    }
    Ok(())
}

/// `Connection: upgrade` with an `Upgrade` header.
fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Appends the caller's address to `x-forwarded-for` and `forwarded`
/// (RFC 7239), keeping what earlier proxies wrote.
pub(crate) fn add_forwarded(h: &mut HeaderMap, caller: IpAddr, tls: bool) {
    let ip = caller.to_string();
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
        _ => ip.clone(),
    };
    let node = match caller {
        IpAddr::V4(_) => ip,
        IpAddr::V6(_) => format!("\"[{ip}]\""),
    };
    let proto = if tls { "https" } else { "http" };
    let fwd = match h.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, for={node};proto={proto}"),
        _ => format!("for={node};proto={proto}"),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    if let Ok(v) = HeaderValue::from_str(&fwd) {
        h.insert(header::FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::builder().version(Version::HTTP_11).uri("/x");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn smuggling_and_misrouted_upgrades_are_refused() {
        let cl_te = req(&[("content-length", "5"), ("transfer-encoding", "chunked")]);
        let e = check_request(&cl_te, Protocol::Http).unwrap_err();
        assert!(e.to_string().contains("smuggling"), "{e}");
        let two = req(&[("content-length", "5"), ("content-length", "5")]);
        assert!(check_request(&two, Protocol::Http).is_err());
        let ws = req(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        let e = check_request(&ws, Protocol::Grpc).unwrap_err();
        assert!(e.to_string().contains("grpc service"), "{e}");
        assert!(check_request(&req(&[("content-length", "5")]), Protocol::Http).is_ok());
        let e = check_request(&req(&[]), Protocol::Tcp).unwrap_err();
        assert!(e.to_string().contains("tcp port"), "{e}");
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "10.0.0.1".parse().unwrap(), true);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["forwarded"], "for=10.0.0.1;proto=https");
        add_forwarded(&mut h, "::1".parse().unwrap(), false);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, ::1");
        assert_eq!(
            h["forwarded"],
            "for=10.0.0.1;proto=https, for=\"[::1]\";proto=http"
        );
    }
}

//! gRPC-Web (binary, `application/grpc-web[+proto]`) for browsers: the
//! request goes into the mesh as plain gRPC (its message frames are already
//! gRPC's), and the response's trailers come back as the final
//! length-prefixed frame (flag `0x80`) of the body, as the gRPC-Web
//! protocol says. Trailers-only responses keep their status in the headers,
//! which gRPC-Web clients read too. The base64 `-text` variant is not
//! translated (it gets the route's normal handling).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header};
use http_body::{Body, Frame};

use crate::body::{BodyError, ResponseBody};

const WEB: &[u8] = b"application/grpc-web";

/// Is `headers`' content type binary gRPC-Web?
pub fn is_grpc_web(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(WEB) && !v[WEB.len()..].starts_with(b"-text")
    })
}

/// Rewrites a gRPC-Web request's headers into gRPC's.
pub fn request_to_grpc(headers: &mut HeaderMap) {
    let suffix = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.as_bytes()[WEB.len()..].to_vec())
        .unwrap_or_default();
    let mut ct = b"application/grpc".to_vec();
    ct.extend_from_slice(&suffix);
    if let Ok(v) = HeaderValue::from_bytes(&ct) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    // A browser's CORS-safe header: what the client speaks, not for the service.
    headers.remove("x-grpc-web");
}

/// Rewrites a gRPC response's content type to gRPC-Web's.
pub fn response_to_web(headers: &mut HeaderMap) {
    let suffix = headers
        .get(header::CONTENT_TYPE)
        .filter(|v| v.as_bytes().starts_with(b"application/grpc"))
        .map(|v| v.as_bytes()[b"application/grpc".len()..].to_vec());
    let mut ct = WEB.to_vec();
    ct.extend_from_slice(suffix.as_deref().unwrap_or(b"+proto"));
    if let Ok(v) = HeaderValue::from_bytes(&ct) {
        headers.insert(header::CONTENT_TYPE, v);
    }
}

/// The trailers as gRPC-Web's final frame: `0x80`, length, `name:value\r\n`...
fn trailer_frame(t: &HeaderMap) -> Bytes {
    let mut block = BytesMut::new();
    for (k, v) in t {
        block.put_slice(k.as_str().as_bytes());
        block.put_u8(b':');
        block.put_slice(v.as_bytes());
        block.put_slice(b"\r\n");
    }
    let mut out = BytesMut::with_capacity(5 + block.len());
    out.put_u8(0x80);
    out.put_u32(block.len() as u32);
    out.put_slice(&block);
    out.freeze()
}

/// A gRPC response body whose trailers become gRPC-Web's trailer frame.
#[derive(Debug)]
pub struct WebBody(pub ResponseBody);

impl Body for WebBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.0).poll_frame(cx).map(|f| {
            f.map(|f| {
                f.map(|f| match f.into_trailers() {
                    Ok(t) => Frame::data(trailer_frame(&t)),
                    Err(f) => f,
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_and_the_trailer_frame() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc-web+proto"),
        );
        assert!(is_grpc_web(&h));
        request_to_grpc(&mut h);
        assert_eq!(h[header::CONTENT_TYPE], "application/grpc+proto");
        assert_eq!(h[header::TE], "trailers");
        response_to_web(&mut h);
        assert_eq!(h[header::CONTENT_TYPE], "application/grpc-web+proto");
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc-web-text"),
        );
        assert!(!is_grpc_web(&h), "base64 text is not translated");
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        assert_eq!(
            &trailer_frame(&t)[..],
            b"\x80\x00\x00\x00\x0fgrpc-status:0\r\n"
        );
    }
}

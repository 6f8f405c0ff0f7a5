//! `meshwire-otlp-sink`: an OTLP/gRPC trace collector as a process
//! ([`crate::otlp`]), with what it received on a small HTTP endpoint. The
//! compose end-to-end test runs it in place of Jaeger (no registry to pull
//! Jaeger from there) and reads the spans the sidecars exported.
//!
//! ```text
//! meshwire-otlp-sink --otlp 0.0.0.0:4317 --http 0.0.0.0:16686
//! GET /spans[?trace_id=HEX&service=NAME&limit=N]  JSON list, oldest first:
//!     {trace_id, span_id, parent_span_id, name, service_name, kind, attributes, ...}
//! GET /ready                                       200 once both ports serve
//! ```
//!
//! It keeps the latest `--max-spans` spans (it runs under load for as long as
//! the stack does); `limit` returns the latest N of those that match.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::otlp::Collector;

#[derive(Debug, Parser)]
#[command(
    name = "meshwire-otlp-sink",
    about = "OTLP/gRPC trace collector that serves the spans it received as JSON (GET /spans)"
)]
struct Args {
    /// Address for OTLP/gRPC trace exports.
    #[arg(long, env = "OTLP_SINK_OTLP", default_value = "0.0.0.0:4317")]
    otlp: SocketAddr,
    /// Address of the HTTP endpoint (`GET /spans`, `GET /ready`).
    #[arg(long, env = "OTLP_SINK_HTTP", default_value = "0.0.0.0:16686")]
    http: SocketAddr,
    /// Spans kept; past it the oldest are dropped.
    #[arg(long, env = "OTLP_SINK_MAX_SPANS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_spans: u32,
}

pub fn main() -> ExitCode {
    super::run("meshwire-otlp-sink", serve(Args::parse()))
}

async fn serve(args: Args) -> std::io::Result<()> {
    let otlp = TcpListener::bind(args.otlp).await?;
    let http = TcpListener::bind(args.http).await?;
    let collector = Arc::new(Collector::serve_keeping(otlp, args.max_spans as usize)?);
    tracing::info!(otlp = %collector.addr, http = %http.local_addr()?, max_spans = args.max_spans, "OTLP sink listening");

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let tcp = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            r = http.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors and the like: keep serving once it passes.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::task::yield_now().await;
                    continue;
                }
            },
        };
        let collector = collector.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handle(&collector, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
    tracing::info!(
        received = collector.received(),
        requests = collector.requests(),
        "stopped"
    );
    Ok(())
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut body = body.into();
    body.push('\n');
    reply(status, "text/plain; charset=utf-8", body)
}

fn handle<B>(collector: &Collector, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET");
    }
    match req.uri().path() {
        "/ready" => text(StatusCode::OK, "ready"),
        "/spans" => match SpanQuery::parse(req.uri().query().unwrap_or_default()) {
            Ok(q) => {
                let spans = collector.latest(q.limit, |s| {
                    q.trace_id.as_ref().is_none_or(|t| *t == s.trace_id)
                        && q.service.as_ref().is_none_or(|n| *n == s.service)
                });
                let json: Vec<serde_json::Value> = spans.iter().map(|s| s.to_json()).collect();
                reply(
                    StatusCode::OK,
                    "application/json",
                    serde_json::Value::Array(json).to_string(),
                )
            }
            Err(e) => text(StatusCode::BAD_REQUEST, e),
        },
        _ => text(StatusCode::NOT_FOUND, "not found: GET /spans or /ready"),
    }
}

/// `GET /spans`' query.
#[derive(Debug, PartialEq, Eq)]
struct SpanQuery {
    trace_id: Option<String>,
    service: Option<String>,
    limit: usize,
}

impl SpanQuery {
    fn parse(query: &str) -> Result<SpanQuery, String> {
        let mut q = SpanQuery {
            trace_id: None,
            service: None,
            limit: usize::MAX,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map_err(|_| format!("{k}: not UTF-8 once percent-decoded"))?;
            match k {
                "trace_id" => {
                    if v.len() != 32 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(format!("trace_id {v:?}: write 32 hex digits"));
                    }
                    q.trace_id = Some(v.to_ascii_lowercase());
                }
                "service" => q.service = Some(v.into_owned()),
                "limit" => {
                    q.limit = v
                        .parse()
                        .map_err(|_| format!("limit {v:?}: write a whole number"))?;
                }
                _ => {
                    return Err(format!(
                        "unknown parameter {k:?} (trace_id, service, limit)"
                    ));
                }
            }
        }
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_query() {
        assert_eq!(
            SpanQuery::parse("").unwrap(),
            SpanQuery {
                trace_id: None,
                service: None,
                limit: usize::MAX
            }
        );
        let t = "4BF92F3577B34DA6A3CE929D0E0E4736";
        let q = SpanQuery::parse(&format!("trace_id={t}&service=my%20svc&limit=5")).unwrap();
        assert_eq!(q.trace_id.as_deref(), Some(t.to_ascii_lowercase().as_str()));
        assert_eq!(q.service.as_deref(), Some("my svc"));
        assert_eq!(q.limit, 5);
        assert!(
            SpanQuery::parse("trace_id=abc")
                .unwrap_err()
                .contains("32 hex")
        );
        assert!(SpanQuery::parse("limit=-1").unwrap_err().contains("limit"));
        assert!(SpanQuery::parse("foo=1").unwrap_err().contains("unknown"));
    }
}

//! The gateway's Prometheus metrics, per route, produced at scrape time
//! from the routes' relaxed counters (label values come from the config,
//! never from requests):
//!
//! - `meshwire_gateway_responses_total{route, class}`: responses by status class (`2xx`, ...)
//! - `meshwire_gateway_rejected_total{route, reason}`: requests the gateway answered itself
//! - `meshwire_gateway_response_bytes_total{route}`, `meshwire_gateway_request_seconds_total{route}`
//! - `meshwire_gateway_certificate_reloads_total`

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

use super::{GatewayConfig, REJECTIONS, Routes, tls::CertStore};

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Debug)]
pub struct GatewayCollector {
    routes: Arc<Routes>,
    stores: Vec<Arc<CertStore>>,
}

impl GatewayCollector {
    pub fn new(cfg: &GatewayConfig) -> Self {
        Self {
            routes: cfg.routes.clone(),
            stores: cfg.listeners.iter().map(|l| l.store.clone()).collect(),
        }
    }
}

impl Collector for GatewayCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let routes = &self.routes.routes;
        let mut m = enc.encode_descriptor(
            "meshwire_gateway_responses",
            "Responses the gateway sent, by route and status class",
            None,
            MetricType::Counter,
        )?;
        for r in routes {
            for (i, class) in CLASSES.iter().enumerate() {
                let n = r.stats.responses[i].load(Ordering::Relaxed);
                if n > 0 {
                    let l = [
                        ("route", Cow::Borrowed(&*r.name)),
                        ("class", Cow::Borrowed(*class)),
                    ];
                    ConstCounter::new(n).encode(m.encode_family(&l)?)?;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "meshwire_gateway_rejected",
            "Requests the gateway refused itself, by route and reason",
            None,
            MetricType::Counter,
        )?;
        for r in routes {
            for (i, reason) in REJECTIONS.iter().enumerate() {
                let n = r.stats.rejected[i].load(Ordering::Relaxed);
                if n > 0 {
                    let l = [
                        ("route", Cow::Borrowed(&*r.name)),
                        ("reason", Cow::Borrowed(*reason)),
                    ];
                    ConstCounter::new(n).encode(m.encode_family(&l)?)?;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "meshwire_gateway_response_bytes",
            "Response body bytes sent, by route",
            None,
            MetricType::Counter,
        )?;
        for r in routes {
            let l = [("route", Cow::Borrowed(&*r.name))];
            ConstCounter::new(r.stats.bytes_sent.load(Ordering::Relaxed))
                .encode(m.encode_family(&l)?)?;
        }
        let mut m = enc.encode_descriptor(
            "meshwire_gateway_request_seconds",
            "Time from request head to the end of the response, summed, by route",
            None,
            MetricType::Counter,
        )?;
        for r in routes {
            let l = [("route", Cow::Borrowed(&*r.name))];
            let us = r.stats.duration_us.load(Ordering::Relaxed);
            ConstCounter::new(us as f64 / 1e6).encode(m.encode_family(&l)?)?;
        }
        let reloads: u64 = self
            .stores
            .iter()
            .map(|s| s.reloads.load(Ordering::Relaxed))
            .sum();
        let m = enc.encode_descriptor(
            "meshwire_gateway_certificate_reloads",
            "Certificate sets reloaded from changed files",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(reloads).encode(m)?;
        Ok(())
    }
}

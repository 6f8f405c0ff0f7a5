//! Reading the Prometheus/OpenMetrics text of an admin `/metrics` page.

use std::net::SocketAddr;

use http::StatusCode;
use prometheus_parse::{Sample, Value};

/// One scrape of a `/metrics` page.
#[derive(Debug)]
pub struct Metrics {
    pub text: String,
    samples: Vec<Sample>,
}

/// GETs `http://{admin}/metrics` and parses it.
pub async fn scrape(admin: SocketAddr) -> Metrics {
    let (status, headers, body) = crate::http1_get(admin, "admin", "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(status, StatusCode::OK, "/metrics on {admin}");
    let ct = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
        "content type {ct:?}"
    );
    parse(String::from_utf8(body.to_vec()).expect("UTF-8 metrics"))
}

pub fn parse(text: String) -> Metrics {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let samples = prometheus_parse::Scrape::parse(lines)
        .expect("metrics parse")
        .samples;
    Metrics { text, samples }
}

fn value(s: &Sample) -> f64 {
    match s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        // Histograms are read through their `_bucket`/`_count`/`_sum` series.
        Value::Histogram(_) | Value::Summary(_) => f64::NAN,
    }
}

impl Metrics {
    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
    }

    /// The sum of the matching samples (0 when there are none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(value).sum()
    }

    /// The one matching sample's value; panics if there is not exactly one.
    pub fn one(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let m: Vec<&Sample> = self.matching(name, labels).collect();
        assert_eq!(
            m.len(),
            1,
            "want exactly one {name}{labels:?}, got {m:?} in:\n{}",
            self.text
        );
        value(m[0])
    }

    /// The cumulative buckets `(le, count)` of the one matching histogram.
    pub fn buckets(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let m: Vec<&Sample> = self.matching(name, labels).collect();
        match m.as_slice() {
            [s] => match &s.value {
                Value::Histogram(b) => b.iter().map(|c| (c.less_than, c.count)).collect(),
                other => panic!("{name} is no histogram: {other:?}"),
            },
            _ => panic!("want one histogram {name}{labels:?}, got {m:?}"),
        }
    }

    /// Whether a metric family named `name` is described (`# TYPE name ...`).
    pub fn has_family(&self, name: &str) -> bool {
        self.text.lines().any(|l| {
            l.strip_prefix("# TYPE ")
                .is_some_and(|r| r.split(' ').next() == Some(name))
        })
    }
}

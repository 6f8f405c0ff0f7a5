//! The access log: one JSON object per request, appended to a file by one
//! writer task. Requests hand their line to a bounded queue and never wait:
//! when the writer falls behind, lines are dropped and counted.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Lines waiting for the writer; past it new lines are dropped.
const QUEUE: usize = 4096;

/// One request, as logged.
#[derive(Debug, Default, Serialize)]
pub struct Entry {
    /// RFC 3339, milliseconds, UTC.
    pub time: String,
    /// The client's address (after trusted proxies).
    pub client: String,
    /// The connection's peer.
    pub peer: String,
    /// The verified JWT subject.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    pub method: String,
    pub host: String,
    /// The normalised path (the request's own when it could not be).
    pub path: String,
    pub protocol: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u8>,
    /// Why the gateway answered itself (`rate-limited`, `unauthenticated`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<&'static str>,
    pub bytes_sent: u64,
    pub duration_ms: f64,
    /// The caller's W3C trace id, when it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

#[derive(Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<String>,
    pub dropped: AtomicU64,
}

impl AccessLog {
    /// Opens (appends to) `path` and starts the writer.
    pub async fn open(path: PathBuf) -> std::io::Result<Arc<Self>> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await?;
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        tokio::spawn(async move {
            let mut out = tokio::io::BufWriter::new(file);
            while let Some(line) = rx.recv().await {
                let mut ok = out.write_all(line.as_bytes()).await.is_ok();
                // Whatever else is queued goes in the same write.
                while ok && let Ok(more) = rx.try_recv() {
                    ok = out.write_all(more.as_bytes()).await.is_ok();
                }
                if !ok || out.flush().await.is_err() {
                    tracing::warn!(path = %path.display(), "access log write failed");
                }
            }
        });
        Ok(Arc::new(Self {
            tx,
            dropped: AtomicU64::new(0),
        }))
    }

    pub fn write(&self, e: &Entry) {
        let Ok(mut line) = serde_json::to_string(e) else {
            return;
        };
        line.push('\n');
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

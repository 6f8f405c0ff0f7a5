//! Small pieces the binaries (sidecar, control plane, `meshctl`) share.

use std::time::Duration;

/// Parses a command-line duration (`500ms`, `5s`, `1m`), saying how to write
/// one when it cannot.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 500ms, 5s, 1m)"))
}

/// Resolves on SIGTERM or SIGINT (on Ctrl-C only if the handlers cannot be
/// installed), so a process can stop gracefully.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_or_say_how_to_write_them() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        let err = parse_duration("5 parsecs").unwrap_err();
        assert!(err.ends_with("(write e.g. 500ms, 5s, 1m)"), "{err}");
    }
}

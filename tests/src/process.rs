//! The one harness for every child process a test starts (sidecar, control
//! plane, Envoy): a temp dir of its own, stderr into a log file there, start
//! waiting on a readiness condition with the log in the panic if it exits
//! first, signals, a bounded wait for the exit, and kill on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process of a test; killed on drop if still running.
#[derive(Debug)]
pub struct Process {
    what: &'static str,
    child: Child,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Process {
    /// Starts `cmd` (stdin and stdout closed, stderr into `<dir>/<what>.log`)
    /// with its own temp dir `dir`, then polls `ready` every `every` until it
    /// gives a value. Panics with the log if the process exits first or
    /// `limit` passes.
    pub async fn start<T>(
        what: &'static str,
        mut cmd: Command,
        dir: tempfile::TempDir,
        limit: Duration,
        every: Duration,
        mut ready: impl FnMut(&Path) -> Option<T>,
    ) -> (Process, T) {
        let log = dir.path().join(format!("{what}.log"));
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        let mut p = Process {
            what,
            child,
            log,
            dir,
        };
        let mut tick = tokio::time::interval(every);
        let start = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if let Some(v) = ready(p.dir.path()) {
                return (p, v);
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!(
                    "{what} exited with {status} before it was ready:\n{}",
                    p.log()
                );
            }
            assert!(
                start.elapsed() < limit,
                "{what} was not ready within {limit:?}:\n{}",
                p.log()
            );
        }
    }

    /// The process's temp dir (its addr file, log, configs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends `kill -<sig>` (e.g. `TERM`, `INT`, `KILL`, `STOP`, `CONT`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} {} failed", self.what);
    }

    /// Waits (bounded) for the process to exit and returns its exit code
    /// (`None` if a signal ended it).
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let start = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s.code();
            }
            assert!(
                start.elapsed() < limit,
                "{} still running after {limit:?}:\n{}",
                self.what,
                self.log()
            );
        }
    }

    /// Everything it wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished command (`meshctl`, the control plane's subcommands)
/// printed.
#[derive(Debug)]
pub struct CommandOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to its end off the async workers and collects what it printed.
pub async fn run_command(mut cmd: std::process::Command) -> CommandOut {
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run the command"))
        .await
        .expect("the command's thread");
    CommandOut {
        code: out.status.code().expect("the command exited"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

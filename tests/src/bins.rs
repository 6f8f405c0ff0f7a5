//! The workspace's binaries as the tests run them: the real executables in
//! the target directory next to the test executable (`target/<profile>/`),
//! not test-only copies.
//!
//! `cargo test --workspace` builds them: cargo builds a package's binaries
//! when it builds that package's integration tests, and each package with
//! binaries has one (`tests/cli.rs`). Other invocations
//! (`cargo test -p meshwire-tests`, a test executable run by hand) can leave
//! one missing, or older than a source file it is built from; then the first
//! use runs `$CARGO build --workspace --bins` (same profile and target
//! directory) once per test process, and panics with that command if it fails
//! or leaves a binary behind, so a stale binary is never used silently.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

/// One of the workspace's binaries; `Command::new(SIDECAR)` runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bin(&'static str);

pub const SIDECAR: Bin = Bin("meshwire-sidecar");
pub const CONTROL_PLANE: Bin = Bin("meshwire-control-plane");
pub const MESHCTL: Bin = Bin("meshctl");
pub const DEMO: Bin = Bin("meshwire-demo");
pub const ECHO_SERVER: Bin = Bin("echo-server");
pub const LOAD: Bin = Bin("meshwire-load");
pub const PROBE: Bin = Bin("meshwire-probe");
pub const OTLP_SINK: Bin = Bin("meshwire-otlp-sink");

/// Every binary the tests run.
pub const ALL: [Bin; 8] = [
    SIDECAR,
    CONTROL_PLANE,
    MESHCTL,
    DEMO,
    ECHO_SERVER,
    LOAD,
    PROBE,
    OTLP_SINK,
];

impl Bin {
    /// The file name (as installed, e.g. in the container image).
    pub fn name(self) -> &'static str {
        self.0
    }

    /// The up-to-date executable (built first if missing or stale).
    pub fn path(self) -> &'static Path {
        let paths = PATHS.get_or_init(locate);
        let i = ALL.iter().position(|b| *b == self).expect("listed in ALL");
        &paths[i]
    }
}

impl AsRef<OsStr> for Bin {
    fn as_ref(&self) -> &OsStr {
        self.path().as_os_str()
    }
}

impl AsRef<Path> for Bin {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

static PATHS: OnceLock<Vec<PathBuf>> = OnceLock::new();

/// `<target>/<profile>/`: the test executable lives in its `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.parent()
        .filter(|d| d.file_name() == Some(OsStr::new("deps")))
        .and_then(Path::parent)
        .unwrap_or_else(|| {
            panic!(
                "{} is not in a cargo target directory (<target>/<profile>/deps/): \
                 run the tests with cargo",
                exe.display()
            )
        })
        .to_path_buf()
}

fn locate() -> Vec<PathBuf> {
    let dir = profile_dir();
    let paths: Vec<PathBuf> = ALL.iter().map(|b| dir.join(b.name())).collect();
    let newest_source = newest_source();
    let stale = |p: &PathBuf| match modified(p) {
        None => Some(format!("{} is missing", p.display())),
        Some(t) if t < newest_source.0 => Some(format!(
            "{} is older than {}",
            p.display(),
            newest_source.1.display()
        )),
        Some(_) => None,
    };
    let Some(why) = paths.iter().find_map(stale) else {
        return paths;
    };
    let mut cmd = build_command(&dir);
    eprintln!("meshwire-tests: {why}; running {cmd:?}");
    let ok = cmd.status().is_ok_and(|s| s.success());
    let still = paths.iter().find_map(stale);
    assert!(
        ok && still.is_none(),
        "the workspace's binaries could not be brought up to date ({}); run {cmd:?}, \
         or run the tests with `cargo test --workspace`, which builds them",
        still.unwrap_or(why)
    );
    paths
}

/// `$CARGO build --workspace --bins` into `dir` (`<target>/<profile>`).
fn build_command(dir: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::repo_root())
        .args(["build", "--workspace", "--bins"])
        .env("CARGO_TARGET_DIR", dir.parent().expect("target dir"));
    match dir.file_name().and_then(OsStr::to_str).unwrap_or("debug") {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        profile => {
            cmd.args(["--profile", profile]);
        }
    }
    cmd
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The newest file the binaries are built from: every crate directory of
/// the workspace except `tests/`, and the root manifest and lock file.
fn newest_source() -> (SystemTime, PathBuf) {
    let root = crate::repo_root();
    let mut newest = (SystemTime::UNIX_EPOCH, root.join("Cargo.toml"));
    let mut visit = |p: PathBuf| {
        if let Some(t) = modified(&p)
            && t > newest.0
        {
            newest = (t, p);
        }
    };
    visit(root.join("Cargo.toml"));
    visit(root.join("Cargo.lock"));
    let crates = std::fs::read_dir(&root).expect("read the repo root");
    let mut stack: Vec<PathBuf> = crates
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").is_file() && !p.ends_with("tests"))
        .collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            let hidden = e.file_name().to_string_lossy().starts_with('.');
            match e.file_type() {
                Ok(t) if t.is_dir() && !hidden && e.file_name() != "target" => stack.push(p),
                Ok(t) if t.is_file() => visit(p),
                _ => {}
            }
        }
    }
    newest
}

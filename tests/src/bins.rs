//! The workspace's binaries as the tests run them: the real executables in
//! the target directory next to the test executable (`target/<profile>/`),
//! not test-only copies.
//!
//! `cargo test --workspace` builds them: cargo builds a package's binaries
//! when it builds that package's integration tests, and each package with
//! binaries has one (`tests/cli.rs`). Other invocations
//! (`cargo test -p meshwire-tests`, `--test e2e`, a test executable run by
//! hand) can leave one missing, or older than a file it is built from (as
//! cargo's dep-info file `<bin>.d` lists them); then the first use runs
//! `$CARGO test --workspace --no-run` (same profile and target directory)
//! once per test process. That builds exactly what `cargo test --workspace`
//! builds, with the same features, so no dependency is compiled a second time
//! with other features. It panics with that command if the build fails or
//! leaves a binary stale, so a stale binary is never used silently.

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
    let Some(why) = paths.iter().find_map(|p| stale(p)) else {
        return paths;
    };
    let mut cmd = build_command(&dir);
    eprintln!("meshwire-tests: {why}; running {cmd:?}");
    let ok = cmd.status().is_ok_and(|s| s.success());
    let still = paths.iter().find_map(|p| stale(p));
    assert!(
        ok && still.is_none(),
        "the workspace's binaries could not be brought up to date ({}); run {cmd:?}, \
         or run the tests with `cargo test --workspace`, which builds them",
        still.unwrap_or(why)
    );
    paths
}

/// Why `bin` must be (re)built, if it must: it is missing, or a file of this
/// repository it is built from (as cargo's dep-info `<bin>.d` lists them,
/// plus the root manifest and lock file) is newer than it.
fn stale(bin: &Path) -> Option<String> {
    let Some(built) = modified(bin) else {
        return Some(format!("{} is missing", bin.display()));
    };
    let root = crate::repo_root();
    let dep_info = std::fs::read_to_string(bin.with_extension("d")).unwrap_or_default();
    let sources = dep_info
        .split_once(": ")
        .map_or("", |(_, deps)| deps)
        .split_whitespace()
        .map(PathBuf::from)
        .filter(|p| p.starts_with(&root))
        .chain([root.join("Cargo.toml"), root.join("Cargo.lock")]);
    for src in sources {
        if modified(&src).is_some_and(|t| t > built) {
            return Some(format!("{} is older than {}", bin.display(), src.display()));
        }
    }
    None
}

/// `$CARGO test --workspace --no-run` into `dir` (`<target>/<profile>`): the
/// packages' CLI tests, and so their binaries. (`cargo build --bins`, or
/// selecting only some tests, resolves other features for some dependencies
/// and would compile much of the dependency tree a second time.)
fn build_command(dir: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::repo_root())
        .args(["test", "--workspace", "--no-run"])
        .env("CARGO_TARGET_DIR", dir.parent().expect("target dir"));
    // What cargo set for this test process describes the test package; build
    // scripts (ring's) rerun when such a variable changes, so a build seeing
    // them would compile them again, and again in the next plain cargo run.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if TEST_RUN_VARS.contains(&k.as_ref())
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
        {
            cmd.env_remove(&key);
        }
    }
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

/// Variables cargo sets for a test process (besides `CARGO_PKG_*` and
/// `CARGO_BIN_EXE_*`), not for itself.
const TEST_RUN_VARS: [&str; 9] = [
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_LINKS",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

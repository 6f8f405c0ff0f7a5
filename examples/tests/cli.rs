//! Every example binary rejects a flag it does not know with exit code 2 and
//! an error naming the flag, and describes its flags under `--help`. (Being
//! an integration test of this package also makes `cargo test --workspace`
//! build these binaries, which the end-to-end tests in `tests/` run.)

use std::process::Command;

const BINS: [&str; 7] = [
    env!("CARGO_BIN_EXE_echo-server"),
    env!("CARGO_BIN_EXE_meshwire-bench"),
    env!("CARGO_BIN_EXE_meshwire-demo"),
    env!("CARGO_BIN_EXE_meshwire-load"),
    env!("CARGO_BIN_EXE_meshwire-otlp-sink"),
    env!("CARGO_BIN_EXE_meshwire-probe"),
    env!("CARGO_BIN_EXE_meshwire-xds-bench"),
];

#[test]
fn unknown_flags_are_named_and_help_lists_the_flags() {
    for bin in BINS {
        let out = Command::new(bin)
            .arg("--no-such-flag")
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bin}: {err}");
        assert!(err.contains("--no-such-flag"), "{bin}: {err}");

        let out = Command::new(bin).arg("--help").output().expect("run");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{bin} --help: {help}");
        assert!(
            help.contains("Usage:") && help.contains("--"),
            "{bin}: {help}"
        );
    }
}

//! `meshwire-probe`: the health check of the container images (they carry
//! no curl or wget). Exit 0 if the target is healthy, 1 if not, 2 bad usage.
//!
//! `meshwire-probe http://127.0.0.1:15000/ready`, `meshwire-probe tcp://127.0.0.1:15010`,
//! `meshwire-probe --max-age 5s file:///tmp/meshwire-load.json`,
//! `meshwire-probe --print http://127.0.0.1:15000/certs` (a sidecar's identity).

use std::process::ExitCode;
use std::time::Duration;

use crate::probe::{self, Target};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "meshwire-probe",
    about = "Health check: an HTTP GET that must answer 2xx, a TCP connect, or a recently written file"
)]
struct Args {
    /// `http://HOST:PORT/PATH`, `tcp://HOST:PORT` or `file:///PATH`.
    target: Target,
    /// Give up after this long.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// For `file://`: the file must have been written within this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    max_age: Duration,
    /// For `http://`: print the response body (e.g. a sidecar's `/certs`).
    #[arg(long)]
    print: bool,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshwire-probe: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(probe::check(&args.target, args.timeout, args.max_age)) {
        Ok(body) => {
            if args.print && !body.is_empty() {
                print!("{body}");
                if !body.ends_with('\n') {
                    println!();
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshwire-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

//! `meshctl`: the command-line client of the admin API.
//!
//! ```text
//! meshctl [--server http://127.0.0.1:15010] [--token T | --data-dir DIR] [--output table|json] <command>
//! meshctl --server https://HOST:15012 --ca-bundle bundle.pem [--cert admin.crt --key admin.key] <command>
//!   service create|update NAME [--lb least-request|round-robin|ring-hash|maglev] [--bias B]
//!       [--hash-header NAME]... [--hash-source-ip] [--hash-cookie NAME [--cookie-ttl D]]
//!       [--hash-balance-factor F]   (hash sources in command-line order, first present wins)
//!                              [--connect-timeout 1s] [--request-timeout 5s] [--authority A]
//!                              [--permissive | --no-permissive] [--protocol grpc|http|tcp]
//!       [--max-requests N] [--max-requests-per-endpoint N]     (circuit breakers)
//!       [--retry-attempts N] [--retry-on CODES] [--per-try-timeout D]
//!       [--retry-backoff D] [--retry-backoff-max D] [--retry-budget PCT] [--retry-budget-min N]
//!       [--eject-after N] [--eject-on CODES] [--ejection-time D] [--max-ejection-time D]
//!       [--max-ejection PCT] [--slow-start D]   (each also takes `default`)
//!       [--rate-limit 100/s [--burst N] [--rate-limit-per service|caller|ip]
//!        [--rate-limit-override spiffe://…/sa/x=1000/s]...] [--no-rate-limit]   (inbound, per sidecar)
//!   service delete|get NAME · service list
//!   service policy set NAME --file policy.yaml|json · service policy clear NAME
//!   token create --service NAME [--namespace NS] [--ttl 1h]
//!   ca show · ca bundle · ca add-root · ca activate FP · ca remove-root FP
//!   endpoint add SERVICE ADDR [--weight N] [--zone Z] [--identity ID] [--meta k=v]... [--draining]
//!   endpoint remove|list|weight|drain ...
//!   status · watch
//! ```
//!
//! Over `https://`, the control plane's certificate is verified against the
//! trust bundle (`--ca-bundle`, default `<data-dir>/ca/bundle.pem`) and must
//! carry its identity (`spiffe://<trust-domain>/ns/meshwire-system/sa/control-plane`);
//! a client certificate with the admin identity (`--cert`, `--key`) replaces
//! the token.
//!
//! Output is an aligned table by default and JSON with `--output json` (one
//! object per line for `watch`). Errors are one line on stderr. Exit codes:
//! 0 done, 1 the control plane refused the request (its gRPC status and
//! message are printed), 2 bad usage, 3 the control plane cannot be reached.
//!
//! The parts: `args` (the command line), `client` (connecting, token or
//! client certificate), `commands` (one admin call or a few per command),
//! `output` (tables and JSON).

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod args;
mod client;
mod commands;
mod output;
mod resilience;

use std::process::ExitCode;

use tonic::{Code, Status};

/// Exit codes (see the module docs).
const REFUSED: u8 = 1;
const USAGE: u8 = 2;
const UNREACHABLE: u8 = 3;

/// Why a command failed; each is one line on stderr and an exit code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Refused(Status),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => USAGE,
            Failure::Connect { .. } => UNREACHABLE,
            Failure::Refused(s) if s.code() == Code::Unavailable => UNREACHABLE,
            Failure::Refused(_) => REFUSED,
        }
    }
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Refused(s)
    }
}

/// The canonical (proto) name of a gRPC code.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error with its causes, on one line (tonic's transport errors say
/// little at the top: the cause is in the chain).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let c = c.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = std::error::Error::source(src.expect("checked"));
    }
    s
}

pub fn main() -> ExitCode {
    let cli = match args::parse_cli(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

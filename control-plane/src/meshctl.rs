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

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use meshwire_proto::admin::v1 as pb;
use meshwire_proto::admin::v1::mesh_admin_client::MeshAdminClient;
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Exit codes (see the module docs).
const REFUSED: u8 = 1;
const USAGE: u8 = 2;
const UNREACHABLE: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Manage a Meshwire mesh: services, endpoints, and what the sidecars run",
    after_help = "Exit codes: 0 done, 1 the control plane refused the request, 2 bad usage, 3 cannot reach the control plane."
)]
pub struct Cli {
    /// The control plane's address; several replicas repeated or comma-separated: the
    /// first that answers is used.
    #[arg(
        long,
        env = "MESHCTL_SERVER",
        default_value = "http://127.0.0.1:15010",
        value_delimiter = ',',
        global = true,
        help_heading = "Global options"
    )]
    server: Vec<String>,
    /// The admin token (default: <data-dir>/admin.token).
    #[arg(
        long,
        env = "MESHWIRE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true,
        help_heading = "Global options"
    )]
    token: Option<String>,
    /// The control plane's data directory, to read its admin.token [default: ./meshwire-data].
    #[arg(
        long,
        env = "MESHWIRE_DATA_DIR",
        global = true,
        help_heading = "Global options"
    )]
    data_dir: Option<PathBuf>,
    /// The trust bundle (PEM) that verifies an https:// --server [default: <data-dir>/ca/bundle.pem].
    #[arg(
        long,
        env = "MESHCTL_CA_BUNDLE",
        global = true,
        help_heading = "Global options"
    )]
    ca_bundle: Option<PathBuf>,
    /// A client certificate chain (PEM) for an https:// --server; with the admin identity it replaces the token.
    #[arg(
        long,
        env = "MESHCTL_CERT",
        requires = "key",
        global = true,
        help_heading = "Global options"
    )]
    cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(
        long,
        env = "MESHCTL_KEY",
        requires = "cert",
        global = true,
        help_heading = "Global options"
    )]
    key: Option<PathBuf>,
    /// The mesh's trust domain: an https:// --server must be its control plane.
    #[arg(long, env = "MESHWIRE_TRUST_DOMAIN", default_value = crate::ca::DEFAULT_TRUST_DOMAIN, global = true, help_heading = "Global options")]
    trust_domain: String,
    /// How results are printed.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true, help_heading = "Global options")]
    output: Output,
    /// Time allowed to connect and for each call (not `watch`).
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true, help_heading = "Global options")]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, change, delete and show services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Add, remove, re-weight, drain and list a service's endpoints.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Join tokens: how a sidecar gets its first certificate.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The mesh's certificate authority: roots, trust bundle, root rotation.
    #[command(subcommand)]
    Ca(CaCmd),
    /// The sidecars connected over xDS and what they ACKed.
    Status,
    /// Print every change as it is committed (until Ctrl-C).
    Watch,
}

#[derive(Debug, Subcommand)]
enum ServiceCmd {
    /// Create a service (without endpoints).
    Create {
        name: String,
        #[command(flatten)]
        opts: ServiceOpts,
    },
    /// Change the given settings of a service; the others stay.
    Update {
        name: String,
        #[command(flatten)]
        opts: ServiceOpts,
        /// Remove the request timeout (calls are bounded by the caller's deadline only).
        #[arg(long, conflicts_with = "request_timeout")]
        no_request_timeout: bool,
        /// Remove the :authority rewrite.
        #[arg(long, conflicts_with = "authority")]
        no_authority: bool,
        /// Accept only mutual TLS on the service's inbound ports again.
        #[arg(long, conflicts_with = "permissive")]
        no_permissive: bool,
    },
    /// Delete a service and all its endpoints.
    Delete { name: String },
    /// List every service.
    List,
    /// Show one service and its endpoints.
    Get { name: String },
    /// Who may call a service (authorization policy).
    #[command(subcommand)]
    Policy(PolicyCmd),
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Replace a service's policy with the one in a YAML or JSON file.
    ///
    /// `default_action: allow|deny` and `rules`, each with `action: allow|deny`
    /// and any of `sources` (SPIFFE IDs, `prefix*`), `methods`
    /// (`pkg.Service/Method`, `pkg.Service/*`) and `cidrs` (`10.0.0.0/8`).
    Set {
        name: String,
        /// The policy (YAML or JSON; `-` reads stdin).
        #[arg(long, short = 'f')]
        file: PathBuf,
    },
    /// Remove a service's policy: every mesh identity may call it.
    Clear { name: String },
    /// Print a service's policy.
    Get { name: String },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// A single-use join token for one sidecar of SERVICE (prints the token).
    Create {
        /// The service (must exist) whose identity the token grants.
        #[arg(long)]
        service: String,
        /// The identity's namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// How long the token can be used (at most 30 days).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum CaCmd {
    /// The roots of the trust bundle and which one signs.
    Show,
    /// Print the trust bundle (PEM): give it to sidecars (`--ca-bundle`) and meshctl.
    Bundle,
    /// Root rotation, step 1: add a new root (trusted, not signing yet).
    AddRoot,
    /// Step 2: make a root the signing one (sidecars renew early).
    Activate {
        /// Its fingerprint, or an unambiguous prefix (at least 4 hex digits).
        fingerprint: String,
    },
    /// Step 3: remove an old root from the trust bundle.
    RemoveRoot { fingerprint: String },
}

#[derive(Debug, Args)]
struct ServiceOpts {
    /// Load-balancing policy.
    #[arg(long, value_enum)]
    lb: Option<Lb>,
    /// Least-request only: how hard load steers with unequal weights (0..10, default 2).
    #[arg(long)]
    bias: Option<f64>,
    /// Time allowed to connect to an endpoint (default 1s).
    #[arg(long, value_parser = parse_duration)]
    connect_timeout: Option<Duration>,
    /// Upper bound on a whole call (default: none).
    #[arg(long, value_parser = parse_duration)]
    request_timeout: Option<Duration>,
    /// `:authority` sent upstream instead of the caller's.
    #[arg(long)]
    authority: Option<String>,
    /// Also accept plaintext (non-mTLS) calls on the service's inbound ports.
    #[arg(long)]
    permissive: bool,
    /// What the service's apps speak: grpc (default), http (REST, HTTP/1.1 or h2c) or tcp (opaque bytes).
    #[arg(long, value_enum)]
    protocol: Option<ProtocolArg>,
    /// Ring hash / Maglev: hash calls on this request header (gRPC metadata); repeatable.
    #[arg(long, value_name = "NAME")]
    hash_header: Vec<String>,
    /// Ring hash / Maglev: hash calls on the caller's IP address.
    #[arg(long)]
    hash_source_ip: bool,
    /// Ring hash / Maglev: hash HTTP calls on this cookie; the sidecar sets it when absent.
    #[arg(long, value_name = "NAME")]
    hash_cookie: Option<String>,
    /// Max-Age of the cookie the sidecar sets (default: a session cookie).
    #[arg(long, value_parser = parse_duration, requires = "hash_cookie")]
    cookie_ttl: Option<Duration>,
    /// Ring hash / Maglev: bounded loads, no endpoint above F × its share of calls in flight (F ≥ 1).
    #[arg(long, value_name = "F")]
    hash_balance_factor: Option<f64>,
    /// The hash flags above in command-line order (see [`parse_cli`]).
    #[arg(skip)]
    hash_policy: Vec<pb::HashSource>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProtocolArg {
    Grpc,
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Lb {
    LeastRequest,
    RoundRobin,
    RingHash,
    Maglev,
}

/// Parses the command line, keeping the order of the hash-source flags
/// (which derive alone would lose: the first present source wins).
pub fn parse_cli<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let m = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&m)?;
    if let Some(("service", sm)) = m.subcommand()
        && let Some((_, cm)) = sm.subcommand()
        && let Command::Service(ServiceCmd::Create { opts, .. } | ServiceCmd::Update { opts, .. }) =
            &mut cli.command
    {
        opts.hash_policy = hash_sources(cm);
    }
    Ok(cli)
}

fn hash_sources(m: &ArgMatches) -> Vec<pb::HashSource> {
    use pb::hash_source::Source;
    let mut found: Vec<(usize, Source)> = Vec::new();
    if let (Some(at), Some(names)) = (
        m.indices_of("hash_header"),
        m.get_many::<String>("hash_header"),
    ) {
        found.extend(at.zip(names).map(|(i, n)| (i, Source::Header(n.clone()))));
    }
    if m.get_flag("hash_source_ip")
        && let Some(i) = m.index_of("hash_source_ip")
    {
        found.push((i, Source::SourceIp(true)));
    }
    if let (Some(i), Some(name)) = (
        m.index_of("hash_cookie"),
        m.get_one::<String>("hash_cookie"),
    ) {
        let ttl = m
            .get_one::<Duration>("cookie_ttl")
            .and_then(|t| prost_types::Duration::try_from(*t).ok());
        found.push((
            i,
            Source::Cookie(pb::HashCookie {
                name: name.clone(),
                ttl,
            }),
        ));
    }
    found.sort_by_key(|(i, _)| *i);
    found
        .into_iter()
        .map(|(_, s)| pb::HashSource { source: Some(s) })
        .collect()
}

#[derive(Debug, Subcommand)]
enum EndpointCmd {
    /// Add an endpoint (the address of its sidecar's inbound listener).
    Add {
        /// The service to add it to.
        service: String,
        /// `ip:port` (`[v6]:port`) of the endpoint's sidecar inbound listener.
        address: String,
        /// 1..10000 [default: 1].
        #[arg(long)]
        weight: Option<u32>,
        #[arg(long)]
        zone: Option<String>,
        /// The identity (SPIFFE ID) it must present.
        #[arg(long)]
        identity: Option<String>,
        /// Metadata, `key=value` (repeatable).
        #[arg(long = "meta", value_parser = parse_kv)]
        meta: Vec<(String, String)>,
        /// Add it draining (no new calls).
        #[arg(long)]
        draining: bool,
    },
    /// Remove an endpoint.
    Remove { service: String, address: String },
    /// List a service's endpoints.
    List { service: String },
    /// Set an endpoint's weight (1..10000).
    Weight {
        service: String,
        address: String,
        weight: u32,
    },
    /// Drain an endpoint: no new calls, calls in flight finish.
    Drain {
        service: String,
        address: String,
        /// Put the endpoint back in rotation instead.
        #[arg(long)]
        undo: bool,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 500ms, 5s, 1m)"))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// Why a command failed; each is one line on stderr and an exit code.
#[derive(Debug, thiserror::Error)]
enum Failure {
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
fn chain(e: &dyn std::error::Error) -> String {
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
    let cli = match parse_cli(std::env::args_os()) {
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
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

// === connection ===

#[derive(Debug, Clone)]
struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Client = MeshAdminClient<InterceptedService<Channel, Bearer>>;

/// The token from `--token`/`MESHWIRE_ADMIN_TOKEN`, else from the data
/// directory's `admin.token` (if there is one: without a token the server's
/// answer says what is missing).
fn token(cli: &Cli) -> Result<Option<String>, Failure> {
    if let Some(t) = cli.token.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(t.trim().to_owned()));
    }
    let (dir, explicit) = match &cli.data_dir {
        Some(d) => (d.clone(), true),
        None => (PathBuf::from("./meshwire-data"), false),
    };
    let path = crate::token_file(&dir);
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(Some(t.trim().to_owned())),
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Failure::Usage(format!(
            "--data-dir: cannot read the admin token {}: {e}",
            path.display()
        ))),
    }
}

/// Connects to the first `--server` that answers.
async fn connect(cli: &Cli) -> Result<Client, Failure> {
    let mut last = None;
    for server in &cli.server {
        match connect_to(cli, server).await {
            Err(e @ Failure::Connect { .. }) => last = Some(e),
            r => return r,
        }
    }
    Err(last.unwrap_or_else(|| Failure::Usage("--server: give at least one".into())))
}

async fn connect_to(cli: &Cli, server_arg: &str) -> Result<Client, Failure> {
    let tls = server_arg.starts_with("https://");
    // An admin certificate replaces the token, unless one is given explicitly.
    let token = if tls && cli.cert.is_some() && cli.token.as_ref().is_none_or(|t| t.is_empty()) {
        None
    } else {
        token(cli)?
    };
    let bearer = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| Failure::Usage("the admin token is not printable ASCII".into()))?,
        ),
        None => None,
    };
    let server = if tls {
        with_default_port(server_arg)?
    } else {
        server_arg.to_owned()
    };
    let endpoint = tonic::transport::Endpoint::from_shared(server)
        .map_err(|e| Failure::Usage(format!("--server {server_arg:?}: {}", chain(&e))))?
        .connect_timeout(cli.timeout);
    let connected = if tls {
        endpoint.connect_with_connector(tls_connector(cli)?).await
    } else {
        if cli.cert.is_some() {
            return Err(Failure::Usage(format!(
                "--cert needs an https:// --server (the control plane's TLS port, default 15012), not {server_arg:?}"
            )));
        }
        endpoint.connect().await
    };
    let channel = connected.map_err(|e| Failure::Connect {
        server: server_arg.to_owned(),
        reason: chain(&e),
    })?;
    Ok(MeshAdminClient::with_interceptor(channel, Bearer(bearer)))
}

/// `https://host` means the TLS port, 15012.
fn with_default_port(server: &str) -> Result<String, Failure> {
    let uri: http::Uri = server
        .parse()
        .map_err(|e| Failure::Usage(format!("--server {server:?}: {e}")))?;
    if uri.port().is_some() {
        return Ok(server.to_owned());
    }
    let host = uri
        .host()
        .ok_or_else(|| Failure::Usage(format!("--server {server:?}: no host")))?;
    Ok(format!("https://{host}:15012"))
}

/// TLS to the control plane: its certificate verified against the trust
/// bundle and carrying the control plane's identity; ours if given.
fn tls_connector(cli: &Cli) -> Result<meshwire_tls::TlsConnector, Failure> {
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("{flag} {}: {e}", path.display())))
    };
    let (bundle_path, flag) = match &cli.ca_bundle {
        Some(p) => (p.clone(), "--ca-bundle"),
        None => {
            let dir = cli
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("./meshwire-data"));
            let p = dir.join("ca").join("bundle.pem");
            if !p.is_file() {
                return Err(Failure::Usage(format!(
                    "an https:// --server needs --ca-bundle FILE (the trust bundle: `meshctl ca bundle` over http, or <data-dir>/ca/bundle.pem); {} does not exist",
                    p.display()
                )));
            }
            (p, "--ca-bundle")
        }
    };
    let bundle = meshwire_tls::TrustBundle::from_pem(&read(flag, &bundle_path)?)
        .map_err(|e| Failure::Usage(format!("{flag} {}: {e}", bundle_path.display())))?;
    let creds = match (&cli.cert, &cli.key) {
        (Some(cert), Some(key)) => {
            let chain = meshwire_tls::certs_from_pem(&read("--cert", cert)?)
                .map_err(|e| Failure::Usage(format!("--cert {}: {e}", cert.display())))?;
            if chain.is_empty() {
                return Err(Failure::Usage(format!(
                    "--cert {}: no certificate in it",
                    cert.display()
                )));
            }
            let key_der = meshwire_tls::key_from_pem(&read("--key", key)?)
                .map_err(|e| Failure::Usage(format!("--key {}: {e}", key.display())))?;
            Some(meshwire_tls::Credentials {
                chain,
                key: key_der,
            })
        }
        _ => None,
    };
    let expect = meshwire_tls::SpiffeId::for_service(
        &cli.trust_domain,
        crate::ca::CONTROL_PLANE_NAMESPACE,
        crate::ca::CONTROL_PLANE_SERVICE,
    )
    .map_err(|e| Failure::Usage(format!("--trust-domain {:?}: {e}", cli.trust_domain)))?;
    crate::tls::connector(&bundle, creds.as_ref(), Some(&expect))
        .map_err(|e| Failure::Usage(format!("--cert/--key: {e}")))
}

/// A unary request bounded by `--timeout`.
fn req<T>(cli: &Cli, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(cli.timeout);
    r
}

// === commands ===

async fn run(cli: Cli) -> Result<(), Failure> {
    let mut client = connect(&cli).await?;
    let out = Printer {
        json: cli.output == Output::Json,
    };
    match &cli.command {
        Command::Service(cmd) => service(&cli, &mut client, &out, cmd).await,
        Command::Endpoint(cmd) => endpoint(&cli, &mut client, &out, cmd).await,
        Command::Token(cmd) => token_cmd(&cli, &mut client, &out, cmd).await,
        Command::Ca(cmd) => ca_cmd(&cli, &mut client, &out, cmd).await,
        Command::Status => {
            let s = client
                .status(req(&cli, pb::StatusRequest {}))
                .await?
                .into_inner();
            out.status(&s);
            Ok(())
        }
        Command::Watch => {
            let mut stream = client
                .watch(Request::new(pb::WatchRequest {}))
                .await?
                .into_inner();
            out.watch_header();
            while let Some(ev) = stream.message().await? {
                if !out.event(&ev) {
                    break; // stdout closed
                }
            }
            Ok(())
        }
    }
}

fn service_msg(name: &str, opts: &ServiceOpts) -> (pb::Service, Vec<String>) {
    let mut s = pb::Service {
        name: name.to_owned(),
        ..Default::default()
    };
    let mut paths = Vec::new();
    if let Some(lb) = opts.lb {
        s.lb_policy = match lb {
            Lb::LeastRequest => pb::LbPolicy::LeastRequest,
            Lb::RoundRobin => pb::LbPolicy::RoundRobin,
            Lb::RingHash => pb::LbPolicy::RingHash,
            Lb::Maglev => pb::LbPolicy::Maglev,
        }
        .into();
        paths.push("lb_policy".to_owned());
    }
    if !opts.hash_policy.is_empty() {
        s.hash_policy = opts.hash_policy.clone();
        paths.push("hash_policy".to_owned());
    }
    if let Some(f) = opts.hash_balance_factor {
        s.hash_balance_factor = Some(f);
        paths.push("hash_balance_factor".to_owned());
    }
    if let Some(b) = opts.bias {
        s.active_request_bias = Some(b);
        paths.push("active_request_bias".to_owned());
    }
    if let Some(t) = opts.connect_timeout {
        s.connect_timeout = prost_types::Duration::try_from(t).ok();
        paths.push("connect_timeout".to_owned());
    }
    if let Some(t) = opts.request_timeout {
        s.request_timeout = prost_types::Duration::try_from(t).ok();
        paths.push("request_timeout".to_owned());
    }
    if let Some(a) = &opts.authority {
        s.authority = Some(a.clone());
        paths.push("authority".to_owned());
    }
    if opts.permissive {
        s.permissive = true;
        paths.push("permissive".to_owned());
    }
    if let Some(p) = opts.protocol {
        s.protocol = match p {
            ProtocolArg::Grpc => pb::Protocol::Grpc,
            ProtocolArg::Http => pb::Protocol::Http,
            ProtocolArg::Tcp => pb::Protocol::Tcp,
        }
        .into();
        paths.push("protocol".to_owned());
    }
    (s, paths)
}

async fn service(
    cli: &Cli,
    client: &mut Client,
    out: &Printer,
    cmd: &ServiceCmd,
) -> Result<(), Failure> {
    match cmd {
        ServiceCmd::Create { name, opts } => {
            let (s, _) = service_msg(name, opts);
            let r = client
                .create_service(req(cli, pb::CreateServiceRequest { service: Some(s) }))
                .await?
                .into_inner();
            out.done(
                json!({"version": r.version, "service": r.service.as_ref().map(service_json)}),
                &format!("created service {name}"),
                r.version,
            );
        }
        ServiceCmd::Update {
            name,
            opts,
            no_request_timeout,
            no_authority,
            no_permissive,
        } => {
            let (s, mut paths) = service_msg(name, opts);
            if *no_permissive {
                paths.push("permissive".to_owned());
            }
            if *no_request_timeout {
                paths.push("request_timeout".to_owned());
            }
            if *no_authority {
                paths.push("authority".to_owned());
            }
            if paths.is_empty() {
                return Err(Failure::Usage(
                    "service update: nothing to change (give --lb, --bias, --connect-timeout, --request-timeout, --authority, --permissive, --protocol, --no-request-timeout, --no-authority or --no-permissive)".into(),
                ));
            }
            let r = client
                .update_service(req(
                    cli,
                    pb::UpdateServiceRequest {
                        service: Some(s),
                        update_mask: Some(prost_types::FieldMask { paths }),
                    },
                ))
                .await?
                .into_inner();
            out.done(
                json!({"version": r.version, "service": r.service.as_ref().map(service_json)}),
                &format!("updated service {name}"),
                r.version,
            );
        }
        ServiceCmd::Delete { name } => {
            let r = client
                .delete_service(req(cli, pb::DeleteServiceRequest { name: name.clone() }))
                .await?
                .into_inner();
            out.done(
                json!({"version": r.version, "endpoints_removed": r.endpoints_removed}),
                &format!(
                    "deleted service {name} and its {} endpoint{}",
                    r.endpoints_removed,
                    if r.endpoints_removed == 1 { "" } else { "s" }
                ),
                r.version,
            );
        }
        ServiceCmd::List => {
            let r = client
                .list_services(req(cli, pb::ListServicesRequest {}))
                .await?
                .into_inner();
            out.services(r.version, &r.services);
        }
        ServiceCmd::Get { name } => {
            let r = client
                .get_service(req(cli, pb::GetServiceRequest { name: name.clone() }))
                .await?
                .into_inner();
            out.service(&r);
        }
        ServiceCmd::Policy(cmd) => policy_cmd(cli, client, out, cmd).await?,
    }
    Ok(())
}

/// Reads a policy file (YAML or JSON; `-` is stdin) into the API's shape.
fn read_policy(path: &std::path::Path) -> Result<pb::Policy, Failure> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Failure::Usage(format!("--file -: {e}")))?;
        s
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("--file {}: {e}", path.display())))?
    };
    // JSON is YAML, so one parser reads both (with line and column on errors).
    let p: meshwire_mesh::policy::Policy = serde_yaml_ng::from_str(&text)
        .map_err(|e| Failure::Usage(format!("--file {}: {e}", path.display())))?;
    Ok(crate::api::policy_pb(&p))
}

async fn policy_cmd(
    cli: &Cli,
    client: &mut Client,
    out: &Printer,
    cmd: &PolicyCmd,
) -> Result<(), Failure> {
    let (name, policy) = match cmd {
        PolicyCmd::Set { name, file } => (name, Some(read_policy(file)?)),
        PolicyCmd::Clear { name } => (name, None),
        PolicyCmd::Get { name } => {
            let r = client
                .get_service(req(cli, pb::GetServiceRequest { name: name.clone() }))
                .await?
                .into_inner();
            let p = r.service.and_then(|s| s.policy);
            if out.json {
                out.print_json(
                    &json!({"version": r.version, "policy": p.as_ref().map(policy_json)}),
                );
            } else {
                out.print(&policy_text(p.as_ref()));
            }
            return Ok(());
        }
    };
    let cleared = policy.is_none();
    let s = pb::Service {
        name: name.clone(),
        policy,
        ..Default::default()
    };
    let r = client
        .update_service(req(
            cli,
            pb::UpdateServiceRequest {
                service: Some(s),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["policy".to_owned()],
                }),
            },
        ))
        .await?
        .into_inner();
    let what = if cleared {
        format!("cleared the policy of {name}")
    } else {
        format!("set the policy of {name}")
    };
    out.done(
        json!({"version": r.version, "service": r.service.as_ref().map(service_json)}),
        &what,
        r.version,
    );
    Ok(())
}

async fn token_cmd(
    cli: &Cli,
    client: &mut Client,
    out: &Printer,
    cmd: &TokenCmd,
) -> Result<(), Failure> {
    let TokenCmd::Create {
        service,
        namespace,
        ttl,
    } = cmd;
    let r = client
        .create_join_token(req(
            cli,
            pb::CreateJoinTokenRequest {
                service: service.clone(),
                namespace: namespace.clone(),
                ttl: prost_types::Duration::try_from(*ttl).ok(),
            },
        ))
        .await?
        .into_inner();
    if out.json {
        out.print_json(&json!({
            "token": r.token,
            "spiffe_id": r.spiffe_id,
            "expires_at": rfc3339(timestamp(r.expires_at.as_ref())),
        }));
    } else {
        // The token alone on stdout, so `$(meshctl token create ...)` works.
        out.print(&format!("{}\n", r.token));
    }
    Ok(())
}

async fn ca_cmd(cli: &Cli, client: &mut Client, out: &Printer, cmd: &CaCmd) -> Result<(), Failure> {
    match cmd {
        CaCmd::Show => {
            let r = client
                .get_ca(req(cli, pb::GetCaRequest {}))
                .await?
                .into_inner();
            out.ca(&r);
        }
        CaCmd::Bundle => {
            let r = client
                .get_ca(req(cli, pb::GetCaRequest {}))
                .await?
                .into_inner();
            if out.json {
                out.print_json(&json!({
                    "trust_domain": r.trust_domain,
                    "fingerprints": r.roots.iter().map(|x| &x.fingerprint).collect::<Vec<_>>(),
                    "trust_bundle_pem": r.trust_bundle_pem,
                }));
            } else {
                out.print(&r.trust_bundle_pem);
            }
        }
        CaCmd::AddRoot => {
            let before = client
                .get_ca(req(cli, pb::GetCaRequest {}))
                .await?
                .into_inner();
            let r = client
                .add_root(req(cli, pb::AddRootRequest {}))
                .await?
                .into_inner();
            let added = r
                .roots
                .iter()
                .find(|x| !before.roots.iter().any(|b| b.fingerprint == x.fingerprint))
                .map(|x| x.fingerprint.clone())
                .unwrap_or_default();
            if out.json {
                let mut v = ca_json(&r);
                v["added"] = json!(added);
                out.print_json(&v);
            } else {
                out.print(&format!(
                    "added root {added} (trusted, not signing yet: once every sidecar has the new bundle, `meshctl ca activate {}`)\n",
                    short_fp(&added)
                ));
            }
        }
        CaCmd::Activate { fingerprint } => {
            let r = client
                .activate_root(req(
                    cli,
                    pb::ActivateRootRequest {
                        fingerprint: fingerprint.clone(),
                    },
                ))
                .await?
                .into_inner();
            let fp = r
                .roots
                .iter()
                .find(|x| x.signing)
                .map(|x| x.fingerprint.clone())
                .unwrap_or_default();
            if out.json {
                out.print_json(&ca_json(&r));
            } else {
                out.print(&format!(
                    "root {fp} now signs new certificates (sidecars renew early; remove the old root once they have)\n"
                ));
            }
        }
        CaCmd::RemoveRoot { fingerprint } => {
            let before = client
                .get_ca(req(cli, pb::GetCaRequest {}))
                .await?
                .into_inner();
            let r = client
                .remove_root(req(
                    cli,
                    pb::RemoveRootRequest {
                        fingerprint: fingerprint.clone(),
                    },
                ))
                .await?
                .into_inner();
            let removed = before
                .roots
                .iter()
                .find(|b| !r.roots.iter().any(|x| x.fingerprint == b.fingerprint))
                .map(|x| x.fingerprint.clone())
                .unwrap_or_default();
            if out.json {
                let mut v = ca_json(&r);
                v["removed"] = json!(removed);
                out.print_json(&v);
            } else {
                out.print(&format!("removed root {removed} from the trust bundle\n"));
            }
        }
    }
    Ok(())
}

async fn endpoint(
    cli: &Cli,
    client: &mut Client,
    out: &Printer,
    cmd: &EndpointCmd,
) -> Result<(), Failure> {
    let done = |r: pb::EndpointResponse, what: String| {
        out.done(
            json!({"version": r.version, "endpoint": r.endpoint.as_ref().map(endpoint_json)}),
            &what,
            r.version,
        );
    };
    match cmd {
        EndpointCmd::Add {
            service,
            address,
            weight,
            zone,
            identity,
            meta,
            draining,
        } => {
            let e = pb::Endpoint {
                address: address.clone(),
                weight: *weight,
                zone: zone.clone().unwrap_or_default(),
                metadata: meta.iter().cloned().collect(),
                identity: identity.clone(),
                draining: *draining,
                ..Default::default()
            };
            let r = client
                .add_endpoint(req(
                    cli,
                    pb::AddEndpointRequest {
                        service: service.clone(),
                        endpoint: Some(e),
                    },
                ))
                .await?
                .into_inner();
            done(r, format!("added endpoint {address} to {service}"));
        }
        EndpointCmd::Remove { service, address } => {
            let r = client
                .remove_endpoint(req(
                    cli,
                    pb::RemoveEndpointRequest {
                        service: service.clone(),
                        address: address.clone(),
                    },
                ))
                .await?
                .into_inner();
            out.done(
                json!({"version": r.version}),
                &format!("removed endpoint {address} from {service}"),
                r.version,
            );
        }
        EndpointCmd::List { service } => {
            let r = client
                .list_endpoints(req(
                    cli,
                    pb::ListEndpointsRequest {
                        service: service.clone(),
                    },
                ))
                .await?
                .into_inner();
            out.endpoints(r.version, &r.endpoints);
        }
        EndpointCmd::Weight {
            service,
            address,
            weight,
        } => {
            let r = client
                .set_endpoint_weight(req(
                    cli,
                    pb::SetEndpointWeightRequest {
                        service: service.clone(),
                        address: address.clone(),
                        weight: *weight,
                    },
                ))
                .await?
                .into_inner();
            done(
                r,
                format!("endpoint {address} of {service}: weight {weight}"),
            );
        }
        EndpointCmd::Drain {
            service,
            address,
            undo,
        } => {
            let r = client
                .drain_endpoint(req(
                    cli,
                    pb::DrainEndpointRequest {
                        service: service.clone(),
                        address: address.clone(),
                        draining: Some(!undo),
                    },
                ))
                .await?
                .into_inner();
            let state = if *undo { "active" } else { "draining" };
            done(r, format!("endpoint {address} of {service}: {state}"));
        }
    }
    Ok(())
}

// === output ===

fn dur(d: Option<&prost_types::Duration>) -> Option<String> {
    d.and_then(|d| Duration::try_from(*d).ok())
        .map(|d| humantime::format_duration(d).to_string())
}

fn lb_name(v: i32) -> &'static str {
    match pb::LbPolicy::try_from(v) {
        Ok(pb::LbPolicy::RoundRobin) => "round-robin",
        Ok(pb::LbPolicy::LeastRequest | pb::LbPolicy::Unspecified) => "least-request",
        Ok(pb::LbPolicy::RingHash) => "ring-hash",
        Ok(pb::LbPolicy::Maglev) => "maglev",
        Err(_) => "unknown",
    }
}

/// `header:x-user, cookie:sticky (ttl 10m), source-ip`, or `-`.
fn hash_summary(s: &pb::Service) -> String {
    use pb::hash_source::Source;
    let mut parts: Vec<String> = s
        .hash_policy
        .iter()
        .filter_map(|h| {
            Some(match h.source.as_ref()? {
                Source::Header(n) => format!("header:{n}"),
                Source::SourceIp(_) => "source-ip".to_owned(),
                Source::Cookie(c) => match dur(c.ttl.as_ref()) {
                    Some(t) => format!("cookie:{} (ttl {t})", c.name),
                    None => format!("cookie:{}", c.name),
                },
            })
        })
        .collect();
    if let Some(f) = s.hash_balance_factor {
        parts.push(format!("balance factor {f}"));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

fn service_json(s: &pb::Service) -> Value {
    json!({
        "name": s.name,
        "protocol": protocol_name(s.protocol),
        "lb_policy": lb_name(s.lb_policy).replace('-', "_"),
        "active_request_bias": s.active_request_bias,
        "connect_timeout": dur(s.connect_timeout.as_ref()),
        "request_timeout": dur(s.request_timeout.as_ref()),
        "authority": s.authority,
        "endpoints": s.endpoint_count,
        "permissive": s.permissive,
        "policy": s.policy.as_ref().map(policy_json),
        "hash_policy": hash_summary(s),
        "hash_balance_factor": s.hash_balance_factor,
    })
}

fn protocol_name(v: i32) -> &'static str {
    match pb::Protocol::try_from(v) {
        Ok(pb::Protocol::Http) => "http",
        Ok(pb::Protocol::Tcp) => "tcp",
        Ok(pb::Protocol::Grpc | pb::Protocol::Unspecified) | Err(_) => "grpc",
    }
}

fn action_name(v: i32) -> &'static str {
    match pb::Action::try_from(v) {
        Ok(pb::Action::Allow) => "allow",
        Ok(pb::Action::Deny) => "deny",
        Ok(pb::Action::Unspecified) | Err(_) => "unspecified",
    }
}

fn policy_json(p: &pb::Policy) -> Value {
    json!({
        "default_action": match pb::Action::try_from(p.default_action) {
            Ok(pb::Action::Deny) => "deny",
            _ => "allow",
        },
        "rules": p.rules.iter().map(|r| json!({
            "action": action_name(r.action),
            "sources": r.sources,
            "methods": r.methods,
            "cidrs": r.cidrs,
        })).collect::<Vec<_>>(),
    })
}

/// `default-deny, 2 rules`, or `-` for none.
fn policy_summary(p: Option<&pb::Policy>) -> String {
    match p {
        None => "-".to_owned(),
        Some(p) => format!(
            "default-{},{}rule{}",
            if p.default_action == i32::from(pb::Action::Deny) {
                "deny"
            } else {
                "allow"
            },
            p.rules.len(),
            if p.rules.len() == 1 { "" } else { "s" }
        ),
    }
}

/// A policy in a few lines (`service policy get`).
fn policy_text(p: Option<&pb::Policy>) -> String {
    let Some(p) = p else {
        return "no policy: every mesh identity may call\n".into();
    };
    let default = match pb::Action::try_from(p.default_action) {
        Ok(pb::Action::Deny) => "deny",
        _ => "allow",
    };
    let mut out = format!("default: {default}\n");
    out.push_str(&policy_rules(p));
    out
}

/// The rules as a table (nothing without rules).
fn policy_rules(p: &pb::Policy) -> String {
    let mut out = String::new();
    if !p.rules.is_empty() {
        let any = |v: &[String]| {
            if v.is_empty() {
                "*".to_owned()
            } else {
                v.join(",")
            }
        };
        let rows: Vec<Vec<String>> = p
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                vec![
                    i.to_string(),
                    action_name(r.action).to_owned(),
                    any(&r.sources),
                    any(&r.methods),
                    any(&r.cidrs),
                ]
            })
            .collect();
        out.push_str(&table(
            &["RULE", "ACTION", "SOURCES", "METHODS", "CIDRS"],
            &rows,
        ));
    }
    out
}

fn short_fp(fp: &str) -> &str {
    &fp[..fp.len().min(16)]
}

fn rfc3339(t: Option<SystemTime>) -> Option<String> {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

fn ca_json(c: &pb::CaStatus) -> Value {
    json!({
        "trust_domain": c.trust_domain,
        "cert_lifetime": dur(c.cert_lifetime.as_ref()),
        "roots": c.roots.iter().map(|r| json!({
            "fingerprint": r.fingerprint,
            "subject": r.subject,
            "not_after": rfc3339(timestamp(r.not_after.as_ref())),
            "signing": r.signing,
            "generated": r.generated,
        })).collect::<Vec<_>>(),
    })
}

fn sorted(m: &std::collections::HashMap<String, String>) -> BTreeMap<&str, &str> {
    m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn endpoint_json(e: &pb::Endpoint) -> Value {
    json!({
        "service": e.service,
        "address": e.address,
        "weight": e.weight,
        "zone": (!e.zone.is_empty()).then_some(&e.zone),
        "draining": e.draining,
        "identity": e.identity,
        "metadata": sorted(&e.metadata),
    })
}

fn kind_name(v: i32) -> &'static str {
    use pb::ChangeKind as K;
    match K::try_from(v) {
        Ok(K::Current) => "current",
        Ok(K::ServiceCreated) => "service-created",
        Ok(K::ServiceUpdated) => "service-updated",
        Ok(K::ServiceDeleted) => "service-deleted",
        Ok(K::EndpointAdded) => "endpoint-added",
        Ok(K::EndpointRemoved) => "endpoint-removed",
        Ok(K::EndpointUpdated) => "endpoint-updated",
        Ok(K::Unspecified) | Err(_) => "unknown",
    }
}

fn or_dash(s: Option<impl ToString>) -> String {
    s.map(|s| s.to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into())
}

fn timestamp(t: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(*t).ok())
}

/// "12s ago", to the second.
fn ago(t: Option<SystemTime>) -> String {
    t.and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| {
            format!(
                "{} ago",
                humantime::format_duration(Duration::from_secs(d.as_secs()))
            )
        })
        .unwrap_or_else(|| "-".into())
}

/// The last part of a type URL (`...v3.ClusterLoadAssignment`).
fn short_type(url: &str) -> &str {
    url.rsplit(['.', '/']).next().unwrap_or(url)
}

/// Left-aligned columns two spaces apart, no trailing spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(c);
            s.extend(std::iter::repeat_n(' ', w - c.chars().count()));
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&mut headers.iter().copied());
    for r in rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    out
}

struct Printer {
    json: bool,
}

impl Printer {
    /// Writes to stdout; `false` once stdout is gone (e.g. `| head`).
    fn print(&self, s: &str) -> bool {
        let mut out = std::io::stdout().lock();
        out.write_all(s.as_bytes())
            .and_then(|()| out.flush())
            .is_ok()
    }

    fn print_json(&self, v: &Value) -> bool {
        self.print(&format!("{v}\n"))
    }

    fn done(&self, v: Value, what: &str, version: u64) {
        if self.json {
            self.print_json(&v);
        } else {
            self.print(&format!("{what} (version {version})\n"));
        }
    }

    fn services(&self, version: u64, services: &[pb::Service]) {
        if self.json {
            self.print_json(&json!({
                "version": version,
                "services": services.iter().map(service_json).collect::<Vec<_>>(),
            }));
            return;
        }
        let rows: Vec<Vec<String>> = services
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    protocol_name(s.protocol).to_owned(),
                    lb_name(s.lb_policy).to_owned(),
                    or_dash(s.active_request_bias),
                    or_dash(dur(s.connect_timeout.as_ref())),
                    or_dash(dur(s.request_timeout.as_ref())),
                    or_dash(s.authority.as_ref()),
                    s.endpoint_count.to_string(),
                    if s.permissive { "yes" } else { "no" }.to_owned(),
                    policy_summary(s.policy.as_ref()),
                ]
            })
            .collect();
        self.print(&table(
            &[
                "NAME",
                "PROTOCOL",
                "LB",
                "BIAS",
                "CONNECT",
                "REQUEST",
                "AUTHORITY",
                "ENDPOINTS",
                "PERMISSIVE",
                "POLICY",
            ],
            &rows,
        ));
    }

    fn endpoints(&self, version: u64, eps: &[pb::Endpoint]) {
        if self.json {
            self.print_json(&json!({
                "version": version,
                "endpoints": eps.iter().map(endpoint_json).collect::<Vec<_>>(),
            }));
            return;
        }
        self.print(&endpoint_table(eps));
    }

    fn service(&self, r: &pb::GetServiceResponse) {
        let s = r.service.clone().unwrap_or_default();
        if self.json {
            let mut v = service_json(&s);
            v["version"] = json!(r.version);
            v["endpoints"] = json!(r.endpoints.iter().map(endpoint_json).collect::<Vec<_>>());
            self.print_json(&v);
            return;
        }
        let lb = match s.active_request_bias {
            Some(b) => format!("{} (bias {b})", lb_name(s.lb_policy)),
            None => lb_name(s.lb_policy).to_owned(),
        };
        let fields = [
            ("name:", s.name.clone()),
            ("protocol:", protocol_name(s.protocol).to_owned()),
            ("lb:", lb),
            ("hash:", hash_summary(&s)),
            ("connect timeout:", or_dash(dur(s.connect_timeout.as_ref()))),
            ("request timeout:", or_dash(dur(s.request_timeout.as_ref()))),
            ("authority:", or_dash(s.authority.as_ref())),
            (
                "permissive:",
                if s.permissive { "yes" } else { "no" }.to_owned(),
            ),
            ("policy:", policy_summary(s.policy.as_ref())),
            ("version:", r.version.to_string()),
        ];
        let mut out = String::new();
        for (k, v) in fields {
            out.push_str(&format!("{k:<17}{v}\n"));
        }
        if let Some(p) = s.policy.as_ref().filter(|p| !p.rules.is_empty()) {
            out.push('\n');
            out.push_str(&policy_rules(p));
        }
        out.push('\n');
        if r.endpoints.is_empty() {
            out.push_str("no endpoints\n");
        } else {
            out.push_str(&endpoint_table(&r.endpoints));
        }
        self.print(&out);
    }

    fn ca(&self, c: &pb::CaStatus) {
        if self.json {
            self.print_json(&ca_json(c));
            return;
        }
        let mut out = format!(
            "trust domain {}, workload certificates live {}\n\n",
            c.trust_domain,
            or_dash(dur(c.cert_lifetime.as_ref()))
        );
        let rows: Vec<Vec<String>> = c
            .roots
            .iter()
            .map(|r| {
                vec![
                    r.fingerprint.clone(),
                    r.subject.clone(),
                    or_dash(rfc3339(timestamp(r.not_after.as_ref()))),
                    if r.signing { "yes" } else { "no" }.to_owned(),
                    if r.generated { "generated" } else { "user" }.to_owned(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["FINGERPRINT", "SUBJECT", "NOT AFTER", "SIGNING", "SOURCE"],
            &rows,
        ));
        self.print(&out);
    }

    fn status(&self, s: &pb::StatusResponse) {
        if self.json {
            let nodes: Vec<Value> = s
                .nodes
                .iter()
                .map(|n| {
                    let secs = |t: Option<&prost_types::Timestamp>| {
                        timestamp(t).and_then(|t| {
                            t.duration_since(SystemTime::UNIX_EPOCH)
                                .ok()
                                .map(|d| d.as_secs())
                        })
                    };
                    json!({
                        "node_id": n.node_id,
                        "service": n.service,
                        "user_agent": n.user_agent,
                        "connected": n.connected,
                        "connected_since_unix": secs(n.connected_since.as_ref()),
                        "acked": sorted(&n.acked),
                        "pushes": n.pushes,
                        "last_nack": n.last_nack.as_ref().map(|x| json!({
                            "type_url": x.type_url,
                            "version": x.version,
                            "error": x.error,
                            "at_unix": secs(x.at.as_ref()),
                        })),
                    })
                })
                .collect();
            self.print_json(&json!({
                "version": s.version,
                "published_version": s.published_version,
                "nodes": nodes,
            }));
            return;
        }
        let mut out = format!(
            "version {} (published to xDS: {})\n\n",
            s.version, s.published_version
        );
        if s.nodes.is_empty() {
            out.push_str("no xDS clients\n");
        } else {
            let rows: Vec<Vec<String>> = s
                .nodes
                .iter()
                .map(|n| {
                    let acked = sorted(&n.acked)
                        .iter()
                        .map(|(t, v)| format!("{}={v}", short_type(t)))
                        .collect::<Vec<_>>()
                        .join(",");
                    let nack = n.last_nack.as_ref().map(|x| {
                        format!(
                            "{} v{} {}: {}",
                            short_type(&x.type_url),
                            x.version,
                            ago(timestamp(x.at.as_ref())),
                            x.error
                        )
                    });
                    vec![
                        n.node_id.clone(),
                        or_dash(Some(&n.service)),
                        or_dash(Some(&n.user_agent)),
                        if n.connected { "yes" } else { "no" }.to_owned(),
                        ago(timestamp(n.connected_since.as_ref())),
                        or_dash(Some(acked)),
                        n.pushes.to_string(),
                        or_dash(nack),
                    ]
                })
                .collect();
            out.push_str(&table(
                &[
                    "NODE",
                    "SERVICE",
                    "AGENT",
                    "CONNECTED",
                    "SINCE",
                    "ACKED",
                    "PUSHES",
                    "LAST NACK",
                ],
                &rows,
            ));
        }
        self.print(&out);
    }

    fn watch_header(&self) {
        if !self.json {
            self.print(&format!(
                "{:<10}  {:<17}  {:<24}  ADDRESS / DETAIL\n",
                "VERSION", "CHANGE", "SERVICE"
            ));
        }
    }

    /// One event; `false` once stdout is gone.
    fn event(&self, ev: &pb::WatchEvent) -> bool {
        if self.json {
            return self.print_json(&json!({
                "version": ev.version,
                "kind": kind_name(ev.kind).replace('-', "_"),
                "service": (!ev.service.is_empty()).then_some(&ev.service),
                "address": (!ev.address.is_empty()).then_some(&ev.address),
                "service_state": ev.service_state.as_ref().map(service_json),
                "endpoint_state": ev.endpoint_state.as_ref().map(endpoint_json),
            }));
        }
        let detail = match &ev.endpoint_state {
            Some(e) => format!(
                "{} weight {}{}",
                e.address,
                e.weight.unwrap_or(1),
                if e.draining { " draining" } else { "" }
            ),
            None => ev.address.clone(),
        };
        self.print(&format!(
            "{:<10}  {:<17}  {:<24}  {}\n",
            ev.version,
            kind_name(ev.kind),
            or_dash(Some(&ev.service)),
            or_dash(Some(detail))
        ))
    }
}

fn endpoint_table(eps: &[pb::Endpoint]) -> String {
    let rows: Vec<Vec<String>> = eps
        .iter()
        .map(|e| {
            let meta = sorted(&e.metadata)
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            vec![
                e.address.clone(),
                e.weight.unwrap_or(1).to_string(),
                or_dash(Some(&e.zone)),
                if e.draining { "draining" } else { "active" }.to_owned(),
                or_dash(e.identity.as_ref()),
                or_dash(Some(meta)),
            ]
        })
        .collect();
    table(
        &["ADDRESS", "WEIGHT", "ZONE", "STATE", "IDENTITY", "METADATA"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_without_trailing_spaces() {
        let t = table(
            &["NAME", "LB", "ENDPOINTS"],
            &[
                vec!["greeter".into(), "least-request".into(), "3".into()],
                vec!["a".into(), "round-robin".into(), "10".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME     LB             ENDPOINTS\n\
             greeter  least-request  3\n\
             a        round-robin    10\n"
        );
    }

    #[test]
    fn hash_flags_keep_their_order() {
        use pb::hash_source::Source;
        let cli = parse_cli([
            "meshctl",
            "service",
            "create",
            "cart",
            "--lb",
            "ring-hash",
            "--hash-cookie",
            "sticky",
            "--cookie-ttl",
            "10m",
            "--hash-header",
            "x-user",
            "--hash-source-ip",
            "--hash-header",
            "x-tenant",
            "--hash-balance-factor",
            "1.25",
        ])
        .unwrap();
        let Command::Service(ServiceCmd::Create { name, opts }) = cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        let (s, paths) = service_msg(&name, &opts);
        assert_eq!(paths, ["lb_policy", "hash_policy", "hash_balance_factor"]);
        assert_eq!(s.lb_policy, i32::from(pb::LbPolicy::RingHash));
        let got: Vec<_> = s
            .hash_policy
            .iter()
            .map(|h| h.source.clone().unwrap())
            .collect();
        assert_eq!(
            got,
            vec![
                Source::Cookie(pb::HashCookie {
                    name: "sticky".into(),
                    ttl: Some(prost_types::Duration {
                        seconds: 600,
                        nanos: 0
                    }),
                }),
                Source::Header("x-user".into()),
                Source::SourceIp(true),
                Source::Header("x-tenant".into()),
            ]
        );
        assert_eq!(
            hash_summary(&s),
            "cookie:sticky (ttl 10m), header:x-user, source-ip, header:x-tenant, balance factor 1.25"
        );
        let e = parse_cli(["meshctl", "service", "create", "a", "--cookie-ttl", "1m"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--hash-cookie"), "{e}");
    }

    #[test]
    fn flags_parse_into_requests() {
        let cli = Cli::try_parse_from([
            "meshctl",
            "service",
            "update",
            "greeter",
            "--lb",
            "round-robin",
            "--request-timeout",
            "5s",
            "--no-authority",
        ])
        .unwrap();
        let Command::Service(ServiceCmd::Update {
            name,
            opts,
            no_authority,
            ..
        }) = cli.command
        else {
            panic!("parsed {:?}", cli.command);
        };
        let (s, paths) = service_msg(&name, &opts);
        assert!(no_authority);
        assert_eq!(paths, ["lb_policy", "request_timeout"]);
        assert_eq!(s.lb_policy, i32::from(pb::LbPolicy::RoundRobin));
        assert_eq!(s.request_timeout.unwrap().seconds, 5);

        let e = Cli::try_parse_from(["meshctl", "endpoint", "add", "s", "a", "--meta", "novalue"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not key=value"), "{e}");
        assert!(
            Cli::try_parse_from([
                "meshctl",
                "service",
                "update",
                "s",
                "--authority",
                "a",
                "--no-authority"
            ])
            .is_err()
        );
    }

    #[test]
    fn short_type_names() {
        assert_eq!(
            short_type("type.googleapis.com/envoy.config.cluster.v3.Cluster"),
            "Cluster"
        );
    }
}

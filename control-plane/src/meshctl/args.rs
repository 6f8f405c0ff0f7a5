//! `meshctl`'s command line: global options, commands and their flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use meshwire_mesh::cli::parse_duration;
use meshwire_proto::admin::v1 as pb;

#[derive(Debug, Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Manage a Meshwire mesh: services, endpoints, and what the sidecars run",
    after_help = "Exit codes: 0 done, 1 the control plane refused the request, 2 bad usage, 3 cannot reach the control plane."
)]
pub(crate) struct Cli {
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
    pub(super) server: Vec<String>,
    /// The admin token (default: <data-dir>/admin.token).
    #[arg(
        long,
        env = "MESHWIRE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true,
        help_heading = "Global options"
    )]
    pub(super) token: Option<String>,
    /// The control plane's data directory, to read its admin.token [default: ./meshwire-data].
    #[arg(
        long,
        env = "MESHWIRE_DATA_DIR",
        global = true,
        help_heading = "Global options"
    )]
    pub(super) data_dir: Option<PathBuf>,
    /// The trust bundle (PEM) that verifies an https:// --server [default: <data-dir>/ca/bundle.pem].
    #[arg(
        long,
        env = "MESHCTL_CA_BUNDLE",
        global = true,
        help_heading = "Global options"
    )]
    pub(super) ca_bundle: Option<PathBuf>,
    /// A client certificate chain (PEM) for an https:// --server; with the admin identity it replaces the token.
    #[arg(
        long,
        env = "MESHCTL_CERT",
        requires = "key",
        global = true,
        help_heading = "Global options"
    )]
    pub(super) cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(
        long,
        env = "MESHCTL_KEY",
        requires = "cert",
        global = true,
        help_heading = "Global options"
    )]
    pub(super) key: Option<PathBuf>,
    /// The mesh's trust domain: an https:// --server must be its control plane.
    #[arg(long, env = "MESHWIRE_TRUST_DOMAIN", default_value = crate::ca::DEFAULT_TRUST_DOMAIN, global = true, help_heading = "Global options")]
    pub(super) trust_domain: String,
    /// How results are printed.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true, help_heading = "Global options")]
    pub(super) output: Output,
    /// Time allowed to connect and for each call (not `watch`).
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true, help_heading = "Global options")]
    pub(super) timeout: Duration,
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub(super) enum Command {
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
    /// The control plane itself: its replicas on etcd and the leader.
    #[command(subcommand)]
    Cp(CpCmd),
    /// Print every change as it is committed (until Ctrl-C).
    Watch,
}

#[derive(Debug, Subcommand)]
pub(super) enum CpCmd {
    /// The replicas sharing the store, the leader, and the etcd revision each has applied.
    Status,
}

#[derive(Debug, Subcommand)]
pub(super) enum ServiceCmd {
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
        /// Remove the inbound rate limit.
        #[arg(long, conflicts_with = "rate_limit")]
        no_rate_limit: bool,
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
pub(super) enum PolicyCmd {
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
pub(super) enum TokenCmd {
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
pub(super) enum CaCmd {
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
pub(super) struct ServiceOpts {
    /// Load-balancing policy.
    #[arg(long, value_enum)]
    pub(super) lb: Option<Lb>,
    /// Least-request only: how hard load steers with unequal weights (0..10, default 2).
    #[arg(long)]
    pub(super) bias: Option<f64>,
    /// Time allowed to connect to an endpoint (default 1s).
    #[arg(long, value_parser = parse_duration)]
    pub(super) connect_timeout: Option<Duration>,
    /// Upper bound on a whole call (default: none).
    #[arg(long, value_parser = parse_duration)]
    pub(super) request_timeout: Option<Duration>,
    /// `:authority` sent upstream instead of the caller's.
    #[arg(long)]
    pub(super) authority: Option<String>,
    /// Also accept plaintext (non-mTLS) calls on the service's inbound ports.
    #[arg(long)]
    pub(super) permissive: bool,
    /// What the service's apps speak: grpc (default), http (REST, HTTP/1.1 or h2c) or tcp (opaque bytes).
    #[arg(long, value_enum)]
    pub(super) protocol: Option<ProtocolArg>,
    /// Ring hash / Maglev: hash calls on this request header (gRPC metadata); repeatable.
    #[arg(long, value_name = "NAME")]
    pub(super) hash_header: Vec<String>,
    /// Ring hash / Maglev: hash calls on the caller's IP address.
    #[arg(long)]
    pub(super) hash_source_ip: bool,
    /// Ring hash / Maglev: hash HTTP calls on this cookie; the sidecar sets it when absent.
    #[arg(long, value_name = "NAME")]
    pub(super) hash_cookie: Option<String>,
    /// Max-Age of the cookie the sidecar sets (default: a session cookie).
    #[arg(long, value_parser = parse_duration, requires = "hash_cookie")]
    pub(super) cookie_ttl: Option<Duration>,
    /// Ring hash / Maglev: bounded loads, no endpoint above F × its share of calls in flight (F ≥ 1).
    #[arg(long, value_name = "F")]
    pub(super) hash_balance_factor: Option<f64>,
    /// Zone-aware routing (default on): callers that know their zone keep
    /// calls there while enough of it is healthy (see --zone-min-healthy).
    #[arg(long, value_enum, value_name = "on|off")]
    pub(super) zone_aware: Option<OnOff>,
    /// Fraction of the caller's zone's endpoint weight that must be healthy
    /// for it to keep every call, in (0, 1] (default 0.7); below it, calls
    /// spill to other zones in proportion.
    #[arg(long, value_name = "F")]
    pub(super) zone_min_healthy: Option<f64>,
    /// The hash flags above in command-line order (see [`parse_cli`]).
    #[arg(skip)]
    pub(super) hash_policy: Vec<pb::HashSource>,
    /// Boxed: the many optional flags would make every command large.
    #[command(flatten)]
    pub(super) resilience: Box<super::resilience::ResilienceOpts>,
    #[command(flatten)]
    pub(super) rate_limit: RateLimitOpts,
}

/// The inbound rate limit, enforced by each of the service's sidecars;
/// given whole (`update` replaces the limit), checked by the API.
#[derive(Debug, Args)]
pub(super) struct RateLimitOpts {
    /// Calls each of the service's sidecars admits: N/s, N/m or N/h.
    #[arg(long, value_name = "RATE")]
    pub(super) rate_limit: Option<String>,
    /// Calls admitted at once (default: the rate's N).
    #[arg(long, value_name = "N", requires = "rate_limit")]
    pub(super) burst: Option<u32>,
    /// What one bucket counts (default: service).
    #[arg(long, value_enum, value_name = "KEY", requires = "rate_limit")]
    pub(super) rate_limit_per: Option<LimitPerArg>,
    /// A named caller's own rate: SPIFFE-ID=RATE; repeatable.
    #[arg(long, value_name = "ID=RATE", requires = "rate_limit", value_parser = rate_override)]
    pub(super) rate_limit_override: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum LimitPerArg {
    Service,
    Caller,
    Ip,
}

/// `spiffe://…/sa/x=1000/s` split at its last `=` (the API checks both parts).
fn rate_override(s: &str) -> Result<(String, String), String> {
    s.rsplit_once('=')
        .map(|(id, rate)| (id.to_owned(), rate.to_owned()))
        .ok_or_else(|| format!("{s:?}: write it as spiffe://.../sa/NAME=N/s"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum ProtocolArg {
    Grpc,
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Lb {
    LeastRequest,
    RoundRobin,
    RingHash,
    Maglev,
}

/// Parses the command line, keeping the order of the hash-source flags
/// (which derive alone would lose: the first present source wins).
pub(super) fn parse_cli<I, T>(args: I) -> Result<Cli, clap::Error>
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
pub(super) enum EndpointCmd {
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

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

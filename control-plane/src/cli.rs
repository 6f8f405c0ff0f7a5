//! The `meshwire-control-plane` command line: flags (each also a `MESHWIRE_*`
//! environment variable) → [`ControlPlane::start`] → serve until
//! SIGTERM/SIGINT → graceful stop. Shared by the binary and test wrappers.
//!
//! Exit codes: 0 stopped cleanly, 1 could not start (or the server failed),
//! 2 bad flags.

#![allow(clippy::print_stderr, clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshwire_mesh::cli::{parse_duration, wait_for_signal};
use tracing_subscriber::EnvFilter;

use crate::{ControlPlane, ControlPlaneConfig, ControlPlaneHandle, auth, ca};

/// `meshwire-control-plane` flags.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "meshwire-control-plane",
    version,
    about = "Meshwire control plane: the admin API (meshctl), xDS for sidecars, and the mesh's certificate authority",
    after_help = "The admin token is read from MESHWIRE_ADMIN_TOKEN if set, else from (or generated into) <data-dir>/admin.token.\n\
The CA's roots live in <data-dir>/ca (generated on first start); <data-dir>/ca/bundle.pem is the trust bundle to give sidecars and meshctl."
)]
pub struct Args {
    /// The plaintext port: the admin API (token) and xDS.
    #[arg(long, env = "MESHWIRE_CP_LISTEN", default_value = "0.0.0.0:15010")]
    pub listen: SocketAddr,
    /// Also serve xDS to clients without a mesh certificate (the plaintext
    /// port, and TLS without a client certificate): for local Envoy or
    /// proxyless gRPC experiments. Off: anyone reaching the port would get
    /// every service's endpoints and policies.
    #[arg(long, env = "MESHWIRE_CP_PLAINTEXT_XDS")]
    pub plaintext_xds: bool,
    /// The TLS port: certificate issuance (Identity), xDS and the admin API; `off` for none.
    #[arg(long, env = "MESHWIRE_CP_TLS_LISTEN", default_value = "0.0.0.0:15012", value_parser = parse_tls_listen)]
    pub tls_listen: TlsListen,
    /// A DNS name or IP in the TLS port's certificate (repeatable) [default: this host's name, localhost, 127.0.0.1].
    #[arg(
        long = "tls-name",
        env = "MESHWIRE_CP_TLS_NAMES",
        value_delimiter = ','
    )]
    pub tls_names: Vec<String>,
    /// The SPIFFE trust domain of every identity the CA issues.
    #[arg(long, env = "MESHWIRE_TRUST_DOMAIN", default_value = ca::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Lifetime of workload certificates (at least 1m); sidecars renew at about 2/3 of it.
    #[arg(long, env = "MESHWIRE_CERT_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    pub cert_lifetime: Duration,
    /// Sign with this CA certificate (PEM; a root, or an intermediate with --ca-bundle) instead of a generated root.
    #[arg(long, env = "MESHWIRE_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The private key of --ca-cert (PEM).
    #[arg(long, env = "MESHWIRE_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// The roots to trust (PEM) [default: --ca-cert, which must then be self-signed].
    #[arg(long, env = "MESHWIRE_CA_BUNDLE", requires = "ca_cert")]
    pub ca_bundle: Option<PathBuf>,
    /// Admin HTTP port: `/live`, `/ready` and Prometheus `/metrics` (no token).
    #[arg(long, env = "MESHWIRE_CP_ADMIN", default_value = "127.0.0.1:15011")]
    pub admin: SocketAddr,
    /// Where the configuration database and the admin token live (created if missing).
    #[arg(long, env = "MESHWIRE_DATA_DIR", default_value = "./meshwire-data")]
    pub data_dir: PathBuf,
    /// Keep the configuration in etcd instead of the embedded database, shared by every
    /// replica started with the same --etcd and --etcd-prefix: client URLs of the members,
    /// comma-separated (`http://10.0.0.1:2379,http://10.0.0.2:2379`).
    #[arg(long, env = "MESHWIRE_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Every key this mesh writes to etcd is under it; meshes sharing one etcd need different ones.
    #[arg(long, env = "MESHWIRE_ETCD_PREFIX", default_value = crate::store::etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// The CA (PEM) that signed etcd's serving certificates; the --etcd URLs are then https://.
    #[arg(long, env = "MESHWIRE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) for etcd's --client-cert-auth.
    #[arg(long, env = "MESHWIRE_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, env = "MESHWIRE_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// With --etcd: a file with 64 hex digits (`openssl rand -hex 32`), the same on every replica;
    /// it seals the CA roots' private keys stored in etcd (AES-256-GCM). Not needed with --ca-cert/--ca-key.
    /// MESHWIRE_ETCD_ENCRYPTION_KEY may hold the hex digits themselves instead.
    #[arg(long, env = "MESHWIRE_ETCD_ENCRYPTION_KEY_FILE")]
    pub etcd_encryption_key_file: Option<PathBuf>,
    /// With --etcd: how often the leader replica deletes expired and used join tokens from etcd.
    #[arg(long, env = "MESHWIRE_TOKEN_SWEEP_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub token_sweep_interval: Duration,
    /// Longest wait for etcd on one call; a write not answered by then is refused as UNAVAILABLE.
    #[arg(long, env = "MESHWIRE_ETCD_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub etcd_timeout: Duration,
    /// Once listening, write `{"listen": "ip:port", "tls": "ip:port" | null, "admin": "ip:port", "pid": N}` here (for port 0).
    #[arg(long, env = "MESHWIRE_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// Log filter (`info`, `meshwire_control_plane=debug`, ...), to stderr.
    #[arg(long, env = "MESHWIRE_LOG", default_value = "info")]
    pub log: String,
    /// Longest wait for open calls and streams on SIGTERM/SIGINT.
    #[arg(long, env = "MESHWIRE_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// How long an endpoint a sidecar reported unhealthy stays marked when
    /// nobody refreshes the mark (its reporting stream's replica died); an
    /// open report stream refreshes it every third of this.
    #[arg(long, env = "MESHWIRE_HEALTH_TTL", default_value = "60s", value_parser = parse_duration)]
    pub health_ttl: Duration,
    /// A connection (any port) that makes no call this long after it was
    /// accepted (after its TLS handshake on the TLS port) is closed.
    #[arg(long, env = "MESHWIRE_CP_FIRST_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub first_request_timeout: Duration,
    /// A connection with no call in flight and none started this long is
    /// closed (an open xDS or Watch stream is a call in flight).
    #[arg(long, env = "MESHWIRE_CP_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_timeout)]
    pub idle_timeout: Duration,
    /// Connections held at once over all ports; at the budget a new one
    /// closes the oldest that has asked nothing yet, else the one idle
    /// longest. Default: the descriptor limit at start less those open and 32.
    #[arg(long, env = "MESHWIRE_CP_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
    #[command(subcommand)]
    pub command: Option<Sub>,
}

/// One-off commands instead of serving.
#[derive(Debug, Clone, Subcommand)]
pub enum Sub {
    /// Write an admin client certificate (admin.crt, admin.key, bundle.pem) signed by the CA in
    /// --data-dir (with --etcd: the replicas' CA in etcd), for `meshctl --server https://HOST:15012 --ca-bundle bundle.pem --cert admin.crt
    /// --key admin.key`; then exit. Safe while the control plane runs.
    AdminCert {
        /// The directory to write the files into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// How long the certificate is valid (1m..365d).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        lifetime: Duration,
    },
}

/// Writes an admin certificate from the CA in the data directory.
fn admin_cert(
    cfg: &ca::CaConfig,
    etcd: Option<&crate::store::EtcdConfig>,
    data_dir: &Path,
    out: &Path,
    lifetime: Duration,
) -> Result<(), String> {
    if !(ca::MIN_CERT_LIFETIME..=Duration::from_secs(365 * 24 * 3600)).contains(&lifetime) {
        return Err(format!(
            "--lifetime {}: must be between 1m and 365d",
            humantime::format_duration(lifetime)
        ));
    }
    let ca = match etcd {
        None => ca::Ca::open(data_dir, cfg)
            .map_err(|e| format!("--data-dir {}: {e}", data_dir.display()))?,
        Some(etcd) => open_etcd_ca(cfg, data_dir, etcd)?,
    };
    let (chain, key) = ca.admin_credentials(lifetime).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(out).map_err(|e| format!("--out {}: {e}", out.display()))?;
    let write = |name: &str, data: &str, private: bool| -> Result<PathBuf, String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = out.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&path)
            .and_then(|mut f| f.write_all(data.as_bytes()).map(|()| f))
            .map_err(|e| format!("--out {}: {e}", path.display()))?;
        f.flush()
            .map_err(|e| format!("--out {}: {e}", path.display()))?;
        Ok(path)
    };
    let crt = write("admin.crt", &chain, false)?;
    let key_path = write("admin.key", &key, true)?;
    let bundle = write("bundle.pem", &ca.bundle().bundle.to_pem(), false)?;
    println!(
        "wrote {}, {} and {}",
        crt.display(),
        key_path.display(),
        bundle.display()
    );
    Ok(())
}

/// The CA the replicas share on etcd, for `admin-cert`.
fn open_etcd_ca(
    cfg: &ca::CaConfig,
    data_dir: &Path,
    etcd: &crate::store::EtcdConfig,
) -> Result<std::sync::Arc<ca::Ca>, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async {
        let store = crate::store::EtcdStore::new(etcd)
            .await
            .map_err(|e| e.to_string())?;
        let shared = ca::shared::Shared::new(
            store.kv(),
            cfg.etcd_seal_key.clone(),
            tokio::runtime::Handle::current(),
        );
        let (dir, cfg) = (data_dir.to_owned(), cfg.clone());
        tokio::task::spawn_blocking(move || ca::Ca::open_shared(&dir, &cfg, shared))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("the CA in etcd: {e}"))
    })
}

/// A connection timeout: a duration above zero (zero would close every
/// connection at once).
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be above zero (write e.g. 10s, 5m)".into()),
        d => Ok(d),
    }
}

/// `--tls-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsListen(pub Option<SocketAddr>);

fn parse_tls_listen(s: &str) -> Result<TlsListen, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(TlsListen(None));
    }
    s.parse()
        .map(|a| TlsListen(Some(a)))
        .map_err(|_| format!("{s:?} is not ip:port (or `off`)"))
}

/// The sealing key for the CA on etcd: `--etcd-encryption-key-file`, else
/// `MESHWIRE_ETCD_ENCRYPTION_KEY` (hex); the error names where it came from.
fn seal_key(args: &Args) -> Result<Option<std::sync::Arc<ca::shared::SealKey>>, String> {
    if let Some(p) = &args.etcd_encryption_key_file {
        return ca::shared::SealKey::from_file(p).map(|k| Some(std::sync::Arc::new(k)));
    }
    match std::env::var("MESHWIRE_ETCD_ENCRYPTION_KEY") {
        Ok(hex) if !hex.is_empty() => ca::shared::SealKey::from_hex(&hex)
            .map(|k| Some(std::sync::Arc::new(k)))
            .map_err(|e| format!("MESHWIRE_ETCD_ENCRYPTION_KEY: {e}")),
        _ => Ok(None),
    }
}

fn ca_config(args: &Args) -> ca::CaConfig {
    ca::CaConfig {
        etcd_seal_key: None,
        token_sweep_interval: args.token_sweep_interval,
        trust_domain: args.trust_domain.clone(),
        cert_lifetime: args.cert_lifetime,
        user_ca: match (&args.ca_cert, &args.ca_key) {
            (Some(cert), Some(key)) => Some(ca::UserCa {
                cert: cert.clone(),
                key: key.clone(),
                bundle: args.ca_bundle.clone(),
            }),
            _ => None,
        },
    }
}

fn etcd_config(args: &Args) -> Option<crate::store::EtcdConfig> {
    if args.etcd.is_empty() {
        return None;
    }
    let mut c = crate::store::EtcdConfig::new(args.etcd.clone());
    c.prefix = crate::store::EtcdConfig::normalize_prefix(&args.etcd_prefix);
    c.request_timeout = args.etcd_timeout;
    c.tls = args.etcd_ca.as_ref().map(|ca| crate::store::etcd::EtcdTls {
        ca: ca.clone(),
        cert: args.etcd_cert.clone(),
        key: args.etcd_key.clone(),
    });
    Some(c)
}

/// Checks what clap cannot; the error names the flag.
fn check(args: &Args) -> Result<(), String> {
    if args.cert_lifetime < ca::MIN_CERT_LIFETIME {
        return Err(format!(
            "--cert-lifetime {}: must be at least {}",
            humantime::format_duration(args.cert_lifetime),
            humantime::format_duration(ca::MIN_CERT_LIFETIME)
        ));
    }
    if meshwire_tls::SpiffeId::for_service(&args.trust_domain, "default", "x").is_err() {
        return Err(format!(
            "--trust-domain {:?}: lowercase letters, digits, '-', '.' and '_' only",
            args.trust_domain
        ));
    }
    for n in &args.tls_names {
        if n.parse::<std::net::IpAddr>().is_err()
            && (rustls::pki_types::DnsName::try_from(n.as_str()).is_err() || n.ends_with('.'))
        {
            return Err(format!("--tls-name {n:?}: not a DNS name or IP address"));
        }
    }
    if let Some(etcd) = etcd_config(args) {
        etcd.check()?;
        if args.ca_cert.is_none() && seal_key(args)?.is_none() {
            return Err("--etcd keeps the CA's roots in etcd with their keys sealed: give every replica the same --etcd-encryption-key-file (openssl rand -hex 32), or the CA as files (--ca-cert/--ca-key)".into());
        }
        if args.token_sweep_interval < Duration::from_millis(100) {
            return Err("--token-sweep-interval: at least 100ms".into());
        }
    } else if args.etcd_ca.is_some() {
        return Err("--etcd-ca: only with --etcd".into());
    } else if args.etcd_encryption_key_file.is_some() {
        return Err("--etcd-encryption-key-file: only with --etcd".into());
    }
    for (flag, path) in [
        ("--ca-cert", &args.ca_cert),
        ("--ca-key", &args.ca_key),
        ("--ca-bundle", &args.ca_bundle),
        ("--etcd-ca", &args.etcd_ca),
        ("--etcd-cert", &args.etcd_cert),
        ("--etcd-key", &args.etcd_key),
        ("--etcd-encryption-key-file", &args.etcd_encryption_key_file),
    ] {
        if let Some(p) = path
            && !p.is_file()
        {
            return Err(format!("{flag} {}: no such file", p.display()));
        }
    }
    Ok(())
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match EnvFilter::try_new(&args.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("meshwire-control-plane: --log {:?}: {e}", args.log);
            return ExitCode::from(2);
        }
    };
    // An empty variable (as compose files leave them) means unset.
    let admin_token = std::env::var("MESHWIRE_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    if let Some(t) = &admin_token
        && let Err(e) = auth::check_token("MESHWIRE_ADMIN_TOKEN", t)
    {
        eprintln!("meshwire-control-plane: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = check(&args) {
        eprintln!("meshwire-control-plane: {e}");
        return ExitCode::from(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let mut cfg = ControlPlaneConfig::new(&args.data_dir);
    if let Some(Sub::AdminCert { out, lifetime }) = &args.command {
        cfg.ca = ca_config(&args);
        let etcd = etcd_config(&args);
        if etcd.is_some() {
            cfg.ca.etcd_seal_key = match seal_key(&args) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("meshwire-control-plane: {e}");
                    return ExitCode::from(2);
                }
            };
        }
        return match admin_cert(&cfg.ca, etcd.as_ref(), &args.data_dir, out, *lifetime) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshwire-control-plane admin-cert: {e}");
                ExitCode::FAILURE
            }
        };
    }
    cfg.listen = args.listen;
    cfg.admin = Some(args.admin);
    cfg.admin_token = admin_token;
    cfg.shutdown_timeout = args.shutdown_timeout;
    cfg.health_ttl = args.health_ttl;
    cfg.tls_listen = args.tls_listen.0;
    cfg.plaintext_xds = args.plaintext_xds;
    cfg.conn_limits = crate::net::ConnLimits {
        first_request: args.first_request_timeout,
        idle: args.idle_timeout,
    };
    cfg.max_connections = args.max_connections.map(|n| n as usize);
    if !args.tls_names.is_empty() {
        cfg.tls_names = args.tls_names.clone();
    }
    cfg.ca = ca_config(&args);
    if let Some(etcd) = etcd_config(&args) {
        cfg.store = crate::StoreConfig::Etcd(etcd);
        cfg.ca.etcd_seal_key = match seal_key(&args) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("meshwire-control-plane: {e}");
                return ExitCode::from(2);
            }
        };
    }

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshwire-control-plane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let mut cp = match ControlPlane::start(cfg).await {
            Ok(cp) => cp,
            Err(e) => {
                eprintln!("meshwire-control-plane: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(path) = &args.addr_file
            && let Err(e) = write_addr_file(path, &cp)
        {
            eprintln!(
                "meshwire-control-plane: --addr-file {}: {e}",
                path.display()
            );
            let _ = cp.stop().await;
            return ExitCode::FAILURE;
        }
        let failed = tokio::select! {
            () = wait_for_signal() => None,
            r = cp.wait() => Some(r),
        };
        let result = match failed {
            Some(r) => r,
            None => {
                cp.shutdown();
                cp.wait().await
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshwire-control-plane: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Writes the bound address as JSON (a temp file, then rename, so readers
/// never see half of it).
fn write_addr_file(path: &Path, cp: &ControlPlaneHandle) -> std::io::Result<()> {
    let v = serde_json::json!({
        "listen": cp.local_addr.to_string(),
        "tls": cp.tls_addr.map(|a| a.to_string()),
        "admin": cp.admin_addr.map(|a| a.to_string()),
        "pid": std::process::id(),
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, v.to_string())?;
    std::fs::rename(tmp, path)
}

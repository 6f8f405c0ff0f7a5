//! The edge gateway (`meshwire-sidecar --gateway`) end to end: a real
//! gateway process terminating TLS (certificates made here with rcgen) for
//! real clients (curl over HTTP/1.1 and h2, tonic over TLS, hyper over TLS),
//! routing into the mesh over mTLS with its own SPIFFE identity to real
//! server sidecar processes, whose policy admits the gateway only.
//!
//! Apps: `web` (protocol http) is an h2c app that answers with the request
//! as it arrived (path, headers), `echo` (grpc) the example echo service,
//! `chat` (http) a WebSocket echo server.

#![allow(clippy::print_stderr)] // the measured rate and reload figures

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use meshwire_proto::example::v1::echo_client::EchoClient;
use meshwire_tests::*;
use meshwire_tls::testing::TestCa;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

const WEB_HOST: &str = "api.test";
const OTHER_HOST: &str = "other.test";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "edge-api";
const HMAC_SECRET: &[u8] = b"a shared secret of at least 32 bytes!!";

fn spiffe(service: &str) -> String {
    format!("spiffe://test.local/ns/default/sa/{service}")
}

fn pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

// === public certificates ===

/// The public CA the clients trust (not the mesh's).
struct PublicCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl PublicCa {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "public test CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A leaf for `names`: (certificate PEM, key PEM).
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for c in meshwire_tls::certs_from_pem(&self.pem).unwrap() {
            roots.add(c).unwrap();
        }
        roots
    }
}

// === JWT keys ===

/// Signing keys for each algorithm, and the JWKS the gateway reads.
struct Keys {
    rsa: jsonwebtoken::EncodingKey,
    ec: jsonwebtoken::EncodingKey,
    ed: jsonwebtoken::EncodingKey,
    hmac: jsonwebtoken::EncodingKey,
    /// Not in the JWKS: forges tokens under the RSA key's kid.
    forger: jsonwebtoken::EncodingKey,
}

/// A new private key (PKCS#8 PEM) from `openssl genpkey` with `args`.
fn openssl_key(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("run openssl (scripts/setup-test-deps.sh installs it)");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

impl Keys {
    fn new() -> Self {
        use jsonwebtoken::EncodingKey as E;
        let rsa = || openssl_key(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
        let ec = openssl_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        Keys {
            rsa: E::from_rsa_pem(rsa().as_bytes()).unwrap(),
            ec: E::from_ec_pem(ec.as_bytes()).unwrap(),
            ed: E::from_ed_pem(openssl_key(&["-algorithm", "ed25519"]).as_bytes()).unwrap(),
            hmac: E::from_secret(HMAC_SECRET).unwrap(),
            forger: E::from_rsa_pem(rsa().as_bytes()).unwrap(),
        }
    }

    fn jwks(&self) -> String {
        use jsonwebtoken::Algorithm as A;
        Self::set(&[
            (&self.rsa, A::RS256, "rsa"),
            (&self.ec, A::ES256, "ec"),
            (&self.ed, A::EdDSA, "ed"),
            (&self.hmac, A::HS256, "hmac"),
        ])
    }

    /// A JWKS document of `keys` (key, algorithm, kid).
    fn set(keys: &[(&jsonwebtoken::EncodingKey, jsonwebtoken::Algorithm, &str)]) -> String {
        use jsonwebtoken::jwk::Jwk;
        let keys: Vec<Jwk> = keys
            .iter()
            .copied()
            .map(|(k, alg, kid)| {
                let mut j = Jwk::from_encoding_key(k, alg).unwrap();
                j.common.key_id = Some(kid.into());
                j
            })
            .collect();
        serde_json::to_string(&serde_json::json!({ "keys": keys })).unwrap()
    }
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A token for `sub` signed with `key` as `alg`/`kid`, with `claims` merged in.
fn token(
    key: &jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
    kid: &str,
    sub: &str,
    claims: serde_json::Value,
) -> String {
    let mut c = serde_json::json!({
        "sub": sub,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now() + 600,
        "email": format!("{sub}@example.com"),
    });
    for (k, v) in claims.as_object().unwrap() {
        c[k] = v.clone();
    }
    let mut h = jsonwebtoken::Header::new(alg);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, &c, key).unwrap()
}

/// A loopback HTTP server answering every GET with `body` (a JWKS).
async fn serve_jwks(body: String) -> SocketAddr {
    let l = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let body = Bytes::from(body);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(body))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

// === the rig ===

/// Server sidecar processes for `web` and `echo` (policy: the gateway only)
/// and the gateway process in front of them.
struct Rig {
    _web_app: tokio::task::JoinHandle<()>,
    _echo_app: meshwire_examples::echo::EchoHandle,
    _servers: Vec<SidecarProcess>,
    gateway: SidecarProcess,
    dir: tempfile::TempDir,
    ca: PublicCa,
    keys: Keys,
}

/// Writes the mesh certificate of `service` into `dir`: (cert, key, bundle) paths.
fn mesh_files(mesh: &TestCa, dir: &Path, service: &str) -> [PathBuf; 3] {
    let creds = mesh.leaf(&spiffe(service));
    let paths = [
        dir.join(format!("{service}.pem")),
        dir.join(format!("{service}.key")),
        dir.join("bundle.pem"),
    ];
    std::fs::write(&paths[0], pem("CERTIFICATE", &creds.chain[0])).unwrap();
    std::fs::write(&paths[1], pem("PRIVATE KEY", creds.key.secret_der())).unwrap();
    std::fs::write(&paths[2], pem("CERTIFICATE", mesh.root())).unwrap();
    paths
}

fn identity_args<'a>(files: &'a [PathBuf; 3], config: &'a Path, service: &'a str) -> Vec<&'a str> {
    vec![
        "--cert",
        files[0].to_str().unwrap(),
        "--key",
        files[1].to_str().unwrap(),
        "--trust-bundle",
        files[2].to_str().unwrap(),
        "--static-config",
        config.to_str().unwrap(),
        "--service",
        service,
    ]
}

const ROUTES: &str = r#"
routes:
  - name: web
    hosts: [api.test]
    path_prefix: /
    service: web
    methods: [GET, POST, HEAD]
    limits: {max_body_bytes: 1024}
  - name: secure
    hosts: [api.test]
    path_prefix: /secure
    service: web
    jwt: {provider: main, required: true}
  - name: open
    hosts: [api.test]
    path_prefix: /open
    service: web
    jwt: {provider: main, required: false}
  - name: admin
    hosts: [api.test]
    path_prefix: /admin
    service: web
    jwt: {provider: main}
  - name: ip
    hosts: [api.test]
    path_prefix: /ip
    service: web
    ip: {deny: [127.0.0.2/32]}
  - name: limited
    hosts: [api.test]
    path_prefix: /limited
    service: web
    jwt: {provider: main}
    rate_limits: [{key: subject, rate: 20/s, burst: 5}]
  - name: chat
    hosts: [api.test]
    path_prefix: /chat
    service: chat
    jwt: {provider: main}
  - name: other
    hosts: ["*.other.test", other.test]
    service: web
  - name: echo
    hosts: [api.test]
    path_prefix: /meshwire.example.v1.Echo
    service: echo
    jwt: {provider: main, required: false}
    ip: {deny: [127.0.0.2/32]}
    rate_limits: [{key: client_ip, rate: 1/h, burst: 3}]
"#;

impl Rig {
    async fn start() -> Rig {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mesh = TestCa::new("test.local");
        let (web_addr, web_app) = raw_h2_app().await;
        let echo_app = echo("echo-1").await;
        let chat_app = websocket_echo().await;

        // Server sidecars: each admits the gateway's identity only.
        let mut servers = Vec::new();
        let mut inbound = std::collections::HashMap::new();
        for (svc, protocol, app) in [
            ("web", "http", web_addr),
            ("echo", "grpc", echo_app.addr),
            ("chat", "http", chat_app),
        ] {
            let sub = d.join(svc);
            std::fs::create_dir(&sub).unwrap();
            let files = mesh_files(&mesh, &sub, svc);
            let config = sub.join("mesh.yaml");
            std::fs::write(
                &config,
                format!(
                    "services:\n  - name: {svc}\n    protocol: {protocol}\n    policy:\n      default_action: deny\n      rules:\n        - action: allow\n          sources: [\"{}\"]\n",
                    spiffe("gateway")
                ),
            )
            .unwrap();
            let mut args = identity_args(&files, &config, svc);
            let app = app.to_string();
            args.extend(["--app", &app]);
            let p = SidecarProcess::spawn(&args, &[]).await;
            inbound.insert(svc, p.addrs.inbound.expect("inbound"));
            servers.push(p);
        }

        // The gateway.
        let ca = PublicCa::new();
        let keys = Keys::new();
        for (name, hosts) in [
            ("api", vec![WEB_HOST]),
            ("other", vec![OTHER_HOST, "*.other.test"]),
        ] {
            let (c, k) = ca.leaf(&hosts);
            std::fs::write(d.join(format!("{name}.pem")), c).unwrap();
            std::fs::write(d.join(format!("{name}.key")), k).unwrap();
        }
        std::fs::write(d.join("jwks.json"), keys.jwks()).unwrap();
        // A second issuer whose keys come from a URL: the EC key under another kid.
        let jwks_url = serve_jwks(Keys::set(&[(
            &keys.ec,
            jsonwebtoken::Algorithm::ES256,
            "from-url",
        )]))
        .await;
        let gw = d.join("gateway.yaml");
        std::fs::write(
            &gw,
            format!(
                r#"
listeners:
  - address: 127.0.0.1:0
    certificates:
      - {{cert: api.pem, key: api.key}}
      - {{cert: other.pem, key: other.key}}
  - address: 127.0.0.1:0
    certificates: [{{cert: api.pem, key: api.key}}]
    proxy_protocol: true
reload_interval: 100ms
access_log: access.log
limits: {{max_headers: 40, max_uri_length: 2048}}
trusted_proxies: {{cidrs: [127.0.0.3/32], hops: 1}}
jwt_providers:
  - name: main
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks_file: jwks.json
    clock_skew: 5s
    claim_headers: {{email: x-jwt-email}}
  - name: by-url
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks_url: http://{jwks_url}/.well-known/jwks.json
{ROUTES}  - name: url
    hosts: [api.test]
    path_prefix: /url
    service: web
    jwt: {{provider: by-url}}
"#
            ),
        )
        .unwrap();
        let services = format!(
            "services:\n  - name: web\n    protocol: http\n    endpoints:\n      - address: {}\n        identity: {}\n  - name: echo\n    endpoints:\n      - address: {}\n        identity: {}\n  - name: chat\n    protocol: http\n    endpoints:\n      - address: {}\n        identity: {}\n",
            inbound["web"],
            spiffe("web"),
            inbound["echo"],
            spiffe("echo"),
            inbound["chat"],
            spiffe("chat")
        );
        let gsub = d.join("gw");
        std::fs::create_dir(&gsub).unwrap();
        let files = mesh_files(&mesh, &gsub, "gateway");
        let config = gsub.join("mesh.yaml");
        std::fs::write(&config, services).unwrap();
        let mut args = identity_args(&files, &config, "gateway");
        args.extend(["--gateway", gw.to_str().unwrap()]);
        let gateway = SidecarProcess::spawn(&args, &[]).await;
        assert_eq!(gateway.addrs.gateway.len(), 2, "{:?}", gateway.addrs);
        Rig {
            _web_app: web_app,
            _echo_app: echo_app,
            _servers: servers,
            gateway,
            dir,
            ca,
            keys,
        }
    }

    fn port(&self) -> u16 {
        self.gateway.addrs.gateway[0].port()
    }

    fn addr(&self) -> SocketAddr {
        self.gateway.addrs.gateway[0]
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port())
    }

    fn ca_file(&self) -> PathBuf {
        let p = self.dir.path().join("public-ca.pem");
        if !p.exists() {
            std::fs::write(&p, &self.ca.pem).unwrap();
        }
        p
    }

    /// curl over TLS to `host` (resolved to the gateway) with `args`; returns
    /// (HTTP status, headers+body text). `-i` output, `--path-as-is`.
    async fn curl(&self, host: &str, path: &str, args: &[&str]) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-i", "--path-as-is", "--max-time", "20"])
            .arg("--cacert")
            .arg(self.ca_file())
            .arg("--resolve")
            .arg(format!("{host}:{}:127.0.0.1", self.port()))
            .args(["-w", "\n%{http_code} %{http_version}"])
            .args(args)
            .arg(self.url(host, path))
            .stdin(Stdio::null());
        let out = tokio::task::spawn_blocking(move || cmd.output().expect("run curl"))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl {path}: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = text
            .lines()
            .last()
            .and_then(|l| l.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, text)
    }

    fn tls_client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut c = rustls::ClientConfig::builder_with_provider(meshwire_tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.ca.roots())
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(c)
    }

    /// A TLS connection from `local` (an address of 127.0.0.0/8) to the gateway.
    async fn tls(
        &self,
        local: IpAddr,
        host: &str,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(local, 0)).unwrap();
        let tcp = sock.connect(self.addr()).await.unwrap();
        TlsConnector::from(self.tls_client(alpn))
            .connect(
                rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap(),
                tcp,
            )
            .await
            .unwrap()
    }

    /// TLS to the PROXY-protocol listener from `local`, after `header`.
    async fn tls_after(
        &self,
        local: IpAddr,
        header: &[u8],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        use tokio::io::AsyncWriteExt;
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(local, 0))?;
        let mut tcp = sock.connect(self.gateway.addrs.gateway[1]).await?;
        tcp.write_all(header).await?;
        TlsConnector::from(self.tls_client(&[b"http/1.1"]))
            .connect(
                rustls::pki_types::ServerName::try_from(WEB_HOST).unwrap(),
                tcp,
            )
            .await
    }

    /// An HTTP/1.1 keep-alive connection over TLS from `local`.
    async fn http1(&self, local: IpAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
        let io = self.tls(local, WEB_HOST, &[b"http/1.1"]).await;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    /// A tonic Echo client over TLS (ALPN h2) from `local`.
    async fn grpc(&self, local: IpAddr) -> EchoClient<tonic::transport::Channel> {
        let tls = self.tls_client(&[b"h2"]);
        let addr = self.addr();
        let connector = tower::service_fn(move |_: http::Uri| {
            let tls = tls.clone();
            async move {
                let sock = TcpSocket::new_v4()?;
                sock.bind(SocketAddr::new(local, 0))?;
                let tcp = sock.connect(addr).await?;
                let s = TlsConnector::from(tls)
                    .connect(
                        rustls::pki_types::ServerName::try_from(WEB_HOST).unwrap(),
                        tcp,
                    )
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        });
        let ch = tonic::transport::Endpoint::from_shared(format!("https://{WEB_HOST}"))
            .unwrap()
            .connect_with_connector(connector)
            .await
            .expect("gRPC over TLS to the gateway");
        EchoClient::new(ch)
    }

    fn access_log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect()
    }
}

/// GET `path` on `send`; (status, headers, body).
async fn get(
    send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Bytes) {
    send.ready().await.expect("connection still open");
    let mut req = http::Request::get(path).header("host", WEB_HOST);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

/// The JSON the web app answered with (after curl's `-i` head).
fn app_json(text: &str) -> serde_json::Value {
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    let body = body.rsplit_once('\n').map_or(body, |(b, _)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn lo(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

// === the tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sni_http1_h2_and_grpc_through_the_gateway_into_the_mesh() {
    let rig = Rig::start().await;

    // HTTP/1.1 and HTTP/2 (ALPN) with real curl; TLS 1.2 and 1.3.
    for (args, version) in [
        (vec!["--http1.1"], "1.1"),
        (vec!["--http2"], "2"),
        (vec!["--http1.1", "--tlsv1.2", "--tls-max", "1.2"], "1.1"),
        (vec!["--http2", "--tlsv1.3"], "2"),
    ] {
        let (status, text) = rig
            .curl(
                WEB_HOST,
                "/hello?q=1",
                &[
                    &args[..],
                    &[
                        "-H",
                        "x-forwarded-for: 192.0.2.66",
                        "-H",
                        "forwarded: for=192.0.2.66",
                    ],
                ]
                .concat(),
            )
            .await;
        assert_eq!(status, 200, "{args:?}: {text}");
        assert!(
            text.ends_with(&format!("200 {version}")),
            "{args:?}: {text}"
        );
        let seen = app_json(&text);
        assert_eq!(
            (&seen["path"], &seen["query"]),
            (&"/hello".into(), &"q=1".into())
        );
        let h = &seen["headers"];
        assert_eq!(h["x-forwarded-proto"], "https");
        let xff = h["x-forwarded-for"].as_str().unwrap();
        assert!(
            xff.starts_with("127.0.0.1") && !xff.contains("192.0.2.66"),
            "an untrusted client's x-forwarded-for is replaced: {xff}"
        );
        let fwd = h["forwarded"].as_str().unwrap();
        assert!(
            fwd.starts_with("for=127.0.0.1;proto=https") && !fwd.contains("192.0.2.66"),
            "and so is its forwarded: {fwd}"
        );
    }

    // Several certificates by SNI: curl checks the name, so each host must
    // get its own certificate.
    let (status, text) = rig.curl(OTHER_HOST, "/x", &[]).await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = rig.curl("a.other.test", "/x", &[]).await;
    assert_eq!(status, 200, "wildcard certificate and route: {text}");
    // Unknown host: no route.
    let (status, text) = rig.curl("nope.test", "/x", &["-k"]).await;
    assert_eq!(status, 404, "{text}");

    // gRPC over TLS (tonic, ALPN h2), into the mesh to the echo app.
    let mut c = rig.grpc(lo(1)).await;
    let r = c
        .echo(EchoRequest::default())
        .await
        .expect("echo through the gateway");
    assert_eq!(r.get_ref().server, "echo-1");

    // Certificate reload under load: new files, no restart, no failed request.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let before = served_cert(&rig, WEB_HOST).await;
    let mut open = rig.http1(lo(1)).await;
    assert_eq!(get(&mut open, "/hello", &[]).await.0, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load = {
        let url = rig.url(WEB_HOST, "/hello");
        let ca = rig.ca_file();
        let resolve = format!("{WEB_HOST}:{}:127.0.0.1", rig.port());
        let (stop, done) = (stop.clone(), done.clone());
        tokio::task::spawn_blocking(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(Relaxed) {
                // A new connection (new handshake) each time.
                let out = Command::new("curl")
                    .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                    .arg(&ca)
                    .args(["--resolve", &resolve, &url])
                    .output()
                    .unwrap();
                done.fetch_add(1, Relaxed);
                if out.status.success() && out.stdout == b"200" {
                    ok += 1;
                } else {
                    failed.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
            }
            (ok, failed)
        })
    };
    let under_load = |n: u64| {
        let done = done.clone();
        async move {
            eventually("requests under load", Duration::from_secs(30), || {
                let d = done.load(Relaxed);
                async move { d >= n }
            })
            .await
        }
    };
    under_load(10).await;
    let (c2, k2) = rig.ca.leaf(&[WEB_HOST]);
    // Key first, then the certificate: in between the pair does not match,
    // that reload fails and the old pair keeps serving.
    let d = rig.dir.path();
    std::fs::write(d.join("api.key.new"), k2).unwrap();
    std::fs::rename(d.join("api.key.new"), d.join("api.key")).unwrap();
    std::fs::write(d.join("api.pem.new"), c2).unwrap();
    std::fs::rename(d.join("api.pem.new"), d.join("api.pem")).unwrap();
    let mut after = before.clone();
    for _ in 0..500 {
        after = served_cert(&rig, WEB_HOST).await;
        if after != before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(after, before, "the new certificate is served");
    under_load(done.load(Relaxed) + 10).await;
    stop.store(true, Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed during the reload: {failed:?}",
        failed.len()
    );
    assert!(ok >= 20);
    assert_eq!(
        get(&mut open, "/hello", &[]).await.0,
        200,
        "a connection opened before the reload goes on"
    );
    eprintln!("certificate reload: {ok} requests on new connections, 0 failed");

    // The access log has one JSON line per request (written as each response ends).
    eventually(
        "the gRPC call's access-log line",
        Duration::from_secs(5),
        || async { rig.access_log().iter().any(|l| l["protocol"] == "grpc") },
    )
    .await;
    let log = rig.access_log();
    let line = log
        .iter()
        .find(|l| l["protocol"] == "grpc")
        .expect("a gRPC line");
    assert_eq!(line["route"], "echo");
    assert_eq!(line["service"], "echo");
    assert_eq!(line["status"], 200);
    assert_eq!(line["grpc_status"], 0);
    assert!(line["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(
        log.iter()
            .any(|l| l["rejected"] == "no-route" && l["status"] == 404)
    );
}

/// The leaf certificate (DER) the gateway serves for `sni`.
async fn served_cert(rig: &Rig, sni: &str) -> Vec<u8> {
    let s = rig.tls(lo(1), sni, &[b"http/1.1"]).await;
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_authentication_per_route() {
    use jsonwebtoken::Algorithm as A;
    let rig = Rig::start().await;
    let k = &rig.keys;
    let auth = |t: &str| format!("Authorization: Bearer {t}");

    // Every algorithm verifies; subject and claims go upstream, the token does not.
    for (key, alg, kid) in [
        (&k.rsa, A::RS256, "rsa"),
        (&k.ec, A::ES256, "ec"),
        (&k.ed, A::EdDSA, "ed"),
        (&k.hmac, A::HS256, "hmac"),
    ] {
        let t = token(key, alg, kid, "alice", serde_json::json!({}));
        let (status, text) = rig
            .curl(
                WEB_HOST,
                "/secure/x",
                &["-H", &auth(&t), "-H", "x-jwt-subject: mallory"],
            )
            .await;
        assert_eq!(status, 200, "{alg:?}: {text}");
        let h = &app_json(&text)["headers"];
        assert_eq!(h["x-jwt-subject"], "alice", "{alg:?}: set by the gateway");
        assert_eq!(h["x-jwt-email"], "alice@example.com");
        assert!(
            h.get("authorization").is_none(),
            "the token stays at the edge"
        );
    }

    // Refusals: 401 with a Bearer challenge.
    let forged = token(&k.forger, A::RS256, "rsa", "alice", serde_json::json!({}));
    let expired = token(
        &k.ec,
        A::ES256,
        "ec",
        "alice",
        serde_json::json!({"exp": now() - 60}),
    );
    let wrong_aud = token(
        &k.ec,
        A::ES256,
        "ec",
        "alice",
        serde_json::json!({"aud": "other"}),
    );
    let wrong_iss = token(
        &k.ec,
        A::ES256,
        "ec",
        "alice",
        serde_json::json!({"iss": "https://evil"}),
    );
    // Within the 5 s clock skew: still accepted.
    let skewed = token(
        &k.ec,
        A::ES256,
        "ec",
        "alice",
        serde_json::json!({"exp": now() - 1}),
    );
    for (what, t, description) in [
        ("forged", forged.as_str(), "bad signature"),
        ("expired", &expired, "token expired"),
        ("wrong audience", &wrong_aud, "wrong audience"),
        ("wrong issuer", &wrong_iss, "wrong issuer"),
        ("garbage", "not.a.jwt", "malformed token"),
    ] {
        let (status, text) = rig.curl(WEB_HOST, "/secure/x", &["-H", &auth(t)]).await;
        assert_eq!(status, 401, "{what}: {text}");
        assert!(
            text.contains(&format!(
                "error=\"invalid_token\", error_description=\"{description}\""
            )),
            "{what}: {text}"
        );
    }
    let (status, _) = rig
        .curl(WEB_HOST, "/secure/x", &["-H", &auth(&skewed)])
        .await;
    assert_eq!(status, 200, "expired 1 s ago, within the skew");
    let (status, text) = rig.curl(WEB_HOST, "/secure/x", &[]).await;
    assert_eq!(status, 401, "missing: {text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("www-authenticate: bearer realm=\"meshwire\"\r\n"),
        "{text}"
    );

    // Optional: no token passes without an identity (and spoofed identity
    // headers are removed); a bad token is still refused.
    let (status, text) = rig
        .curl(
            WEB_HOST,
            "/open",
            &["-H", "x-jwt-subject: mallory", "-H", "x-jwt-email: m@evil"],
        )
        .await;
    assert_eq!(status, 200, "{text}");
    let h = &app_json(&text)["headers"];
    assert!(
        h.get("x-jwt-subject").is_none() && h.get("x-jwt-email").is_none(),
        "{h}"
    );
    let (status, _) = rig.curl(WEB_HOST, "/open", &["-H", &auth(&expired)]).await;
    assert_eq!(status, 401);

    // Keys from a JWKS URL (fetched by the gateway at start): only that
    // provider's routes know them.
    let t = token(&k.ec, A::ES256, "from-url", "dave", serde_json::json!({}));
    eventually(
        "the JWKS URL is fetched",
        Duration::from_secs(10),
        || async { rig.curl(WEB_HOST, "/url/x", &["-H", &auth(&t)]).await.0 == 200 },
    )
    .await;
    let (status, text) = rig.curl(WEB_HOST, "/secure/x", &["-H", &auth(&t)]).await;
    assert_eq!(status, 401, "the file provider has no key from-url: {text}");
    assert!(text.contains("no key matches the token"), "{text}");

    // gRPC: UNAUTHENTICATED for a bad token.
    let mut c = rig.grpc(lo(1)).await;
    let mut req = tonic::Request::new(EchoRequest::default());
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {expired}").parse().unwrap(),
    );
    let e = c.echo(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_rules_and_forwarded_for_from_trusted_proxies_only() {
    let rig = Rig::start().await;
    let xff = |v: &str| format!("x-forwarded-for: {v}");
    // (source address, x-forwarded-for, expected status)
    for (from, header, want) in [
        ("127.0.0.1", None, 200),
        ("127.0.0.2", None, 403),
        // Spoofed by an untrusted peer: ignored.
        ("127.0.0.2", Some("127.0.0.1"), 403),
        // 127.0.0.3 is a trusted proxy: its x-forwarded-for names the client.
        ("127.0.0.3", Some("127.0.0.2"), 403),
        ("127.0.0.3", Some("198.51.100.7, 127.0.0.4"), 200),
    ] {
        let mut args = vec!["--interface", from];
        let h = header.map(xff);
        if let Some(h) = &h {
            args.extend(["-H", h.as_str()]);
        }
        let (status, text) = rig.curl(WEB_HOST, "/ip/x", &args).await;
        assert_eq!(status, want, "from {from} with {header:?}: {text}");
        if status == 200 && header.is_some() {
            let seen = app_json(&text)["headers"]["x-forwarded-for"]
                .as_str()
                .unwrap()
                .to_owned();
            assert!(
                seen.starts_with("198.51.100.7, 127.0.0.4, 127.0.0.3"),
                "the chain and the trusted peer: {seen}"
            );
        }
    }
    // gRPC: PERMISSION_DENIED.
    let mut c = rig.grpc(lo(2)).await;
    let e = c.echo(EchoRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_per_subject_and_keep_the_connection() {
    use jsonwebtoken::Algorithm as A;
    let rig = Rig::start().await;
    let alice = format!(
        "Bearer {}",
        token(&rig.keys.ec, A::ES256, "ec", "alice", serde_json::json!({}))
    );
    let bob = format!(
        "Bearer {}",
        token(&rig.keys.ec, A::ES256, "ec", "bob", serde_json::json!({}))
    );
    // Bob, at 10/s (half his limit), on his own connection the whole time.
    let bob_task = {
        let mut send = rig.http1(lo(1)).await;
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for _ in 0..40 {
                tick.tick().await;
                statuses.push(
                    get(&mut send, "/limited/b", &[("authorization", &bob)])
                        .await
                        .0,
                );
            }
            statuses
        })
    };
    // Alice as fast as one keep-alive connection goes, for 4 s.
    let mut send = rig.http1(lo(1)).await;
    let window = Duration::from_secs(4);
    let start = tokio::time::Instant::now();
    let (mut accepted, mut refused) = (0u64, 0u64);
    let mut retry_after = None;
    let mut last = start;
    while start.elapsed() < window {
        let (status, headers, _) = get(&mut send, "/limited/a", &[("authorization", &alice)]).await;
        last = tokio::time::Instant::now();
        match status {
            200 => accepted += 1,
            429 => {
                refused += 1;
                retry_after = headers.get("retry-after").cloned();
            }
            s => panic!("unexpected {s}"),
        }
    }
    // The GCRA bucket: the burst at once, then one per 50 ms.
    let elapsed = (last - start).as_secs_f64();
    let expected = 5.0 + 20.0 * elapsed;
    let rate = (accepted as f64 - 5.0) / elapsed;
    eprintln!(
        "rate limit 20/s burst 5: {accepted} accepted, {refused} refused in {elapsed:.2} s = {rate:.2}/s after the burst"
    );
    assert!(
        (accepted as f64 - expected).abs() <= expected * 0.05,
        "accepted {accepted}, expected {expected:.1} ± 5 %"
    );
    assert!(refused > accepted, "alice went well over the limit");
    assert_eq!(retry_after.expect("429 carries Retry-After"), "1");
    let bob_statuses = bob_task.await.unwrap();
    assert!(
        bob_statuses.iter().all(|s| *s == 200),
        "bob keeps his own budget: {bob_statuses:?}"
    );

    // gRPC: per client IP, burst 3 then RESOURCE_EXHAUSTED, on one channel.
    let mut c = rig.grpc(lo(4)).await;
    for _ in 0..3 {
        c.echo(EchoRequest::default())
            .await
            .expect("within the burst");
    }
    let e = c.echo(EchoRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let mut other = rig.grpc(lo(5)).await;
    other
        .echo(EchoRequest::default())
        .await
        .expect("another client IP has its own bucket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_and_path_spellings_are_refused() {
    let rig = Rig::start().await;
    // The /admin route needs a token: every spelling of it must land there.
    for p in [
        "/admin",
        "//admin",
        "/./admin",
        "/x/../admin",
        "/%61dmin",
        "/%2e%2e/admin",
        "/%2E/admin/",
        "/admin/./../admin/x",
    ] {
        let (status, text) = rig.curl(WEB_HOST, p, &[]).await;
        assert_eq!(status, 401, "{p} reaches the admin route: {text}");
    }
    let (status, text) = rig.curl(WEB_HOST, "/a%2Fb", &[]).await;
    assert_eq!(status, 400, "escaped slash: {text}");
    let (status, _) = rig.curl(WEB_HOST, "/a%zz", &[]).await;
    assert_eq!(status, 400, "bad escape");
    // The service gets the canonical path.
    let (status, text) = rig.curl(WEB_HOST, "//x/./y/../%7ez%c3%a9?a=%2F", &[]).await;
    assert_eq!(status, 200, "{text}");
    let seen = app_json(&text);
    assert_eq!(
        (&seen["path"], &seen["query"]),
        (&"/x/~z%C3%A9".into(), &"a=%2F".into())
    );

    let long = format!("/{}", "a".repeat(3000));
    let (status, _) = rig.curl(WEB_HOST, &long, &[]).await;
    assert_eq!(status, 414);
    let many: Vec<String> = (0..50).map(|i| format!("x-h{i}: v")).collect();
    let mut args = Vec::new();
    for h in &many {
        args.extend(["-H", h.as_str()]);
    }
    let (status, _) = rig.curl(WEB_HOST, "/x", &args).await;
    assert_eq!(status, 431, "more headers than max_headers");
    let (status, text) = rig
        .curl(
            WEB_HOST,
            "/upload",
            &["--http1.1", "--data-binary", &"z".repeat(2000)],
        )
        .await;
    assert_eq!(status, 413, "{text}");
    let (status, _) = rig
        // HTTP/1.1: the web app answers before reading the body, which over
        // h2 may end the stream with a reset curl reports as an error.
        .curl(
            WEB_HOST,
            "/upload",
            &["--http1.1", "--data-binary", &"z".repeat(500)],
        )
        .await;
    assert_eq!(status, 200, "within max_body_bytes");
    // Chunked (no Content-Length): counted as it streams.
    let chunked = [
        "--http1.1",
        "-H",
        "transfer-encoding: chunked",
        "--data-binary",
    ];
    let (status, text) = rig
        .curl(
            WEB_HOST,
            "/upload",
            &[&chunked[..], &[&"z".repeat(5000)]].concat(),
        )
        .await;
    assert_eq!(status, 413, "chunked past the limit: {text}");
    let (status, text) = rig
        .curl(
            WEB_HOST,
            "/upload",
            &[&chunked[..], &[&"z".repeat(500)]].concat(),
        )
        .await;
    assert_eq!(status, 200, "chunked within the limit: {text}");
    let (status, text) = rig.curl(WEB_HOST, "/x", &["-X", "DELETE"]).await;
    assert_eq!(status, 405, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("allow: get, post, head"),
        "{text}"
    );

    // Each refusal is counted in the route's metrics.
    let (_, _, body) = http1_get(rig.gateway.addrs.admin, "admin", "/metrics")
        .await
        .unwrap();
    let m = String::from_utf8_lossy(&body);
    assert!(
        m.contains("meshwire_gateway_rejected_total{route=\"admin\",reason=\"unauthenticated\"} 8"),
        "{m}"
    );
    assert!(
        m.contains("meshwire_gateway_rejected_total{route=\"web\",reason=\"body-too-large\"} 2"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_through_the_gateway_with_a_token() {
    use futures_util::{SinkExt, StreamExt};
    use jsonwebtoken::Algorithm as A;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let rig = Rig::start().await;
    let request = |token: Option<&str>| {
        let mut req = format!("wss://{WEB_HOST}/chat/room")
            .into_client_request()
            .unwrap();
        if let Some(t) = token {
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        req
    };

    // No token: the upgrade is refused with 401.
    let io = rig.tls(lo(1), WEB_HOST, &[b"http/1.1"]).await;
    match tokio_tungstenite::client_async(request(None), io).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }

    // With one: frames both ways through TLS, the gateway, mTLS and the chat sidecar.
    let t = token(&rig.keys.ed, A::EdDSA, "ed", "carol", serde_json::json!({}));
    let io = rig.tls(lo(1), WEB_HOST, &[b"http/1.1"]).await;
    let (mut ws, resp) = tokio_tungstenite::client_async(request(Some(&t)), io)
        .await
        .expect("upgrade through the gateway");
    assert_eq!(resp.status(), 101);
    let big: Vec<u8> = (0..(256u32 << 10)).map(|i| (i % 251) as u8).collect();
    for _ in 0..3 {
        ws.send(Message::binary(big.clone())).await.unwrap();
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => assert!(b[..] == big[..], "256 KiB frame intact"),
            other => panic!("{other:?}"),
        }
    }
    ws.send(Message::text("hello edge")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("hello edge")
    );
    ws.close(None).await.unwrap();
}

/// A PROXY protocol v2 header saying the client is `client`.
fn proxy_header(client: [u8; 4]) -> Vec<u8> {
    use ppp::v2::{Builder, Command, IPv4, Protocol, Version};
    Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        IPv4::new(client, [127, 0, 0, 1], 40000, 443),
    )
    .build()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_from_trusted_proxies_only() {
    let rig = Rig::start().await;
    let http1 = |io: tokio_rustls::client::TlsStream<tokio::net::TcpStream>| async move {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    };
    // 127.0.0.3 is a trusted proxy: the header names the client.
    let mut send = http1(
        rig.tls_after(lo(3), &proxy_header([127, 0, 0, 2]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        get(&mut send, "/ip/x", &[]).await.0,
        403,
        "the stated client is denied"
    );
    let mut send = http1(
        rig.tls_after(lo(3), &proxy_header([198, 51, 100, 9]))
            .await
            .unwrap(),
    )
    .await;
    let (status, _, body) = get(&mut send, "/ip/x", &[("x-forwarded-for", "127.0.0.9")]).await;
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let xff = seen["headers"]["x-forwarded-for"].as_str().unwrap();
    assert!(
        xff.starts_with("198.51.100.9") && !xff.contains("127.0.0.9"),
        "the client behind an L4 proxy is not trusted with x-forwarded-for: {xff}"
    );
    // Any other peer cannot state an address: its header breaks TLS.
    assert!(
        rig.tls_after(lo(1), &proxy_header([198, 51, 100, 9]))
            .await
            .is_err(),
        "an untrusted peer's PROXY header is refused"
    );
    // And the trusted proxy must send one.
    assert!(rig.tls_after(lo(3), &[]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_from_a_browser_style_client() {
    let rig = Rig::start().await;
    // One Echo call as a browser's gRPC-Web client sends it, over HTTP/1.1.
    let frame = rig.dir.path().join("request.bin");
    std::fs::write(&frame, grpc_frame(&EchoRequest::default())).unwrap();
    let out = rig.dir.path().join("response.bin");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "-D", "-", "--cacert"])
        .arg(rig.ca_file())
        .arg("--resolve")
        .arg(format!("{WEB_HOST}:{}:127.0.0.1", rig.port()))
        .args([
            "-H",
            "content-type: application/grpc-web+proto",
            "-H",
            "x-grpc-web: 1",
            "--data-binary",
        ])
        .arg(format!("@{}", frame.display()))
        .arg("-o")
        .arg(&out)
        .arg(rig.url(WEB_HOST, "/meshwire.example.v1.Echo/Echo"));
    let res = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let head = String::from_utf8_lossy(&res.stdout).to_ascii_lowercase();
    assert!(res.status.success(), "{head}");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        // The service said application/grpc: gRPC-Web's same (proto) format.
        head.contains("content-type: application/grpc-web\r\n"),
        "{head}"
    );
    // The reply message, then the trailers as the final frame (flag 0x80).
    let body = std::fs::read(&out).unwrap();
    assert_eq!(body[0], 0, "a message frame first: {body:?}");
    let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    let reply: meshwire_tests::EchoReply = prost::Message::decode(&body[5..5 + len]).unwrap();
    assert_eq!(reply.server, "echo-1");
    let trailer = &body[5 + len..];
    assert_eq!(trailer[0], 0x80, "{trailer:?}");
    let text = String::from_utf8_lossy(&trailer[5..]).into_owned();
    assert!(text.contains("grpc-status:0\r\n"), "{text:?}");
    eventually(
        "the gRPC-Web access-log line",
        Duration::from_secs(5),
        || async {
            rig.access_log()
                .iter()
                .any(|l| l["protocol"] == "grpc-web" && l["grpc_status"] == 0)
        },
    )
    .await;
}

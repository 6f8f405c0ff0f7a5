//! Real etcd for the tests: `/usr/bin/etcd` (Debian `etcd-server`) started
//! on loopback with a temporary data directory, one member or a cluster of
//! several, killed on drop; and a TCP relay that can cut a control plane off
//! from etcd (closed connections, refused reconnects) and let it back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{CompactionOptions, GetOptions, KvClient};
use tokio::net::{TcpListener, TcpStream};

/// The etcd binary (`MESHWIRE_ETCD_BIN` overrides).
pub fn etcd_bin() -> PathBuf {
    std::env::var_os("MESHWIRE_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// A free loopback port. etcd takes its ports as flags, so the port is
/// picked here and released just before etcd binds it.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether the member at `url` answers a linearizable read within 2 s.
async fn serving(url: &str) -> bool {
    let read = async {
        let client = etcd_client::Client::connect([url], None).await.ok()?;
        client.kv_client().get("health", None).await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), read).await,
        Ok(Some(_))
    )
}

/// One etcd member process.
#[derive(Debug)]
pub struct EtcdMember {
    pub name: String,
    pub client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
    data: PathBuf,
    log: PathBuf,
    cluster: String,
}

/// An etcd cluster of one or more members on loopback.
#[derive(Debug)]
pub struct Etcd {
    pub members: Vec<EtcdMember>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// One member.
    pub async fn start() -> Etcd {
        Self::cluster(1).await
    }

    /// `n` members, started together; returns once every member answers.
    /// etcd cannot bind port 0, so its ports are picked free and released
    /// first: if another process takes one meanwhile, the members fail to
    /// bind and the cluster is started again on new ports.
    pub async fn cluster(n: usize) -> Etcd {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let mut etcd = Self::spawn(n);
            match etcd.started().await {
                Ok(()) => return etcd,
                Err(log) if attempt < ATTEMPTS && log.contains("address already in use") => {
                    eprintln!("etcd: a port was taken (attempt {attempt}); new ports");
                }
                Err(log) => panic!("etcd did not start:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn spawn(n: usize) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let mut members: Vec<EtcdMember> = (0..n)
            .map(|i| {
                let name = format!("m{i}");
                EtcdMember {
                    client: SocketAddr::from(([127, 0, 0, 1], free_port())),
                    peer: SocketAddr::from(([127, 0, 0, 1], free_port())),
                    data: dir.path().join(format!("{name}.etcd")),
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    child: None,
                    cluster: String::new(),
                }
            })
            .collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.cluster = cluster.clone();
            m.spawn();
        }
        Etcd { members, _dir: dir }
    }

    /// Waits (bounded) until every member serves; `Err(its log)` as soon as
    /// one has exited.
    async fn started(&mut self) -> Result<(), String> {
        let start = tokio::time::Instant::now();
        for i in 0..self.members.len() {
            loop {
                if let Some(c) = self.members[i].child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    return Err(format!(
                        "member {i} exited ({status}):\n{}",
                        self.members[i].log()
                    ));
                }
                if serving(&self.url(i)).await {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "etcd member {i} not serving after 30s:\n{}",
                    self.members[i].log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// `http://a,http://b,...`: every member's client URL.
    pub fn urls(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, i: usize) -> String {
        format!("http://{}", self.members[i].client)
    }

    /// A KV client on member `i`.
    pub async fn kv(&self, i: usize) -> KvClient {
        etcd_client::Client::connect([self.url(i)], None)
            .await
            .expect("connect to etcd")
            .kv_client()
    }

    /// Waits (bounded) until member `i` serves a linearizable read.
    pub async fn wait_member(&self, i: usize) {
        let start = tokio::time::Instant::now();
        while !serving(&self.url(i)).await {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "etcd member {i} not serving after 30s:\n{}",
                self.members[i].log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9 member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory and ports.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} still runs");
        self.members[i].spawn();
    }

    /// Every key (as text) in the store.
    pub async fn all_keys(&self) -> Vec<String> {
        let r = self
            .kv(0)
            .await
            .get("", Some(GetOptions::new().with_all_keys().with_keys_only()))
            .await
            .unwrap();
        r.kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect()
    }

    /// Every key and its value (both as text, lossily) in the store.
    pub async fn all_values(&self) -> Vec<(String, String)> {
        let r = self
            .kv(0)
            .await
            .get("", Some(GetOptions::new().with_all_keys()))
            .await
            .unwrap();
        r.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect()
    }

    /// The value at `key`, as text.
    pub async fn get(&self, key: &str) -> Option<String> {
        let r = self.kv(0).await.get(key, None).await.ok()?;
        r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    }

    /// Compacts the history up to the current revision; returns it.
    pub async fn compact(&self) -> i64 {
        let mut kv = self.kv(0).await;
        let rev = kv
            .get("x", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        kv.compact(rev, Some(CompactionOptions::new().with_physical()))
            .await
            .unwrap();
        rev
    }
}

impl EtcdMember {
    fn spawn(&mut self) {
        let client = format!("http://{}", self.client);
        let peer = format!("http://{}", self.peer);
        let child = Command::new(etcd_bin())
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "meshwire-test"])
            // Quick elections on loopback (defaults: 100 ms / 1 s).
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--log-level", "warn", "--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "spawn {}: {e} (apt-get install etcd-server)",
                    etcd_bin().display()
                )
            });
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A TCP relay in front of one address: `cut()` closes every relayed
/// connection and refuses new ones (as a dead link would) until `restore()`.
#[derive(Debug, Clone)]
pub struct Relay {
    pub addr: SocketAddr,
    /// Connections accepted (relayed or refused).
    pub attempts: Arc<std::sync::atomic::AtomicU64>,
    open: Arc<AtomicBool>,
    epoch: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let epoch = tokio::sync::watch::channel(0u64).0;
        let attempts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let relay = Relay {
            addr,
            attempts: attempts.clone(),
            open: open.clone(),
            epoch: epoch.clone(),
        };
        tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                attempts.fetch_add(1, Ordering::SeqCst);
                if !open.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let mut cut = epoch.subscribe();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        relay
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

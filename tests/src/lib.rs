//! Test harness for cross-process Molt scenarios: a development PKI in a temporary
//! directory, real `molt-edge` processes on loopback, agents connected through the SDK,
//! and a real control plane with the `molt` command line run against it
//! ([`control_plane`]). Used by the end-to-end tests in `tests/` and by the `molt-bench`
//! load benchmark.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod control_plane;

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use molt_protocol::cert::TrustAnchors;
use molt_protocol::{AgentId, UnixMillis};
use molt_sdk::dev::{AgentCard, AgentFiles, DevCa};
use molt_sdk::{AgentIdentity, Client, ClientConfig, Directory};

/// How long a spawned edge may take to answer its health check.
pub const EDGE_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of a workspace binary built next to the running test executable, rebuilt first
/// (once per test process) if it is missing or older than the workspace sources: a test
/// crate cannot depend on another crate's binary, so `cargo test -p molt-tests` alone
/// would otherwise run a stale one.
pub fn binary(name: &str) -> PathBuf {
    static CHECKED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let exe = std::env::current_exe().expect("test executable path");
    // Tests run from target/<profile>/deps/, binaries such as molt-bench from
    // target/<profile>/; workspace binaries sit in target/<profile>/.
    let exe_dir = exe.parent().expect("executable directory");
    let profile_dir =
        if exe_dir.ends_with("deps") { exe_dir.parent().expect("target profile directory") } else { exe_dir };
    let path = profile_dir.join(name);
    let mut checked = CHECKED.lock().unwrap_or_else(|p| p.into_inner());
    if !checked.iter().any(|n| n == name) {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        let sources = [
            "protocol/src",
            "hsm/src",
            "edge/src",
            "sdk/src",
            "control-plane/src",
            "control-plane/migrations",
            "cli/src",
            "provisioning/src",
        ];
        let newest_source = sources.iter().filter_map(|dir| newest_modification(&workspace.join(dir))).max();
        let built = std::fs::metadata(&path).and_then(|metadata| metadata.modified()).ok();
        if built.is_none() || newest_source > built {
            let mut build = Command::new(env!("CARGO"));
            // From the workspace root: `--bin` names a binary of any member there.
            build.current_dir(workspace).args(["build", "--quiet", "--bin", name]);
            if !cfg!(debug_assertions) {
                build.arg("--release");
            }
            let status = build.status().expect("cargo build runs");
            assert!(status.success(), "building {name} failed");
        }
        checked.push(name.to_string());
    }
    path
}

/// When the newest file under `dir` was last modified.
fn newest_modification(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let modified =
            if path.is_dir() { newest_modification(&path) } else { entry.metadata().and_then(|m| m.modified()).ok() };
        newest = newest.max(modified);
    }
    newest
}

/// A free loopback port for UDP (QUIC) and one for TCP (admin HTTP).
pub fn free_ports() -> (u16, u16) {
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    (udp.local_addr().unwrap().port(), tcp.local_addr().unwrap().port())
}

/// A development network in a temporary directory.
#[derive(Debug)]
pub struct Network {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub anchors: Arc<TrustAnchors>,
}

impl Network {
    pub fn new() -> anyhow::Result<Network> {
        let dir = tempfile::tempdir()?;
        let ca = DevCa::init(&dir.path().join("ca"), UnixMillis::now_from_system())?;
        let anchors = Arc::new(TrustAnchors::from_pem(&std::fs::read_to_string(dir.path().join("ca/root.pem"))?)?);
        Ok(Network { dir, ca, anchors })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes an edge's certificates and a config with fresh loopback ports. `extra` is
    /// TOML appended to the file (for overriding limits).
    pub fn edge(&self, name: &str, extra: &str) -> anyhow::Result<EdgeSetup> {
        let dir = self.path().join(name);
        self.ca.issue_edge(&dir, &["localhost".to_string()], UnixMillis::now_from_system())?;
        let (quic_port, admin_port) = free_ports();
        let config = format!(
            "[edge]\nlisten_addr = \"127.0.0.1:{quic_port}\"\nadmin_addr = \"127.0.0.1:{admin_port}\"\ndata_dir = \"data\"\n\n\
             [identity]\ncertificate_chain = \"edge.pem\"\nprivate_key = \"edge.key\"\n\n\
             [trust]\nanchors = \"root.pem\"\n\n[[trust.revocation_lists]]\ncrl = \"{crl}\"\nissuer = \"{org}\"\n\n{extra}\n",
            crl = self.path().join("ca/revoked.crl").display(),
            org = self.path().join("ca/org.pem").display(),
        );
        let config_path = dir.join("edge.toml");
        std::fs::write(&config_path, config)?;
        Ok(EdgeSetup {
            config: config_path,
            quic_addr: SocketAddr::from(([127, 0, 0, 1], quic_port)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        })
    }

    /// Creates an agent with keys, a certificate and a card.
    pub fn agent(&self, name: &str) -> anyhow::Result<TestAgent> {
        let dir = self.path().join("agents").join(name);
        AgentFiles::generate(&dir, &mut rand::rngs::OsRng)?;
        self.ca.issue_agent(&dir, UnixMillis::now_from_system())?;
        let identity = Arc::new(AgentFiles::load(&dir)?);
        let card = AgentCard::load(&dir.join("card.json"))?;
        Ok(TestAgent { dir, identity, card })
    }

    /// An agent whose certificate has already expired (valid for one second after the
    /// org CA's start, then waited out).
    pub fn expired_agent(&self, name: &str) -> anyhow::Result<TestAgent> {
        use molt_protocol::cert::{Role, Serial, Validity, issue_leaf};
        use molt_protocol::keys::{EncryptionSecret, SigningKey};
        let org_key = SigningKey::from_pkcs8_pem(&std::fs::read_to_string(self.path().join("ca/org.key"))?)?;
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let agent_id = AgentId::from_inception_key(&key.public_key());
        let start = self.ca.org().validity().not_before;
        let validity = Validity { not_before: start, not_after: UnixMillis(start.0 + 1_000) };
        let leaf = issue_leaf(
            self.ca.org(),
            &org_key,
            &key.public_key(),
            Role::Agent(agent_id),
            &[],
            validity,
            Serial::random(&mut rand::rngs::OsRng),
        )?;
        while UnixMillis::now_from_system().0 < validity.not_after.0 + 2_000 {
            std::thread::sleep(Duration::from_millis(100));
        }
        let identity = Arc::new(AgentIdentity::new(
            vec![leaf, self.ca.org().clone()],
            key,
            EncryptionSecret::generate(&mut rand::rngs::OsRng),
        )?);
        let card = AgentCard::from_identity(&identity, UnixMillis::now_from_system());
        Ok(TestAgent { dir: self.path().join("agents").join(name), identity, card })
    }

    /// Connects `agent` to the edge at `edge`, knowing the keys of `peers`.
    pub async fn connect(&self, agent: &TestAgent, edge: SocketAddr, peers: &[&TestAgent]) -> anyhow::Result<Client> {
        let directory = Directory::new();
        directory.insert(agent.id(), agent.identity.peer_keys());
        for peer in peers {
            directory.insert(peer.id(), peer.identity.peer_keys());
        }
        let mut config = ClientConfig::new(agent.identity.clone(), self.anchors.clone(), edge);
        config.backoff_min = Duration::from_millis(100);
        config.backoff_max = Duration::from_secs(2);
        Ok(Client::connect(config, directory).await?)
    }
}

#[derive(Clone, Debug)]
pub struct EdgeSetup {
    pub config: PathBuf,
    pub quic_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

impl EdgeSetup {
    /// Starts the real `molt-edge` binary and waits until it is healthy.
    pub fn spawn(&self) -> anyhow::Result<EdgeProcess> {
        let log = std::fs::File::create(self.config.with_extension("log"))?;
        let child = Command::new(binary("molt-edge"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("while starting molt-edge")?;
        let mut process = EdgeProcess { child, setup: self.clone() };
        process.wait_healthy()?;
        Ok(process)
    }
}

/// A running edge process; killed when dropped.
#[derive(Debug)]
pub struct EdgeProcess {
    child: Child,
    pub setup: EdgeSetup,
}

impl EdgeProcess {
    pub fn quic_addr(&self) -> SocketAddr {
        self.setup.quic_addr
    }

    /// The process id (for reading its CPU time from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + EDGE_START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(self.setup.config.with_extension("log")).unwrap_or_default();
                bail!("molt-edge exited with {status} during start:\n{log}");
            }
            if http_get(self.setup.admin_addr, "/healthz").is_ok_and(|(status, _)| status == 200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("molt-edge did not become healthy within {EDGE_START_TIMEOUT:?}")
    }

    /// `kill -9`: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        Ok(self.child.wait()?)
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = http_get(self.setup.admin_addr, "/metrics")?;
        anyhow::ensure!(status == 200, "metrics answered {status}");
        Ok(body)
    }

    /// Reads one metric's value (the first sample whose name and labels start with
    /// `prefix`).
    pub fn metric(&self, prefix: &str) -> anyhow::Result<f64> {
        let body = self.metrics()?;
        let line = body
            .lines()
            .find(|line| !line.starts_with('#') && line.starts_with(prefix))
            .with_context(|| format!("no metric {prefix}"))?;
        let value = line.rsplit(' ').next().unwrap_or_default();
        Ok(value.parse()?)
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A bare agent session below the SDK: QUIC + mutual TLS, the session stream opened and
/// the ping handshake done. For tests that send raw frames and for load generators.
#[derive(Debug)]
pub struct RawSession {
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl RawSession {
    pub async fn connect(
        identity: &AgentIdentity,
        anchors: Arc<TrustAnchors>,
        edge: SocketAddr,
    ) -> anyhow::Result<RawSession> {
        use molt_protocol::cert::ExpectedRole;
        use molt_protocol::frame::{Frame, FrameReader};
        use molt_protocol::tls;
        let tls =
            tls::client_config(&identity.tls(), anchors, Default::default(), ExpectedRole::AnyEdge, tls::ALPN_AGENT)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let connection = endpoint.connect(edge, "localhost")?.await?;
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&Frame::Ping(7).encode()).await?;
        let mut reader = FrameReader::new();
        loop {
            let chunk = recv.read_chunk(65536, true).await?.context("stream ended before the pong")?;
            reader.extend(&chunk.bytes);
            if let Some(frame) = reader.next_frame()? {
                anyhow::ensure!(frame == Frame::Pong(7), "expected the pong, got {frame:?}");
                return Ok(RawSession { endpoint, connection, send, recv });
            }
        }
    }
}

/// A minimal HTTP/1.1 GET against the admin port.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split(' ').nth(1).context("no status line")?.parse()?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// A minimal HTTP/1.1 request with an optional bearer token and JSON body; the status and
/// the body parsed as JSON (`Null` when it is not JSON).
pub fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(ToString::to_string).unwrap_or_default();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split(' ').nth(1).context("no status line")?.parse()?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
    Ok((status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)))
}

/// An agent's files and identity.
#[derive(Debug)]
pub struct TestAgent {
    pub dir: PathBuf,
    pub identity: Arc<AgentIdentity>,
    pub card: AgentCard,
}

impl TestAgent {
    pub fn id(&self) -> AgentId {
        self.identity.agent_id
    }
}

//! Ledger durability: the real `molt-control-plane` (on SQLite, and on a fresh PostgreSQL
//! database, whose batches take the native path) is killed with `kill -9` while clients
//! stream signed transfers through its group-commit writer. After a
//! restart on the same database the audit passes, every acknowledged transfer is in the
//! journal exactly once (a retry returns the same journal entry), retrying the
//! unacknowledged ones never applies anything twice, and no credit is lost or made.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use molt_protocol::keys::SigningKey;
use molt_protocol::request::sign_request;
use molt_protocol::{AgentId, UnixMillis};
use rand::RngCore as _;

const AGENTS: usize = 4;
const CLIENT_THREADS: usize = 4;
const MINTED_PER_WALLET: u64 = 1_000_000;
/// Acknowledged transfers to wait for before the kill.
const ACKNOWLEDGED_BEFORE_KILL: usize = 300;

struct Agent {
    key: SigningKey,
    id: AgentId,
}

#[derive(Clone, Debug)]
struct Sent {
    from: usize,
    to: usize,
    id: String,
    amount: u64,
}

/// Where the tests' PostgreSQL is (its maintenance database), unless set.
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Overrides [`DEFAULT_POSTGRES_URL`], as for the control plane's own suite.
const POSTGRES_URL_VARIABLE: &str = "MOLT_TEST_POSTGRES_URL";

#[test]
fn acknowledged_transfers_survive_kill_9_exactly_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite:{}", dir.path().join("control-plane.db").display());
    survives_kill_9(&dir, &database, &[]);
}

#[test]
fn acknowledged_transfers_survive_kill_9_exactly_once_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let database = ScratchDatabase::create();
    // PostgreSQL has no file beside which the key-encryption key could live.
    let kek: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    survives_kill_9(&dir, &database.url, &[("MOLT_CP_KEK", &kek)]);
}

fn survives_kill_9(dir: &tempfile::TempDir, database: &str, environment: &[(&str, &str)]) {
    let binary = control_plane_binary();
    let addr = free_addr();
    let launch = Launch { binary: &binary, database, environment, addr, dir: dir.path() };

    let (mut server, token) = launch.start(true);
    let token = token.expect("the first start prints the bootstrap credential");
    let agents: Arc<Vec<Agent>> = Arc::new(
        (0..AGENTS)
            .map(|_| {
                let key = SigningKey::generate(&mut rand::rngs::OsRng);
                let id = AgentId::from_inception_key(&key.public_key());
                Agent { key, id }
            })
            .collect(),
    );
    for (index, agent) in agents.iter().enumerate() {
        let body = format!(
            r#"{{"id":"{}","public_key":"{}","name":"crash {index}"}}"#,
            agent.id,
            hex(agent.key.public_key().as_bytes())
        );
        assert_eq!(signed(addr, agent, "POST", "/v1/agents", &body).0, 201);
        assert_eq!(signed(addr, agent, "POST", "/v1/ledger/wallet", "").0, 200);
        let mint = format!(r#"{{"id":"m{index}","amount":{MINTED_PER_WALLET},"to":"wallet:{}"}}"#, agent.id);
        let (status, body) = admin(addr, &token, "POST", "/v1/admin/ledger/mint", &mint);
        assert_eq!(status, 201, "{body}");
    }

    // Clients stream transfers until the server dies under them.
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENT_THREADS)
        .map(|thread| {
            let (agents, acknowledged, stop) = (Arc::clone(&agents), Arc::clone(&acknowledged), Arc::clone(&stop));
            std::thread::spawn(move || {
                let (mut acked, mut attempted) = (Vec::new(), Vec::new());
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let from = (thread + n) % AGENTS;
                    let to = (from + 1 + n % (AGENTS - 1)) % AGENTS;
                    let sent = Sent { from, to, id: format!("t{thread}-{n}"), amount: 1 + (n as u64 * 7919) % 997 };
                    attempted.push(sent.clone());
                    match pay(addr, &agents, &sent) {
                        Ok((201, body)) => {
                            acked.push((sent, field(&body, "seq").expect("a journal entry has a seq")));
                            acknowledged.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((status, body)) => panic!("transfer {} answered {status}: {body}", sent.id),
                        Err(_) => break,
                    }
                }
                (acked, attempted)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acknowledged.load(Ordering::Relaxed) < ACKNOWLEDGED_BEFORE_KILL {
        assert!(Instant::now() < deadline, "the clients made too little progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let (mut acked, mut attempted) = (Vec::new(), Vec::new());
    for client in clients {
        let (a, t) = client.join().unwrap();
        acked.extend(a);
        attempted.extend(t);
    }
    assert!(acked.len() >= ACKNOWLEDGED_BEFORE_KILL);

    let (mut server, second_token) = launch.start(false);
    assert!(second_token.is_none(), "the restart keeps the credentials");
    let (status, report) = admin(addr, &token, "GET", "/v1/admin/ledger/audit", "");
    assert_eq!(status, 200);
    assert!(report.contains(r#""ok":true"#), "audit after the crash: {report}");

    // Every acknowledged transfer is there, with the entry it was acknowledged with.
    let acked_seq: HashMap<String, String> = acked.iter().map(|(sent, seq)| (sent.id.clone(), seq.clone())).collect();
    let mut applied: Vec<Sent> = Vec::new();
    for sent in &attempted {
        let (status, body) = pay(addr, &agents, sent).expect("the restarted server answers");
        match acked_seq.get(&sent.id) {
            Some(seq) => {
                assert_eq!(status, 201, "acknowledged {} lost: {body}", sent.id);
                assert_eq!(field(&body, "seq").as_ref(), Some(seq), "{} has a different journal entry", sent.id);
            }
            // In flight at the kill: applied before it, or now; never twice.
            None => assert!(status == 201 || status == 409, "{}: {status} {body}", sent.id),
        }
        if status == 201 {
            applied.push(sent.clone());
        }
    }

    // Balances equal the mints plus exactly the applied transfers, once each.
    let mut expected: BTreeMap<usize, i64> = (0..AGENTS).map(|i| (i, MINTED_PER_WALLET as i64)).collect();
    for sent in &applied {
        *expected.get_mut(&sent.from).unwrap() -= sent.amount as i64;
        *expected.get_mut(&sent.to).unwrap() += sent.amount as i64;
    }
    for (index, agent) in agents.iter().enumerate() {
        let (status, body) = admin(addr, &token, "GET", &format!("/v1/admin/ledger/accounts/wallet:{}", agent.id), "");
        assert_eq!(status, 200);
        assert_eq!(field(&body, "balance"), Some(expected[&index].to_string()), "wallet {index}: {body}");
    }
    let (_, report) = admin(addr, &token, "GET", "/v1/admin/ledger/audit", "");
    assert!(report.contains(r#""ok":true"#), "audit after the retries: {report}");
    assert_eq!(field(&report, "transfers"), Some((AGENTS + applied.len()).to_string()), "{report}");
    server.kill().unwrap();
    server.wait().unwrap();
}

/// The binary, rebuilt by the harness if its sources are newer.
fn control_plane_binary() -> std::path::PathBuf {
    molt_tests::binary("molt-control-plane")
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// How the control plane is started, both times.
struct Launch<'a> {
    binary: &'a Path,
    database: &'a str,
    environment: &'a [(&'a str, &'a str)],
    addr: SocketAddr,
    dir: &'a Path,
}

impl Launch<'_> {
    /// Starts the control plane and waits for `/healthz`; returns the bootstrap token if
    /// this start printed one.
    fn start(&self, first: bool) -> (Child, Option<String>) {
        let log_path = self.dir.join(if first { "first.log" } else { "second.log" });
        let child = Command::new(self.binary)
            .arg("--database-url")
            .arg(self.database)
            .arg("--listen")
            .arg(self.addr.to_string())
            .current_dir(self.dir)
            .env("RUST_LOG", "warn")
            .envs(self.environment.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("molt-control-plane starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http(self.addr, "GET", "/healthz", &[], "") {
                break;
            }
            assert!(Instant::now() < deadline, "molt-control-plane did not come up: {}", read(&log_path));
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = read(&log_path);
        let token = log.split_whitespace().find(|word| word.starts_with("molt_admin_")).map(str::to_owned);
        (child, token)
    }
}

/// A fresh PostgreSQL database, made with `psql` and dropped (with its connections) at
/// the end.
struct ScratchDatabase {
    name: String,
    maintenance: String,
    url: String,
}

impl ScratchDatabase {
    fn create() -> ScratchDatabase {
        let maintenance = std::env::var(POSTGRES_URL_VARIABLE).unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
        let name = format!("molt_crash_{:016x}", rand::random::<u64>());
        psql(&maintenance, &format!("CREATE DATABASE {name}"));
        let (server, _) = maintenance.rsplit_once('/').expect("the PostgreSQL url names a database");
        ScratchDatabase { url: format!("{server}/{name}"), name, maintenance }
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        psql(&self.maintenance, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

fn psql(url: &str, statement: &str) {
    let output = Command::new("psql").arg(url).args(["-v", "ON_ERROR_STOP=1", "-c", statement]).output();
    let output = output.expect("psql runs (PostgreSQL's client)");
    assert!(output.status.success(), "psql {statement:?}: {}", String::from_utf8_lossy(&output.stderr));
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn pay(addr: SocketAddr, agents: &[Agent], sent: &Sent) -> std::io::Result<(u16, String)> {
    let body = format!(r#"{{"id":"{}","to":"{}","amount":{}}}"#, sent.id, agents[sent.to].id, sent.amount);
    try_signed(addr, &agents[sent.from], "POST", "/v1/ledger/transfers", &body)
}

fn signed(addr: SocketAddr, agent: &Agent, method: &str, path: &str, body: &str) -> (u16, String) {
    try_signed(addr, agent, method, path, body).expect("the server answers")
}

fn try_signed(addr: SocketAddr, agent: &Agent, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut nonce = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let headers =
        sign_request(&agent.key, agent.id, method, path, UnixMillis::now_from_system(), nonce, body.as_bytes());
    let headers: Vec<(&str, String)> = headers.into_iter().collect();
    http(addr, method, path, &headers, body)
}

fn admin(addr: SocketAddr, token: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    http(addr, method, path, &[("authorization", format!("Bearer {token}"))], body).expect("the server answers")
}

/// One HTTP/1.1 request on its own connection.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        request.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no status line"))?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// The text of a top-level JSON number field (the bodies here are flat enough).
fn field(body: &str, name: &str) -> Option<String> {
    let start = body.find(&format!("\"{name}\":"))? + name.len() + 3;
    let value: String = body[start..].chars().take_while(|c| c.is_ascii_digit() || *c == '-').collect();
    (!value.is_empty()).then_some(value)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

//! Two real `molt-control-plane` processes against one PostgreSQL database, started at
//! the same moment on an empty database: they migrate, create one bootstrap credential
//! and one development root between them, and then serve as one service — a write
//! through either is read through the other, a nonce spent at one is refused at the
//! other, an agent revoked through one is refused by the other within a second, and a
//! replica killed with SIGKILL leaves the other serving.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use molt_control_plane::agent_auth::sign_request;
use molt_control_plane::keys::SIGNING_KEYS_CACHE_TTL;
use molt_protocol::keys::SigningKey;
use molt_protocol::{AgentId, UnixMillis};
use rand::RngCore as _;
use rand::rngs::OsRng;
use serde_json::{Value, json};

use crate::fixture::ScratchPostgres;

/// Longest wait for a replica to answer `/readyz`.
const START_WAIT: Duration = Duration::from_secs(60);
/// Lines of a replica's log kept until read; a fuller pipe blocks the reader thread.
const STDERR_LINES_MAX: usize = 10_000;
/// Longest wait for one HTTP exchange.
const EXCHANGE_WAIT: Duration = Duration::from_secs(10);

struct Replica {
    child: Child,
    addr: SocketAddr,
    stderr: mpsc::Receiver<String>,
}

impl Replica {
    fn spawn(database_url: &str, kek: &str) -> Replica {
        let addr = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_molt-control-plane"))
            .args(["--database-url", database_url, "--listen", &addr.to_string()])
            .env("MOLT_CP_KEK", kek)
            .env("MOLT_CP_LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start molt-control-plane");
        let (lines, stderr) = mpsc::sync_channel(STDERR_LINES_MAX);
        let pipe = child.stderr.take().expect("stderr is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        Replica { child, addr, stderr }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + START_WAIT;
        while Instant::now() < deadline {
            if let Ok((200, _)) = http(self.addr, "GET", "/readyz", &[], "") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("replica at {} not ready within {START_WAIT:?}: {}", self.addr, self.output().join("\n"));
    }

    fn output(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }

    fn call(&self, method: &str, path: &str, headers: &[(String, String)], body: &str) -> (u16, Value) {
        http(self.addr, method, path, headers, body).unwrap_or_else(|error| panic!("{method} {path}: {error}"))
    }

    fn signed(&self, agent: &SigningKey, method: &str, path: &str, body: &str, nonce: [u8; 16]) -> (u16, Value) {
        self.signed_at(agent, method, path, body, nonce, now())
    }

    /// A request signed with the timestamp `at`: sent twice, the same bytes, as a replay is.
    fn signed_at(
        &self,
        agent: &SigningKey,
        method: &str,
        path: &str,
        body: &str,
        nonce: [u8; 16],
        at: UnixMillis,
    ) -> (u16, Value) {
        let id = AgentId::from_inception_key(&agent.public_key());
        let headers = sign_request(agent, id, method, path, at, nonce, body.as_bytes());
        let headers: Vec<(String, String)> =
            headers.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
        self.call(method, path, &headers, body)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).expect("a free port")
}

fn now() -> UnixMillis {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    UnixMillis(u64::try_from(now.as_millis()).expect("in range"))
}

fn nonce() -> [u8; 16] {
    let mut nonce = [0u8; 16];
    OsRng.fill_bytes(&mut nonce);
    nonce
}

/// One HTTP/1.1 exchange with `Connection: close`; the status and the JSON body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &str,
) -> std::io::Result<(u16, Value)> {
    let mut stream = TcpStream::connect_timeout(&addr, EXCHANGE_WAIT)?;
    stream.set_read_timeout(Some(EXCHANGE_WAIT))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    Ok((status, serde_json::from_str(&body).unwrap_or(Value::String(body))))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

fn bootstrap_token(lines: &[String]) -> Option<String> {
    let at = lines.iter().position(|line| line.contains("Bootstrap admin credential"))?;
    lines[at + 1..].iter().map(|line| line.trim()).find(|line| !line.is_empty()).map(str::to_owned)
}

#[test]
fn two_replicas_serve_one_postgres_database() {
    let database = ScratchPostgres::create();
    let kek = hex::encode({
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        key
    });
    // Both start at once against the empty database.
    let replicas = [Replica::spawn(database.url(), &kek), Replica::spawn(database.url(), &kek)];
    for replica in &replicas {
        replica.wait_ready();
    }
    std::thread::sleep(Duration::from_millis(200));
    let outputs: Vec<Vec<String>> = replicas.iter().map(Replica::output).collect();
    let tokens: Vec<String> = outputs.iter().filter_map(|lines| bootstrap_token(lines)).collect();
    assert_eq!(tokens.len(), 1, "exactly one replica shows the bootstrap credential: {outputs:#?}");
    let admin = vec![("Authorization".to_owned(), format!("Bearer {}", tokens[0]))];
    let [a, b] = &replicas;

    // Admin writes through one are seen and enforced through the other.
    let (status, org) = a.call("POST", "/v1/orgs", &admin, &json!({"name": "acme"}).to_string());
    assert_eq!(status, 201, "{org}");
    let (status, again) = b.call("POST", "/v1/orgs", &admin, &json!({"name": "acme"}).to_string());
    assert_eq!(status, 409, "{again}");
    let (status, listed) = b.call("GET", "/v1/orgs", &admin, "");
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(1), "{listed}");
    let (_, bundle_a) = a.call("GET", "/v1/trust-bundle", &[], "");
    let (_, bundle_b) = b.call("GET", "/v1/trust-bundle", &[], "");
    assert_eq!(bundle_a["roots"], bundle_b["roots"], "one development root between them");

    // An agent registers at one, beats at the other; a replayed nonce is refused anywhere.
    let agent = SigningKey::generate(&mut OsRng);
    let id = AgentId::from_inception_key(&agent.public_key());
    let registration = json!({
        "id": id.to_string(),
        "public_key": hex::encode(agent.public_key().as_bytes()),
        "name": "Replica Roamer",
        "capabilities": [{"name": "roam.v1"}],
    })
    .to_string();
    let (status, body) = a.signed(&agent, "POST", "/v1/agents", &registration, nonce());
    assert_eq!(status, 201, "{body}");
    let (status, body) = b.signed(&agent, "POST", "/v1/agents", &registration, nonce());
    assert_eq!(status, 409, "a duplicate registration through the other replica: {body}");
    let (spent, at) = (nonce(), now());
    let heartbeat = format!("/v1/agents/{id}/heartbeat");
    assert_eq!(b.signed_at(&agent, "POST", &heartbeat, "", spent, at).0, 200);
    let (status, body) = a.signed_at(&agent, "POST", &heartbeat, "", spent, at);
    assert_eq!((status, body["code"].as_str()), (401, Some("replayed_request")), "spent at the other replica: {body}");
    let (status, page) = a.call("GET", "/v1/agents?q=roamer", &[], "");
    assert_eq!((status, page["items"][0]["agent"]["id"].as_str()), (200, Some(id.to_string().as_str())), "{page}");

    // An agent revoked through one replica is refused there at once, and at the other,
    // which kept its keys from a request just before, within the keys' TTL.
    let revoked = SigningKey::generate(&mut OsRng);
    let revoked_id = AgentId::from_inception_key(&revoked.public_key());
    let registration = json!({
        "id": revoked_id.to_string(),
        "public_key": hex::encode(revoked.public_key().as_bytes()),
        "name": "Revoked Roamer",
    })
    .to_string();
    assert_eq!(a.signed(&revoked, "POST", "/v1/agents", &registration, nonce()).0, 201);
    let revoked_heartbeat = format!("/v1/agents/{revoked_id}/heartbeat");
    assert_eq!(b.signed(&revoked, "POST", &revoked_heartbeat, "", nonce()).0, 200);
    let (status, body) = a.call("POST", &format!("/v1/agents/{revoked_id}/revoke"), &admin, "");
    assert_eq!(status, 200, "{body}");
    let revoked_at = Instant::now();
    let (status, body) = a.signed(&revoked, "POST", &revoked_heartbeat, "", nonce());
    assert_eq!((status, body["code"].as_str()), (401, Some("revoked_agent")), "at once where revoked: {body}");
    let refused_within = SIGNING_KEYS_CACHE_TTL + Duration::from_secs(2);
    loop {
        let (status, body) = b.signed(&revoked, "POST", &revoked_heartbeat, "", nonce());
        if (status, body["code"].as_str()) == (401, Some("revoked_agent")) {
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(revoked_at.elapsed() < refused_within, "still accepted at the other replica after {refused_within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // One replica dies without warning; the other carries on.
    let [mut a, b] = replicas;
    a.child.kill().expect("kill -9 the first replica");
    a.child.wait().expect("reap it");
    let (status, page) = b.call("GET", "/v1/agents?capability=roam.v1", &[], "");
    assert_eq!((status, page["items"].as_array().map(Vec::len)), (200, Some(1)), "{page}");
    assert_eq!(b.signed(&agent, "POST", &heartbeat, "", nonce()).0, 200);
}

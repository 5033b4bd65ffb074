//! Nearest-edge selection and failover, all real processes on loopback: a control plane
//! with gRPC and two `molt-edge` processes enrolled in different regions. Agents take
//! their candidates from the control plane's edge map (`GET /v1/edge-map`), connect to
//! the best edge, exchange messages through it, and when that edge is killed with
//! `kill -9` both move to the other one within five seconds; every message sent around
//! the kill reaches the application exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use molt_protocol::cert::{Certificate, Role, TrustAnchors};
use molt_protocol::keys::{EncryptionSecret, SigningKey};
use molt_protocol::request::{AGENT_PROOF_DOMAIN, possession_message};
use molt_protocol::{AgentId, EdgeId, UnixMillis};
use molt_sdk::api::ApiClient;
use molt_sdk::dev::AgentCard;
use molt_sdk::{AgentIdentity, Client, ClientConfig, Directory, EdgeSource};
use molt_tests::control_plane::{Cli, ControlPlane, run};
use molt_tests::{EdgeProcess, EdgeSetup, TestAgent, binary, free_ports, http_json};
use serde_json::json;
use tokio::sync::watch;

/// The target: from the kill to both agents connected to the other edge.
const FAILOVER_BUDGET: Duration = Duration::from_secs(5);
/// Longest wait for anything eventual (registration, delivery).
const WAIT: Duration = Duration::from_secs(30);
/// Messages each agent sends in the stream around the kill…
const STREAM_MESSAGES: usize = 60;
/// …one every this long…
const STREAM_INTERVAL: Duration = Duration::from_millis(50);
/// …and the edge is killed once this many are sent.
const SENT_BEFORE_KILL: usize = 20;
/// How long receivers keep listening for duplicates after everything arrived.
const DUPLICATE_WATCH: Duration = Duration::from_secs(2);
/// Re-measuring period of the agents in this test (the default is 30 s).
const TEST_REPROBE_INTERVAL: Duration = Duration::from_secs(1);

const _: () = assert!(SENT_BEFORE_KILL < STREAM_MESSAGES);

struct Federation {
    dir: tempfile::TempDir,
    cp: ControlPlane,
    org: String,
    anchors: Arc<TrustAnchors>,
}

/// An enrolled edge, not yet running.
struct EnrolledEdge {
    id: EdgeId,
    setup: EdgeSetup,
}

impl Federation {
    fn new() -> Federation {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cp")).unwrap();
        let cp = ControlPlane::start_with_grpc(&dir.path().join("cp")).unwrap();
        let (status, org) =
            http_json(cp.addr(), "POST", "/v1/orgs", Some(&cp.token), Some(&json!({"name": "acme"}))).unwrap();
        assert_eq!(status, 201, "{org}");
        let org = org["id"].as_str().unwrap().to_owned();
        let anchors = trust_anchors(&cp);
        Federation { dir, cp, org, anchors }
    }

    fn cli(&self) -> Cli {
        Cli { api: self.cp.url(), token: Some(self.cp.token.clone()), dir: self.dir.path().to_owned() }
    }

    /// Enrolls an edge in `region` with `molt-edge enroll`, on fresh loopback ports.
    fn enroll(&self, name: &str, region: &str) -> EnrolledEdge {
        let created = self.cli().json(&["enrollment-token", "create", "--org", &self.org, "--region", region]).unwrap();
        let edge_dir = self.dir.path().join(name);
        let mut enroll = std::process::Command::new(binary("molt-edge"));
        enroll.args(["enroll", "--control-plane", &self.cp.url()]);
        enroll.args(["--token", created["token"].as_str().unwrap()]);
        enroll.args(["--grpc-addr", &self.cp.grpc_addr.unwrap().to_string()]);
        enroll.arg("--dir").arg(&edge_dir);
        let (status, stdout, stderr) = run(enroll).unwrap();
        assert!(status.success(), "molt-edge enroll: {stdout}{stderr}");
        let config = edge_dir.join("edge.toml");
        let (quic_port, admin_port) = free_ports();
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "[edge]\n",
            &format!("[edge]\nlisten_addr = \"127.0.0.1:{quic_port}\"\nadmin_addr = \"127.0.0.1:{admin_port}\"\n"),
        );
        std::fs::write(&config, text).unwrap();
        let chain = Certificate::chain_from_pem(&std::fs::read_to_string(edge_dir.join("edge.pem")).unwrap()).unwrap();
        let Role::Edge(id) = chain[0].role() else { panic!("enrolled as {:?}", chain[0].role()) };
        let setup = EdgeSetup {
            config,
            quic_addr: SocketAddr::from(([127, 0, 0, 1], quic_port)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        };
        EnrolledEdge { id, setup }
    }

    /// An agent with a certificate from the control plane's CA.
    fn agent(&self, name: &str) -> TestAgent {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let now = UnixMillis::now_from_system();
        let signature = key.sign(&possession_message(AGENT_PROOF_DOMAIN, &self.org, &key.public_key(), now));
        let body = json!({
            "public_key": hex(key.public_key().as_bytes()),
            "timestamp_ms": now.0,
            "signature": hex(&signature.0),
        });
        let path = format!("/v1/orgs/{}/agents/certificates", self.org);
        let (status, issued) = http_json(self.cp.addr(), "POST", &path, Some(&self.cp.token), Some(&body)).unwrap();
        assert_eq!(status, 201, "{issued}");
        let chain = Certificate::chain_from_pem(issued["chain_pem"].as_str().unwrap()).unwrap();
        let identity =
            Arc::new(AgentIdentity::new(chain, key, EncryptionSecret::generate(&mut rand::rngs::OsRng)).unwrap());
        let card = AgentCard::from_identity(&identity, now);
        TestAgent { dir: self.dir.path().join(name), identity, card }
    }

    fn api(&self) -> ApiClient {
        ApiClient::new(&self.cp.url()).unwrap()
    }

    /// Connects `agent` with the edge map as its source of edges.
    async fn connect(&self, agent: &TestAgent, peers: &[&TestAgent]) -> Client {
        let directory = Directory::new();
        for peer in peers.iter().chain([&agent]) {
            directory.insert(peer.id(), peer.identity.peer_keys());
        }
        let source = EdgeSource::EdgeMap(self.api());
        let mut config = ClientConfig::with_edges(agent.identity.clone(), self.anchors.clone(), source);
        config.reprobe_interval = TEST_REPROBE_INTERVAL;
        Client::connect(config, directory).await.unwrap()
    }

    /// Waits until the edge map lists exactly `edges`.
    async fn until_mapped(&self, edges: &[&EnrolledEdge]) {
        let mut expected: Vec<String> = edges.iter().map(|edge| edge.id.to_string()).collect();
        expected.sort();
        let deadline = Instant::now() + WAIT;
        loop {
            let map = self.api().edge_map().await.unwrap();
            let mut listed: Vec<String> = map.edges.iter().map(|entry| entry.edge_id.clone()).collect();
            listed.sort();
            if listed == expected {
                return;
            }
            assert!(Instant::now() < deadline, "the edge map lists {listed:?}, expected {expected:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The roots of the control plane's trust bundle.
fn trust_anchors(cp: &ControlPlane) -> Arc<TrustAnchors> {
    let (status, bundle) = http_json(cp.addr(), "GET", "/v1/trust-bundle", None, None).unwrap();
    assert_eq!(status, 200, "{bundle}");
    let roots: String = bundle["roots"].as_array().unwrap().iter().map(|root| root.as_str().unwrap()).collect();
    Arc::new(TrustAnchors::from_pem(&roots).unwrap())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// What one agent saw: every plaintext received, with how often.
type Received = BTreeMap<String, usize>;

/// Sends `count` messages to `peer` (one every [`STREAM_INTERVAL`], counting them in
/// `sent`) while receiving; returns once `expected` distinct messages arrived and
/// [`DUPLICATE_WATCH`] passed without more, or at [`WAIT`].
async fn chat(
    mut client: Client,
    name: &'static str,
    peer: AgentId,
    count: usize,
    expected: usize,
    sent: watch::Sender<usize>,
) -> (Client, Received) {
    let mut received = Received::new();
    let mut ticks = tokio::time::interval(STREAM_INTERVAL);
    let mut next = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut complete_at: Option<tokio::time::Instant> = None;
    loop {
        let quiet_until = complete_at.map_or(deadline, |at| (at + DUPLICATE_WATCH).min(deadline));
        tokio::select! {
            _ = ticks.tick(), if next < count => {
                let text = format!("{name} {next}");
                client.send(peer, text.as_bytes()).await.unwrap_or_else(|error| panic!("{text}: {error}"));
                next += 1;
                sent.send_replace(next);
            }
            message = client.recv() => {
                let message = message.expect("the client is open");
                *received.entry(String::from_utf8(message.plaintext).unwrap()).or_default() += 1;
            }
            () = tokio::time::sleep_until(quiet_until) => break,
        }
        if complete_at.is_none() && next == count && received.len() == expected {
            complete_at = Some(tokio::time::Instant::now());
        }
    }
    (client, received)
}

/// Waits until both clients are connected to `edge`; how long that took from `since`.
async fn until_both_on(
    edge: SocketAddr,
    mut a: watch::Receiver<Option<SocketAddr>>,
    mut b: watch::Receiver<Option<SocketAddr>>,
    since: Instant,
) -> Duration {
    let both = async {
        a.wait_for(|at| *at == Some(edge)).await.expect("alice's client is running");
        b.wait_for(|at| *at == Some(edge)).await.expect("bob's client is running");
    };
    tokio::time::timeout(WAIT, both).await.expect("both agents reach the surviving edge");
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_choose_from_the_edge_map_and_fail_over_within_five_seconds_without_loss_or_duplicates() {
    let net = Federation::new();
    let west = net.enroll("edge-west", "eu-west");
    let east = net.enroll("edge-east", "us-east");
    let mut west_process: EdgeProcess = west.setup.spawn().unwrap();
    let _east_process = east.setup.spawn().unwrap();
    net.until_mapped(&[&west, &east]).await;
    let map = net.api().edge_map().await.unwrap();
    let regions: BTreeSet<&str> = map.edges.iter().map(|entry| entry.region.as_str()).collect();
    assert_eq!(regions, BTreeSet::from(["eu-west", "us-east"]));

    // Both edges are on loopback, equally near: the weights make west the clear choice.
    let admin = net.api().with_admin_token(&net.cp.token);
    assert_eq!(admin.set_edge_weight(&west.id.to_string(), 1000).await.unwrap().weight, 1000);
    assert_eq!(admin.set_edge_weight(&east.id.to_string(), 1).await.unwrap().weight, 1);

    let alice = net.agent("alice");
    let bob = net.agent("bob");
    let mut a = net.connect(&alice, &[&bob]).await;
    let mut b = net.connect(&bob, &[&alice]).await;
    assert_eq!((a.edge(), b.edge()), (Some(west.setup.quic_addr), Some(west.setup.quic_addr)), "the best edge");
    a.send(bob.id(), b"hello via the nearest edge").await.unwrap();
    assert_eq!(tokio::time::timeout(WAIT, b.recv()).await.unwrap().unwrap().plaintext, b"hello via the nearest edge");
    b.send(alice.id(), b"hello back").await.unwrap();
    assert_eq!(tokio::time::timeout(WAIT, a.recv()).await.unwrap().unwrap().plaintext, b"hello back");
    // A re-measurement or two on a healthy network does not move anyone.
    tokio::time::sleep(TEST_REPROBE_INTERVAL * 3).await;
    assert_eq!((a.edge(), b.edge()), (Some(west.setup.quic_addr), Some(west.setup.quic_addr)));

    // Both stream messages to each other; west dies in the middle.
    let (a_edge, b_edge) = (a.edge_changes(), b.edge_changes());
    let (a_sent, mut a_progress) = watch::channel(0);
    let (b_sent, _) = watch::channel(0);
    let alice_chat = tokio::spawn(chat(a, "alice", bob.id(), STREAM_MESSAGES, STREAM_MESSAGES, a_sent));
    let bob_chat = tokio::spawn(chat(b, "bob", alice.id(), STREAM_MESSAGES, STREAM_MESSAGES, b_sent));
    a_progress.wait_for(|sent| *sent >= SENT_BEFORE_KILL).await.unwrap();
    let killed_at = Instant::now();
    west_process.kill9();
    let failover = until_both_on(east.setup.quic_addr, a_edge, b_edge, killed_at).await;
    println!("edge map failover: both agents on the other edge {} ms after kill -9", failover.as_millis());
    assert!(failover <= FAILOVER_BUDGET, "failover took {failover:?}, more than {FAILOVER_BUDGET:?}");

    let (a, alice_received) = alice_chat.await.unwrap();
    let (b, bob_received) = bob_chat.await.unwrap();
    for (name, received, sender) in [("bob", &bob_received, "alice"), ("alice", &alice_received, "bob")] {
        let expected: BTreeSet<String> = (0..STREAM_MESSAGES).map(|n| format!("{sender} {n}")).collect();
        let got: BTreeSet<String> = received.keys().cloned().collect();
        let missing: Vec<&String> = expected.difference(&got).collect();
        assert!(missing.is_empty(), "{name} never received {missing:?}");
        let duplicated: Vec<(&String, &usize)> = received.iter().filter(|(_, times)| **times > 1).collect();
        assert!(duplicated.is_empty(), "{name} received more than once: {duplicated:?}");
        assert_eq!(got, expected, "{name} received nothing else");
    }
    assert_eq!((a.edge(), b.edge()), (Some(east.setup.quic_addr), Some(east.setup.quic_addr)), "no flapping back");

    // The command line chooses from the same map: west is still listed but dead, so
    // `molt send` and `molt listen` without --edge end up on east.
    cli_send_and_listen_choose_from_the_edge_map(&net, east.setup.quic_addr);
}

fn cli_send_and_listen_choose_from_the_edge_map(net: &Federation, expected_edge: SocketAddr) {
    let cli = net.cli();
    let roots = net.anchors.iter().map(Certificate::to_pem).collect::<String>();
    std::fs::write(net.dir.path().join("root.pem"), roots).unwrap();
    for name in ["carol", "dave"] {
        cli.stdout(&["keygen", "--dir", name]).unwrap();
        cli.json(&["cert", "issue-agent", "--org", &net.org, "--agent-dir", name]).unwrap();
    }
    let api = net.cp.url();
    let sent = cli
        .stdout(&[
            "send",
            "--agent-dir",
            "carol",
            "--api",
            &api,
            "--ca-root",
            "root.pem",
            "--to",
            "dave/card.json",
            "hi",
        ])
        .unwrap();
    assert!(sent.contains("\"disposition\""), "{sent}");
    // MOLT_API (set by the harness) stands in for --api.
    let listen =
        ["listen", "--agent-dir", "dave", "--ca-root", "root.pem", "--peer", "carol/card.json", "--count", "1"];
    let mut command = cli.command(&[&listen[..], &["--timeout-secs", "20"][..]].concat());
    command.env("RUST_LOG", "off");
    let (status, stdout, stderr) = run(command).unwrap();
    assert!(status.success(), "molt listen: {stdout}{stderr}");
    assert!(stdout.contains("\"text\":\"hi\""), "{stdout}");
    assert!(stderr.contains(&format!("via {expected_edge}")), "{stderr}");
}

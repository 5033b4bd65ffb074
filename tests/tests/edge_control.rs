//! An edge enrolled with a real control plane (`molt-edge enroll`, then `molt-edge` with
//! its `[control_plane]` link), agents with certificates from the control plane's CA, all
//! as real processes on loopback: registration and presence, revocation reaching live
//! connections within two seconds, relaying on while the control plane is down, and the
//! renewal of a short-lived edge certificate.

use std::time::{Duration, Instant};

use molt_protocol::cert::Certificate;
use molt_protocol::frame::Frame;
use molt_protocol::{EdgeId, UnixMillis};
use molt_sdk::Client;
use molt_tests::cluster::{self, Cluster, EnrolledEdge, WAIT};
use molt_tests::{EdgeSetup, RawSession, TestAgent};

/// The longest a revocation may take to close a live connection (the target).
const REVOCATION_BUDGET: Duration = Duration::from_secs(2);

struct Federation {
    cluster: Cluster,
    edge_id: EdgeId,
    edge: EdgeSetup,
    enrolled: EnrolledEdge,
}

impl Federation {
    /// A control plane with gRPC, an org, and an edge enrolled with a token made by
    /// `molt enrollment-token create` (with `token` as extra flags) and `link` appended to
    /// its `[control_plane]` section.
    fn new(token: &[&str], link: &str) -> Federation {
        let cluster = Cluster::start().unwrap();
        let enrolled = cluster.enroll("edge", "eu-west", token, link, None).unwrap();
        Federation { edge_id: enrolled.edge_id, edge: enrolled.setup.clone(), enrolled, cluster }
    }

    fn agent(&self, name: &str) -> (TestAgent, String) {
        self.cluster.agent(name).unwrap()
    }

    async fn connect(&self, agent: &TestAgent, peers: &[&TestAgent]) -> Client {
        self.enrolled.connect(agent, peers).await.unwrap()
    }

    async fn raw(&self, agent: &TestAgent) -> anyhow::Result<RawSession> {
        RawSession::connect(&agent.identity, self.enrolled.anchors.clone(), self.edge.quic_addr).await
    }

    fn revoke(&self, serial: &str) {
        self.cluster.revoke(serial).unwrap();
    }

    async fn until_sql(&self, query: &str, expected: &str) {
        self.cluster.until_sql(query, expected).await;
    }
}

fn read_chain(path: &std::path::Path) -> Vec<Certificate> {
    cluster::read_chain(path).unwrap()
}

/// `from` sends to `to`, which receives it.
async fn exchange(from: &mut Client, to: &mut Client, to_id: molt_protocol::AgentId, text: &[u8]) {
    tokio::time::timeout(WAIT, from.send(to_id, text)).await.expect("sent in time").expect("sent");
    let message = tokio::time::timeout(WAIT, to.recv()).await.expect("received in time").expect("client open");
    assert_eq!(message.plaintext, text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_edge_registers_reports_presence_and_closes_revoked_connections_within_two_seconds() {
    let net = Federation::new(&[], "");
    let _edge = net.edge.spawn().unwrap();
    let edge = net.edge_id.to_string();
    net.until_sql("SELECT id || '|' || region FROM edges", &format!("{edge}|eu-west")).await;
    let tokens = net.cluster.cli().json(&["enrollment-token", "list"]).unwrap();
    assert_eq!(tokens["items"][0]["status"], "used", "{tokens}");
    assert_eq!(tokens["items"][0]["used_by_edge"], edge.as_str());
    assert!(!tokens.to_string().contains("molt_enroll_"), "a list shows no secret");

    let (alice, _) = net.agent("alice");
    let (bob, _) = net.agent("bob");
    let (carol, carol_serial) = net.agent("carol");
    let mut a = net.connect(&alice, &[&bob]).await;
    let mut b = net.connect(&bob, &[&alice]).await;
    exchange(&mut a, &mut b, bob.id(), b"hello through an enrolled edge").await;
    let carol_session = net.raw(&carol).await.expect("carol connects before the revocation");
    let mut present = [alice.id().to_string(), bob.id().to_string(), carol.id().to_string()];
    present.sort();
    let query = format!("SELECT agent_id FROM edge_presence WHERE edge_id = '{edge}' ORDER BY agent_id");
    net.until_sql(&query, &present.join("\n")).await;

    let revoked_at = Instant::now();
    net.revoke(&carol_serial);
    let closed = tokio::time::timeout(WAIT, carol_session.connection.closed()).await.expect("carol is disconnected");
    let elapsed = revoked_at.elapsed();
    println!("revocation propagation: {} ms from the revoke request to the closed connection", elapsed.as_millis());
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(molt_edge::relay::close_code::REVOKED));
            assert_eq!(&close.reason[..], molt_edge::live::REVOKED_REASON);
        }
        other => panic!("closed for another reason: {other}"),
    }
    assert!(elapsed <= REVOCATION_BUDGET, "revocation took {elapsed:?}, more than {REVOCATION_BUDGET:?}");
    assert!(net.raw(&carol).await.is_err(), "a revoked agent cannot connect again");
    exchange(&mut b, &mut a, alice.id(), b"the others are untouched").await;
    let mut remaining = [alice.id().to_string(), bob.id().to_string()];
    remaining.sort();
    net.until_sql(&query, &remaining.join("\n")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_relays_on_without_the_control_plane_and_catches_up_when_it_returns() {
    let link = "presence_interval_ms = 300\nreconnect_backoff_min_ms = 100\nreconnect_backoff_max_ms = 500";
    let mut net = Federation::new(&[], link);
    let mut edge = net.edge.spawn().unwrap();
    let id = net.edge_id.to_string();
    net.until_sql(&format!("SELECT COUNT(*) FROM edges WHERE id = '{id}'"), "1").await;
    let (alice, _) = net.agent("alice");
    let (bob, _) = net.agent("bob");
    let (dave, dave_serial) = net.agent("dave");
    let mut a = net.connect(&alice, &[&bob]).await;
    let mut b = net.connect(&bob, &[&alice]).await;
    exchange(&mut a, &mut b, bob.id(), b"before").await;

    net.cluster.cp.stop();
    exchange(&mut a, &mut b, bob.id(), b"the control plane is down").await;
    // A restart while it is down starts from the cached bundle and serves known agents.
    edge.kill9();
    drop((a, b));
    let edge = net.edge.spawn().expect("the edge starts without its control plane");
    let mut a = net.connect(&alice, &[&bob]).await;
    let mut b = net.connect(&bob, &[&alice]).await;
    exchange(&mut b, &mut a, alice.id(), b"after an edge restart").await;
    let dave_session = net.raw(&dave).await.expect("a known agent connects while the control plane is down");

    let restarted = UnixMillis::now_from_system().0;
    net.cluster.cp.restart().unwrap();
    let seen = format!("SELECT last_seen_ms > {restarted} FROM edges WHERE id = '{id}'");
    net.until_sql(&seen, "1").await;
    // Caught up: a revocation made now reaches the edge.
    net.revoke(&dave_serial);
    let closed = tokio::time::timeout(WAIT, dave_session.connection.closed()).await.expect("dave is disconnected");
    assert!(matches!(closed, quinn::ConnectionError::ApplicationClosed(_)), "{closed}");
    exchange(&mut a, &mut b, bob.id(), b"after").await;
    drop(edge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_edge_certificate_is_renewed_before_it_expires() {
    // 60 s certificates (plus the CA's 5-minute backdate: a lifetime of 6 minutes), renewed
    // when less than 16 % (57.6 s) is left: about 2.4 s after each issuance.
    let link = "renew_at_remaining_percent = 16\nrenew_check_interval_ms = 200";
    let net = Federation::new(&["--certificate-validity-secs", "60"], link);
    let chain_path = net.edge.config.with_file_name("edge.pem");
    let key_path = net.edge.config.with_file_name("edge.key");
    let first = read_chain(&chain_path).remove(0);
    let first_key = std::fs::read(&key_path).unwrap();
    let mut edge = net.edge.spawn().unwrap();
    let (alice, _) = net.agent("alice");
    let mut before = net.raw(&alice).await.expect("alice connects with the first certificate");
    assert_eq!(served_serial(&before), first.serial());

    let deadline = Instant::now() + WAIT;
    let renewed = loop {
        let leaf = read_chain(&chain_path).remove(0);
        if leaf.serial() != first.serial() {
            break leaf;
        }
        assert!(Instant::now() < deadline, "the certificate was not renewed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(renewed.role(), first.role(), "the same edge id");
    assert_ne!(renewed.public_key(), first.public_key(), "a renewal rotates a key file");
    assert_ne!(std::fs::read(&key_path).unwrap(), first_key, "the new key replaced the old one");
    assert!(renewed.validity().not_after.0 > first.validity().not_after.0);
    ping(&mut before).await;

    // Past the first certificate's end, new connections still succeed.
    while UnixMillis::now_from_system().0 <= first.validity().not_after.0 + 1_000 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = net.raw(&alice).await.expect("a new connection after the first certificate expired");
    assert_ne!(served_serial(&after), first.serial());

    // Killed at any point of its renewals, the edge restarts on a key and chain that fit.
    edge.kill9();
    let _edge = net.edge.spawn().unwrap();
    let restarted = net.raw(&alice).await.expect("a connection after kill -9 and a restart");
    assert_ne!(served_serial(&restarted), first.serial());
}

/// The connection answers a ping: it survived the certificate swap.
async fn ping(session: &mut RawSession) {
    session.send.write_all(&Frame::Ping(9).encode()).await.unwrap();
    let mut reader = molt_protocol::frame::FrameReader::new();
    let pong = tokio::time::timeout(WAIT, async {
        loop {
            let chunk = session.recv.read_chunk(65536, true).await.unwrap().expect("stream open");
            reader.extend(&chunk.bytes);
            if let Some(frame) = reader.next_frame().unwrap() {
                return frame;
            }
        }
    })
    .await
    .expect("a pong");
    assert_eq!(pong, Frame::Pong(9), "the connection made before the renewal still works");
}

/// Serial of the certificate the edge presented on this connection.
fn served_serial(session: &RawSession) -> molt_protocol::cert::Serial {
    let chain = session
        .connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .expect("the edge's chain");
    Certificate::from_der(&chain[0]).unwrap().serial()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_reports_a_metrics_summary_that_molt_edge_list_shows() {
    let net = Federation::new(&[], "presence_interval_ms = 200");
    let _edge = net.edge.spawn().unwrap();
    let (alice, _) = net.agent("alice");
    let (bob, _) = net.agent("bob");
    let mut alice_client = net.connect(&alice, &[&bob]).await;
    let mut bob_client = net.connect(&bob, &[&alice]).await;
    for index in 0..5 {
        exchange(&mut alice_client, &mut bob_client, bob.id(), format!("note {index}").as_bytes()).await;
    }

    // Reports go out at least every 200 ms; wait for one that counts all five.
    let deadline = Instant::now() + WAIT;
    let listed = loop {
        let listed = net.cluster.cli().json(&["edge", "list"]).unwrap();
        let received = listed["items"][0]["summary"]["messages_received"].as_u64().unwrap_or(0);
        if received >= 5 && listed["items"][0]["connected_agents"] == 2 {
            break listed;
        }
        assert!(Instant::now() < deadline, "no summary with 5 messages and 2 agents: {listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let edge = &listed["items"][0];
    assert_eq!(edge["edge_id"], net.edge_id.to_string().as_str(), "{listed}");
    assert_eq!(edge["in_edge_map"], true, "{listed}");
    assert_eq!(edge["summary"]["connections"], 2, "{listed}");
    assert!(edge["summary"]["messages_delivered"].as_u64().unwrap() >= 5, "{listed}");
    assert!(edge["summary"]["uptime_ms"].as_u64().unwrap() > 0, "{listed}");
    assert!(edge["summary_at_ms"].as_u64().unwrap() > 0, "{listed}");

    // The text form names the edge and its counts.
    let text = net.cluster.cli().stdout(&["edge", "list"]).unwrap();
    assert!(text.contains(&net.edge_id.to_string()) && text.contains("2 connections"), "{text}");

    // Without an admin key the list is refused; a weight out of range is a usage error.
    let anonymous = molt_tests::control_plane::Cli { token: None, ..net.cluster.cli() };
    let refused = anonymous.fails(&["edge", "list"]).unwrap();
    assert!(refused.contains("an admin token is needed"), "{refused}");
    let edge_id = net.edge_id.to_string();
    net.cluster.cli().fails_with(2, &["edge", "weight", &edge_id, "0"]).unwrap();
    let weighted = net.cluster.cli().json(&["edge", "weight", &edge_id, "250"]).unwrap();
    assert_eq!(weighted["weight"], 250, "{weighted}");
}

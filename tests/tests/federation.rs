//! Edge-to-edge routing with real processes on loopback: a control plane with gRPC and two
//! edges in different regions, enrolled with it and linked over QUIC (`[federation]`).
//! Cross-edge delivery with receipts back to the sender, an offline recipient who turns up
//! at the other edge, an edge killed with `kill -9` while it holds buffered messages, and
//! messaging between known agents while the control plane is down.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use molt_protocol::envelope::{self, EnvelopeHeader, Ttl};
use molt_protocol::frame::{Disposition, Frame, FrameReader, RejectCode};
use molt_protocol::{MessageId, UnixMillis};
use molt_sdk::{Client, Event};
use molt_tests::cluster::{Cluster, EnrolledEdge, WAIT};
use molt_tests::{EdgeProcess, TestAgent};

/// Control-link and federation settings that make the tests quick: presence within a
/// quarter second, short back-offs, fresh lookups.
const LINK: &str = "presence_interval_ms = 300\nreconnect_backoff_min_ms = 100\nreconnect_backoff_max_ms = 500";
const FEDERATION: &str = "presence_fresh_ms = 300\nhandoff_interval_ms = 100";

struct Pair {
    cluster: Cluster,
    west: EnrolledEdge,
    east: EnrolledEdge,
}

fn pair() -> Pair {
    let cluster = Cluster::start().unwrap();
    let west = cluster.enroll("west", "eu-west", &[], LINK, Some(FEDERATION)).unwrap();
    let east = cluster.enroll("east", "us-east", &[], LINK, Some(FEDERATION)).unwrap();
    Pair { cluster, west, east }
}

/// `from` sends to `to`, which receives exactly that message; returns the disposition.
async fn exchange(from: &Client, to: &mut Client, to_agent: &TestAgent, text: &[u8]) -> Disposition {
    let report = tokio::time::timeout(WAIT, from.send(to_agent.id(), text)).await.expect("sent in time").expect("sent");
    let message = tokio::time::timeout(WAIT, to.recv()).await.expect("received in time").expect("client open");
    assert_eq!(message.plaintext, text);
    report.disposition
}

/// Waits for the receipt of `message_id` among `client`'s events.
async fn receipt(client: &mut Client, message_id: MessageId) {
    tokio::time::timeout(WAIT, async {
        loop {
            match client.next_event().await.expect("client open") {
                Event::Receipt { message_id: receipted, .. } if receipted == message_id => return,
                _ => {}
            }
        }
    })
    .await
    .expect("the receipt came back across the edges");
}

/// Receives until `count` distinct messages arrived, then checks nothing else comes.
async fn receive_exactly(client: &mut Client, count: usize) -> HashSet<Vec<u8>> {
    let mut seen = HashSet::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, client.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} messages arrived", seen.len()))
            .expect("client open");
        assert!(
            seen.insert(message.plaintext.clone()),
            "delivered twice: {:?}",
            String::from_utf8_lossy(&message.plaintext)
        );
    }
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_secs(1), client.recv()).await {
        panic!("a message beyond the {count} expected: {:?}", String::from_utf8_lossy(&extra.plaintext));
    }
    seen
}

/// Waits until the edge's metric `name` reads `expected` (gauges refresh every second).
async fn until_metric(edge: &EdgeProcess, name: &str, expected: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = edge.metric(name).unwrap_or(f64::NAN);
        if value == expected {
            return;
        }
        assert!(Instant::now() < deadline, "{name} reads {value}, expected {expected}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_crosses_to_the_recipients_edge_and_its_receipt_comes_back() {
    let net = pair();
    let west = net.west.setup.spawn().unwrap();
    let east = net.east.setup.spawn().unwrap();
    let (alice, _) = net.cluster.agent("alice").unwrap();
    let (bob, _) = net.cluster.agent("bob").unwrap();
    let mut a = net.west.connect(&alice, &[&bob]).await.unwrap();
    let mut b = net.east.connect(&bob, &[&alice]).await.unwrap();
    net.cluster.until_present(&alice, &net.west).await;
    net.cluster.until_present(&bob, &net.east).await;

    let report = a.send(bob.id(), b"west to east").await.unwrap();
    assert_eq!(report.disposition, Disposition::Stored, "the far edge stored it before answering");
    let message = tokio::time::timeout(WAIT, b.recv()).await.unwrap().unwrap();
    assert_eq!((message.plaintext.as_slice(), message.sender), (&b"west to east"[..], alice.id()));
    receipt(&mut a, report.message_id).await;
    assert_eq!(exchange(&b, &mut a, &alice, b"east to west").await, Disposition::Stored);

    for i in 0..200u32 {
        a.send(bob.id(), format!("burst {i}").as_bytes()).await.unwrap();
    }
    receive_exactly(&mut b, 200).await;
    assert!(west.metric("molt_edge_peer_forwarded_total{outcome=\"accepted\"}").unwrap() >= 201.0);
    assert!(east.metric("molt_edge_peer_received_total").unwrap() >= 201.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_for_an_offline_agent_is_delivered_when_it_connects_to_the_other_edge() {
    let net = pair();
    let west = net.west.setup.spawn().unwrap();
    let _east = net.east.setup.spawn().unwrap();
    let (alice, _) = net.cluster.agent("alice").unwrap();
    let (bob, _) = net.cluster.agent("bob").unwrap();
    let mut a = net.west.connect(&alice, &[&bob]).await.unwrap();
    net.cluster.until_present(&alice, &net.west).await;

    let mut ids = Vec::new();
    for i in 0..20u32 {
        let report = a.send(bob.id(), format!("while you were away {i}").as_bytes()).await.unwrap();
        assert_eq!(report.disposition, Disposition::Stored, "bob is nowhere: buffered at the sender's edge");
        ids.push(report.message_id);
    }
    until_metric(&west, "molt_edge_buffer_messages", 20.0).await;

    let mut b = net.east.connect(&bob, &[&alice]).await.unwrap();
    let received = receive_exactly(&mut b, 20).await;
    assert!(received.contains(&b"while you were away 0"[..]));
    for id in ids {
        receipt(&mut a, id).await;
    }
    until_metric(&west, "molt_edge_buffer_messages", 0.0).await;
    assert_eq!(west.metric("molt_edge_handoffs_total").unwrap(), 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_while_holding_buffered_messages_delivers_each_exactly_once_after_a_restart() {
    let net = pair();
    let mut west = net.west.setup.spawn().unwrap();
    let _east = net.east.setup.spawn().unwrap();
    let (alice, _) = net.cluster.agent("alice").unwrap();
    let (bob, _) = net.cluster.agent("bob").unwrap();
    let a = net.west.connect(&alice, &[&bob]).await.unwrap();
    net.cluster.until_present(&alice, &net.west).await;
    for i in 0..100u32 {
        let report = a.send(bob.id(), format!("buffered {i}").as_bytes()).await.unwrap();
        assert_eq!(report.disposition, Disposition::Stored);
    }
    drop(a);
    west.kill9();

    // Bob turns up at the east edge while the west edge is down: nothing can reach him yet.
    let mut b = net.east.connect(&bob, &[&alice]).await.unwrap();
    net.cluster.until_present(&bob, &net.east).await;
    assert!(tokio::time::timeout(Duration::from_millis(500), b.recv()).await.is_err());

    let west = net.west.setup.spawn().expect("the west edge restarts on its buffer");
    let received = receive_exactly(&mut b, 100).await;
    for i in 0..100u32 {
        assert!(received.contains(format!("buffered {i}").as_bytes()), "buffered {i} was lost");
    }
    until_metric(&west, "molt_edge_buffer_messages", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_agents_keep_talking_across_edges_while_the_control_plane_is_down() {
    let mut net = pair();
    let _west = net.west.setup.spawn().unwrap();
    let _east = net.east.setup.spawn().unwrap();
    let (alice, _) = net.cluster.agent("alice").unwrap();
    let (bob, _) = net.cluster.agent("bob").unwrap();
    let mut a = net.west.connect(&alice, &[&bob]).await.unwrap();
    let mut b = net.east.connect(&bob, &[&alice]).await.unwrap();
    net.cluster.until_present(&alice, &net.west).await;
    net.cluster.until_present(&bob, &net.east).await;
    assert_eq!(exchange(&a, &mut b, &bob, b"before").await, Disposition::Stored);
    assert_eq!(exchange(&b, &mut a, &alice, b"before, back").await, Disposition::Stored);

    net.cluster.cp.stop();
    // Well past presence_fresh_ms: every answer the edges hold is stale, and still used.
    for round in 0..10u32 {
        let text = format!("the control plane is down {round}");
        assert_eq!(exchange(&a, &mut b, &bob, text.as_bytes()).await, Disposition::Stored, "{text}");
        assert_eq!(exchange(&b, &mut a, &alice, text.as_bytes()).await, Disposition::Stored, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    net.cluster.cp.restart().unwrap();
    net.cluster.until_present(&bob, &net.east).await;
    assert_eq!(exchange(&a, &mut b, &bob, b"after").await, Disposition::Stored);
}

/// A raw link to `to`, dialled with `from`'s identity files.
async fn raw_link(from: &EnrolledEdge, to: &EnrolledEdge) -> anyhow::Result<(quinn::Connection, RawLink)> {
    let key = molt_edge::config::KeySource::File(from.setup.config.with_file_name("edge.key"));
    let identity = molt_edge::identity::load_identity(&from.chain_path(), &key)?;
    let tls = molt_protocol::tls::client_config_with_signer(
        &identity.tls,
        to.anchors.clone(),
        Default::default(),
        molt_protocol::cert::ExpectedRole::Edge(to.edge_id),
        molt_protocol::tls::ALPN_EDGE_LINK,
    )?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(molt_edge::federation::quic_client_config(tls)?);
    let connection = endpoint.connect(to.peer_addr.expect("a federation port"), "edge.molt")?.await?;
    let (send, recv) = connection.open_bi().await?;
    Ok((connection, RawLink { send, recv, reader: FrameReader::new() }))
}

struct RawLink {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    reader: FrameReader,
}

impl RawLink {
    async fn request(&mut self, bytes: &[u8]) -> Frame {
        self.send.write_all(bytes).await.unwrap();
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(frame) = self.reader.next_frame().unwrap() {
                    return frame;
                }
                let chunk = self.recv.read_chunk(65536, true).await.unwrap().expect("link open");
                self.reader.extend(&chunk.bytes);
            }
        })
        .await
        .expect("an answer")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_refuses_agents_and_answers_bad_requests_without_storing_them() {
    let net = pair();
    let west = net.west.setup.spawn().unwrap();
    let _east = net.east.setup.spawn().unwrap();
    let peer_addr = net.west.peer_addr.unwrap();

    // An agent's certificate does not open a link.
    let (alice, _) = net.cluster.agent("alice").unwrap();
    let refused = molt_tests::RawSession::connect(&alice.identity, net.west.anchors.clone(), peer_addr).await;
    assert!(refused.is_err(), "an agent certificate was accepted on the edge-to-edge port");

    // From a real edge: a garbled envelope, an expired one and a garbled receipt are
    // refused one by one, and nothing is buffered.
    let (connection, mut link) = raw_link(&net.east, &net.west).await.unwrap();
    let garbled = link.request(&Frame::Send(vec![7; 64]).encode()).await;
    assert!(matches!(garbled, Frame::Rejected { code: RejectCode::Malformed, .. }), "{garbled:?}");
    let (bob, _) = net.cluster.agent("bob").unwrap();
    let header = EnvelopeHeader {
        message_id: MessageId::random(&mut rand::rngs::OsRng),
        sender: alice.id(),
        recipient: bob.id(),
        timestamp: UnixMillis(UnixMillis::now_from_system().0 - 120_000),
        ttl: Ttl::from_secs(60).unwrap(),
    };
    let expired = envelope::seal(
        &header,
        &bob.identity.peer_keys().encryption,
        b"too late",
        &alice.identity.signing_key,
        &mut rand::rngs::OsRng,
    )
    .unwrap();
    let answer = link.request(&Frame::Send(expired).encode()).await;
    assert!(matches!(answer, Frame::Rejected { code: RejectCode::Expired, .. }), "{answer:?}");
    let garbled = link.request(&Frame::Receipt(vec![1; 10]).encode()).await;
    assert!(matches!(garbled, Frame::Rejected { code: RejectCode::Malformed, .. }), "{garbled:?}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(west.metric("molt_edge_buffer_messages").unwrap(), 0.0);

    // A frame no edge may send on a link closes it.
    link.send.write_all(&Frame::Deliver(vec![1, 2, 3]).encode()).await.unwrap();
    let closed = tokio::time::timeout(WAIT, connection.closed()).await.expect("the link is closed");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(molt_edge::relay::close_code::PROTOCOL_VIOLATION));
        }
        other => panic!("closed for another reason: {other}"),
    }
    // And a frame that does not decode (an unknown type) closes a fresh one too.
    let (connection, mut link) = raw_link(&net.east, &net.west).await.unwrap();
    link.send.write_all(&[0, 0, 0, 1, 0xee]).await.unwrap();
    let closed = tokio::time::timeout(WAIT, connection.closed()).await.expect("the link is closed");
    assert!(matches!(closed, quinn::ConnectionError::ApplicationClosed(_)), "{closed}");
}

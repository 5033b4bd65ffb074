//! End-to-end scenarios through a real `molt-edge` process on loopback QUIC.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use molt_protocol::envelope::{self, EnvelopeHeader, Ttl};
use molt_protocol::frame::{Disposition, RejectCode};
use molt_protocol::keys::SigningKey;
use molt_protocol::{MessageId, UnixMillis};
use molt_sdk::{Client, Event, SendError};
use molt_tests::{Network, TestAgent};

const WAIT: Duration = Duration::from_secs(20);

fn seal(from: &TestAgent, to: &TestAgent, text: &[u8]) -> (MessageId, Vec<u8>) {
    let header = EnvelopeHeader {
        message_id: MessageId::random(&mut rand::rngs::OsRng),
        sender: from.id(),
        recipient: to.id(),
        timestamp: UnixMillis::now_from_system(),
        ttl: Ttl::from_secs(3600).unwrap(),
    };
    let bytes = envelope::seal(
        &header,
        &to.identity.encryption_secret.public_key(),
        text,
        &from.identity.signing_key,
        &mut rand::rngs::OsRng,
    )
    .unwrap();
    (header.message_id, bytes)
}

async fn next_message(client: &mut Client) -> molt_sdk::IncomingMessage {
    tokio::time::timeout(WAIT, client.recv()).await.expect("a message within the wait").expect("client open")
}

async fn next_receipt(client: &mut Client) -> MessageId {
    loop {
        match tokio::time::timeout(WAIT, client.next_event()).await.expect("an event").expect("client open") {
            Event::Receipt { message_id, .. } => return message_id,
            _ => continue,
        }
    }
}

/// Gauges refresh once a second: poll until `name` reads `value`.
async fn wait_for_metric(edge: &molt_tests::EdgeProcess, name: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let current = edge.metric(name).ok();
        if current == Some(value) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{name} is {current:?}, expected {value}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_agents_exchange_messages_and_receipts() {
    let net = Network::new().unwrap();
    let edge = net.edge("edge", "").unwrap().spawn().unwrap();
    let alice = net.agent("alice").unwrap();
    let bob = net.agent("bob").unwrap();
    let mut a = net.connect(&alice, edge.quic_addr(), &[&bob]).await.unwrap();
    let mut b = net.connect(&bob, edge.quic_addr(), &[&alice]).await.unwrap();

    let report = a.send(bob.id(), b"hello bob").await.unwrap();
    assert_eq!(report.disposition, Disposition::Forwarded);
    let message = next_message(&mut b).await;
    assert_eq!(message.plaintext, b"hello bob");
    assert_eq!(message.sender, alice.id());
    assert_eq!(message.message_id, report.message_id);
    assert_eq!(next_receipt(&mut a).await, report.message_id, "bob's signed receipt reaches alice");

    let reply = b.send(alice.id(), b"hi alice").await.unwrap();
    assert_eq!(next_message(&mut a).await.message_id, reply.message_id);

    let metrics = edge.metrics().unwrap();
    assert!(metrics.contains("molt_edge_messages_received_total"), "{metrics}");
    assert!(edge.metric("molt_edge_connections").unwrap() >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_gets_buffered_messages_in_order() {
    let net = Network::new().unwrap();
    let edge = net.edge("edge", "").unwrap().spawn().unwrap();
    let alice = net.agent("alice").unwrap();
    let bob = net.agent("bob").unwrap();
    let mut a = net.connect(&alice, edge.quic_addr(), &[&bob]).await.unwrap();

    let mut sent = Vec::new();
    for n in 0..50 {
        let report = a.send(bob.id(), format!("message {n}").as_bytes()).await.unwrap();
        assert_eq!(report.disposition, Disposition::Stored, "bob is offline: the ack means on disk");
        sent.push(report.message_id);
    }
    wait_for_metric(&edge, "molt_edge_buffer_messages", 50.0).await;

    let mut b = net.connect(&bob, edge.quic_addr(), &[&alice]).await.unwrap();
    for (n, id) in sent.iter().enumerate() {
        let message = next_message(&mut b).await;
        assert_eq!(message.message_id, *id, "in order");
        assert_eq!(message.plaintext, format!("message {n}").as_bytes());
    }
    // Receipts delete the buffered copies and reach alice.
    let mut receipted = HashSet::new();
    while receipted.len() < sent.len() {
        receipted.insert(next_receipt(&mut a).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_and_spoofed_messages_are_rejected() {
    let net = Network::new().unwrap();
    let edge = net.edge("edge", "").unwrap().spawn().unwrap();
    let alice = net.agent("alice").unwrap();
    let bob = net.agent("bob").unwrap();
    let a = net.connect(&alice, edge.quic_addr(), &[&bob]).await.unwrap();

    // Forged: alice's header, someone else's signature.
    let mallory_key = SigningKey::generate(&mut rand::rngs::OsRng);
    let header = EnvelopeHeader {
        message_id: MessageId::random(&mut rand::rngs::OsRng),
        sender: alice.id(),
        recipient: bob.id(),
        timestamp: UnixMillis::now_from_system(),
        ttl: Ttl::from_secs(60).unwrap(),
    };
    let forged = envelope::sign_raw(&header, b"not really alice", &mallory_key).unwrap();
    let error = a.send_envelope(forged).await.unwrap_err();
    assert!(matches!(error, SendError::Rejected { code: RejectCode::BadSignature, .. }), "{error:?}");

    // Replayed: the same signed bytes twice.
    let (_, bytes) = seal(&alice, &bob, b"once");
    a.send_envelope(bytes.clone()).await.unwrap();
    let error = a.send_envelope(bytes).await.unwrap_err();
    assert!(matches!(error, SendError::Rejected { code: RejectCode::Duplicate, .. }), "{error:?}");

    // Spoofed: validly signed by bob, but sent over alice's connection.
    let (_, spoofed) = seal(&bob, &alice, b"i am bob");
    let error = a.send_envelope(spoofed).await.unwrap_err();
    assert!(matches!(error, SendError::Rejected { code: RejectCode::SenderMismatch, .. }), "{error:?}");

    // Stale timestamp.
    let old = EnvelopeHeader { timestamp: UnixMillis(UnixMillis::now_from_system().0 - 3_600_000), ..header };
    let old = envelope::sign_raw(
        &EnvelopeHeader { message_id: MessageId::random(&mut rand::rngs::OsRng), ..old },
        b"x",
        &alice.identity.signing_key,
    )
    .unwrap();
    let error = a.send_envelope(old).await.unwrap_err();
    assert!(matches!(error, SendError::Rejected { code: RejectCode::TooOld | RejectCode::Expired, .. }), "{error:?}");

    // The connection survived all of it.
    let report = a.send(bob.id(), b"still here").await.unwrap();
    assert_eq!(report.disposition, Disposition::Stored);
    assert!(edge.metric("molt_edge_verify_failures_total").unwrap() >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_agent_is_limited_while_others_continue() {
    let net = Network::new().unwrap();
    let edge =
        net.edge("edge", "[limits]\nmessages_per_minute = 50\nmessages_per_hour = 1000\n").unwrap().spawn().unwrap();
    let flooder = net.agent("flooder").unwrap();
    let polite = net.agent("polite").unwrap();
    let bob = net.agent("bob").unwrap();
    let f = Arc::new(net.connect(&flooder, edge.quic_addr(), &[&bob]).await.unwrap());
    let p = net.connect(&polite, edge.quic_addr(), &[&bob]).await.unwrap();

    let flood = {
        let f = f.clone();
        let bytes: Vec<Vec<u8>> = (0..300).map(|_| seal(&flooder, &bob, b"spam").1).collect();
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for envelope in bytes {
                answers.push(f.send_envelope_pipelined(envelope).await.unwrap());
            }
            let mut limited = 0;
            let mut accepted = 0;
            for answer in answers {
                match answer.await.unwrap() {
                    Ok(_) => accepted += 1,
                    Err(SendError::Rejected { code: RejectCode::RateLimited, .. }) => limited += 1,
                    Err(other) => panic!("unexpected {other:?}"),
                }
            }
            (accepted, limited)
        })
    };
    for n in 0..20 {
        p.send(bob.id(), format!("polite {n}").as_bytes()).await.expect("the polite agent is not limited");
    }
    let (accepted, limited) = flood.await.unwrap();
    assert!(accepted <= 55, "the burst allowance is 50 per minute, accepted {accepted}");
    assert!(limited >= 245, "limited {limited}");
    assert!(edge.metric("molt_edge_rate_limited_total").unwrap() >= 245.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_certificates_are_refused_at_the_handshake() {
    let net = Network::new().unwrap();
    let alice = net.agent("alice").unwrap();
    let bob = net.agent("bob").unwrap();
    let serial = alice.identity.chain[0].serial();
    net.ca.revoke(serial, UnixMillis::now_from_system()).unwrap();
    let edge = net.edge("edge", "").unwrap().spawn().unwrap();

    let refused = net.connect(&alice, edge.quic_addr(), &[]).await;
    assert!(refused.is_err(), "a revoked certificate must not connect");
    net.connect(&bob, edge.quic_addr(), &[]).await.expect("bob is not revoked");

    let expired = net.expired_agent("old").unwrap();
    assert!(net.connect(&expired, edge.quic_addr(), &[]).await.is_err(), "an expired certificate must not connect");
    assert!(edge.metric("molt_edge_connections_refused_total").unwrap() >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_killed_with_10000_buffered_messages_delivers_each_exactly_once() {
    let net = Network::new().unwrap();
    let setup = net.edge("edge", "[limits]\nmessages_per_minute = 1000000\nmessages_per_hour = 10000000\n").unwrap();
    let mut edge = setup.spawn().unwrap();
    let alice = net.agent("alice").unwrap();
    let bob = net.agent("bob").unwrap();
    let a = net.connect(&alice, edge.quic_addr(), &[&bob]).await.unwrap();

    let mut expected: HashMap<MessageId, Vec<u8>> = HashMap::new();
    let mut answers = Vec::new();
    for n in 0..10_000u32 {
        let text = format!("buffered {n}").into_bytes();
        let (id, bytes) = seal(&alice, &bob, &text);
        expected.insert(id, text);
        answers.push((id, a.send_envelope_pipelined(bytes).await.unwrap()));
    }
    for (id, answer) in answers {
        let disposition = answer.await.unwrap().unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(disposition, Disposition::Stored);
    }
    drop(a);

    edge.kill9();
    let edge = setup.spawn().unwrap();
    let mut b = net.connect(&bob, edge.quic_addr(), &[&alice]).await.unwrap();
    let mut seen = HashSet::new();
    while seen.len() < expected.len() {
        let message = next_message(&mut b).await;
        assert_eq!(expected.get(&message.message_id), Some(&message.plaintext), "only what was sent");
        assert!(seen.insert(message.message_id), "{} delivered twice", message.message_id);
    }
    // Nothing more arrives.
    let extra = tokio::time::timeout(Duration::from_millis(500), b.recv()).await;
    assert!(extra.is_err(), "unexpected extra message {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_killed_mid_stream_loses_no_acknowledged_message() {
    let net = Network::new().unwrap();
    let setup = net.edge("edge", "[limits]\nmessages_per_minute = 1000000\nmessages_per_hour = 10000000\n").unwrap();
    let mut edge = setup.spawn().unwrap();
    let alice = net.agent("alice").unwrap();
    let bob = net.agent("bob").unwrap();
    let a = Arc::new(net.connect(&alice, edge.quic_addr(), &[&bob]).await.unwrap());

    let envelopes: Vec<(MessageId, Vec<u8>)> =
        (0..20_000u32).map(|n| seal(&alice, &bob, format!("m{n}").as_bytes())).collect();
    let sent: HashSet<MessageId> = envelopes.iter().map(|(id, _)| *id).collect();
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::channel(32_768);
    let sender = {
        let a = a.clone();
        tokio::spawn(async move {
            for (id, bytes) in envelopes {
                let Ok(answer) = a.send_envelope_pipelined(bytes).await else { return };
                let acked_tx = acked_tx.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(Disposition::Stored)) = answer.await {
                        let _ = acked_tx.send(id).await;
                    }
                });
            }
        })
    };
    let mut acked = HashSet::new();
    while acked.len() < 3_000 {
        acked.insert(tokio::time::timeout(WAIT, acked_rx.recv()).await.unwrap().unwrap());
    }
    edge.kill9();
    sender.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok(id) = acked_rx.try_recv() {
        acked.insert(id);
    }
    drop(a);

    let edge = setup.spawn().unwrap();
    let mut b = net.connect(&bob, edge.quic_addr(), &[&alice]).await.unwrap();
    let mut seen = HashSet::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(3), b.recv()).await {
        assert!(sent.contains(&message.message_id));
        assert!(seen.insert(message.message_id), "delivered twice");
    }
    let lost: Vec<_> = acked.difference(&seen).collect();
    assert!(lost.is_empty(), "{} acknowledged messages lost, e.g. {:?}", lost.len(), lost.first());
    let _ = edge;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_tells_agents_when_to_reconnect_and_they_do() {
    let net = Network::new().unwrap();
    let setup = net.edge("edge", "[shutdown]\nreconnect_after_ms = 300\ndrain_timeout_ms = 2000\n").unwrap();
    let mut edge = setup.spawn().unwrap();
    let alice = net.agent("alice").unwrap();
    let bob = net.agent("bob").unwrap();
    let mut a = net.connect(&alice, edge.quic_addr(), &[&bob]).await.unwrap();

    let status = edge.terminate().unwrap();
    assert!(status.success(), "the edge exits cleanly on SIGTERM: {status:?}");
    let go_away = loop {
        match tokio::time::timeout(WAIT, a.next_event()).await.unwrap().unwrap() {
            Event::GoAway { reconnect_after } => break reconnect_after,
            _ => continue,
        }
    };
    assert_eq!(go_away, Duration::from_millis(300));

    // The edge comes back; the client reconnects on its own and traffic resumes.
    let edge = setup.spawn().unwrap();
    let mut b = net.connect(&bob, edge.quic_addr(), &[&alice]).await.unwrap();
    let report = tokio::time::timeout(WAIT, async {
        loop {
            match a.send(bob.id(), b"back again").await {
                Ok(report) => return report,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("alice reconnects");
    assert_eq!(next_message(&mut b).await.message_id, report.message_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_recipient_queue_is_reported_to_the_sender() {
    let net = Network::new().unwrap();
    let edge = net.edge("edge", "[buffer]\nqueue_depth_per_agent_max = 5\n").unwrap().spawn().unwrap();
    let alice = net.agent("alice").unwrap();
    let bob = net.agent("bob").unwrap();
    let carol = net.agent("carol").unwrap();
    let a = net.connect(&alice, edge.quic_addr(), &[&bob, &carol]).await.unwrap();
    for _ in 0..5 {
        assert_eq!(a.send(bob.id(), b"fits").await.unwrap().disposition, Disposition::Stored);
    }
    let error = a.send(bob.id(), b"one too many").await.unwrap_err();
    assert!(matches!(error, SendError::Rejected { code: RejectCode::QueueFull, .. }), "{error:?}");
    // Another recipient's queue is unaffected.
    assert_eq!(a.send(carol.id(), b"for carol").await.unwrap().disposition, Disposition::Stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_buffered_message_arrives_on_connect() {
    // The message can arrive in the same read as the handshake's pong; nothing else follows.
    let net = Network::new().unwrap();
    let edge = net.edge("edge", "").unwrap().spawn().unwrap();
    let alice = net.agent("alice").unwrap();
    let bob = net.agent("bob").unwrap();
    let a = net.connect(&alice, edge.quic_addr(), &[&bob]).await.unwrap();
    let report = a.send(bob.id(), b"only one").await.unwrap();
    assert_eq!(report.disposition, Disposition::Stored);
    let mut b = net.connect(&bob, edge.quic_addr(), &[&alice]).await.unwrap();
    assert_eq!(next_message(&mut b).await.message_id, report.message_id);
}

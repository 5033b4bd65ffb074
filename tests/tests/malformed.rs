//! Malformed and abusive input at the frame level, through raw QUIC sessions: the edge
//! answers with typed errors, closes only connections it cannot resynchronise or that
//! keep misbehaving, and keeps serving everyone else.

use std::time::Duration;

use molt_protocol::frame::{Frame, FrameReader, RejectCode};
use molt_protocol::limits::MAX_FRAME_BYTES;
use molt_tests::{Network, RawSession};

/// Reads frames until one matches or the stream ends; returns what matched.
async fn read_until(session: &mut RawSession, wanted: impl Fn(&Frame) -> bool) -> Option<Frame> {
    let mut reader = FrameReader::new();
    loop {
        let chunk =
            tokio::time::timeout(Duration::from_secs(10), session.recv.read_chunk(65536, true)).await.ok()?.ok()??;
        reader.extend(&chunk.bytes);
        while let Ok(Some(frame)) = reader.next_frame() {
            if wanted(&frame) {
                return Some(frame);
            }
        }
    }
}

async fn closed_with(session: &RawSession) -> Option<u64> {
    match tokio::time::timeout(Duration::from_secs(10), session.connection.closed()).await.ok()? {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_do_not_crash_the_edge() {
    let net = Network::new().unwrap();
    let edge = net.edge("edge", "[limits]\nbad_messages_per_connection_max = 5\n").unwrap().spawn().unwrap();
    let alice = net.agent("alice").unwrap();
    let bob = net.agent("bob").unwrap();

    // A frame length over the limit: the stream cannot be resynchronised, so the edge
    // says why and closes the connection with the protocol-violation code.
    let mut session = RawSession::connect(&alice.identity, net.anchors.clone(), edge.quic_addr()).await.unwrap();
    session.send.write_all(&((MAX_FRAME_BYTES as u32) + 1).to_be_bytes()).await.unwrap();
    let rejected = read_until(&mut session, |f| matches!(f, Frame::Rejected { .. })).await;
    assert!(matches!(rejected, Some(Frame::Rejected { code: RejectCode::Malformed, .. })), "{rejected:?}");
    assert_eq!(closed_with(&session).await, Some(1));

    // Well-framed garbage envelopes get a typed rejection each and the connection stays
    // up, until the peer passes the abuse threshold.
    let mut session = RawSession::connect(&alice.identity, net.anchors.clone(), edge.quic_addr()).await.unwrap();
    session.send.write_all(&Frame::Send(vec![1, 2, 3]).encode()).await.unwrap();
    let rejected = read_until(&mut session, |f| matches!(f, Frame::Rejected { .. })).await;
    assert!(matches!(rejected, Some(Frame::Rejected { code: RejectCode::Malformed, .. })), "{rejected:?}");
    session.send.write_all(&Frame::Ping(1).encode()).await.unwrap();
    assert_eq!(read_until(&mut session, |f| matches!(f, Frame::Pong(_))).await, Some(Frame::Pong(1)), "still served");
    let mut garbage = Vec::new();
    for n in 0..10u8 {
        Frame::Send(vec![n; 40]).encode_into(&mut garbage);
    }
    session.send.write_all(&garbage).await.unwrap();
    assert_eq!(closed_with(&session).await, Some(2), "closed as abusive");

    // Unknown frame type and a frame an agent may not send.
    let mut session = RawSession::connect(&alice.identity, net.anchors.clone(), edge.quic_addr()).await.unwrap();
    session.send.write_all(&[0, 0, 0, 1, 99]).await.unwrap();
    assert_eq!(closed_with(&session).await, Some(1));
    let mut session = RawSession::connect(&alice.identity, net.anchors.clone(), edge.quic_addr()).await.unwrap();
    session.send.write_all(&Frame::Deliver(vec![0; 10]).encode()).await.unwrap();
    let rejected = read_until(&mut session, |f| matches!(f, Frame::Rejected { .. })).await;
    assert!(matches!(rejected, Some(Frame::Rejected { code: RejectCode::Malformed, .. })), "{rejected:?}");

    // Through all of it the edge kept serving: a normal exchange works.
    let mut b = net.connect(&bob, edge.quic_addr(), &[&alice]).await.unwrap();
    let a = net.connect(&alice, edge.quic_addr(), &[&bob]).await.unwrap();
    let report = a.send(bob.id(), b"after the storm").await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(10), b.recv()).await.unwrap().unwrap();
    assert_eq!(message.message_id, report.message_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_hold() {
    let net = Network::new().unwrap();
    let edge = net.edge("edge", "[limits]\nconnections_per_agent = 2\n").unwrap().spawn().unwrap();
    let alice = net.agent("alice").unwrap();
    let first = RawSession::connect(&alice.identity, net.anchors.clone(), edge.quic_addr()).await.unwrap();
    let second = RawSession::connect(&alice.identity, net.anchors.clone(), edge.quic_addr()).await.unwrap();
    let third = RawSession::connect(&alice.identity, net.anchors.clone(), edge.quic_addr()).await;
    assert!(third.is_err(), "a third connection for one agent is refused");
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    RawSession::connect(&alice.identity, net.anchors.clone(), edge.quic_addr()).await.expect("a slot was freed");
    drop(second);
}

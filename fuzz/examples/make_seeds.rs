//! Writes the seed inputs under `fuzz/seeds/<target>/`: small valid encodings of what each
//! decoder reads, built from the fixed fixtures so the output is the same on every run.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds` (from the repository root).

use std::fs;
use std::path::{Path, PathBuf};

use molt_protocol::cert::{self, RevocationList, Role};
use molt_protocol::envelope::{self, EnvelopeHeader, Ttl};
use molt_protocol::frame::{Disposition, Frame, RejectCode};
use molt_protocol::keys::KeyBinding;
use molt_protocol::receipt::Receipt;
use molt_protocol::{AgentId, EdgeId, MessageId, UnixMillis};
use molt_protocol_fuzz::{
    NOW, around_now, pki, recipient_key, recipient_secret, sender_id, sender_key, serial, sign_tbs, tbs_of,
};

fn main() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let envelopes = envelopes();
    write(&seeds, "envelope", envelopes.iter().enumerate().map(|(i, e)| (format!("envelope-{i}"), e.clone())));
    write(&seeds, "frame", frames(&envelopes));
    write(&seeds, "receipt", receipts());
    write(&seeds, "key_binding", key_bindings());
    write(&seeds, "certificate", certificates());
    write(&seeds, "revocation_list", revocation_lists());
    write(&seeds, "ids", ids());
}

fn envelopes() -> Vec<Vec<u8>> {
    let recipient = AgentId::from_inception_key(&recipient_key().public_key());
    [0usize, 48, 256]
        .iter()
        .enumerate()
        .map(|(i, &payload_len)| {
            let header = EnvelopeHeader {
                message_id: MessageId::from_bytes([i as u8 + 1; 16]),
                sender: sender_id(),
                recipient,
                timestamp: NOW,
                ttl: Ttl::from_secs(3600).expect("valid ttl"),
            };
            envelope::sign_raw(&header, &vec![0xa5; payload_len], sender_key()).expect("envelope signs")
        })
        .collect()
}

fn frames(envelopes: &[Vec<u8>]) -> Vec<(String, Vec<u8>)> {
    let message_id = MessageId::from_bytes([7; 16]);
    let all = vec![
        Frame::Send(envelopes[1].clone()),
        Frame::Deliver(envelopes[0].clone()),
        Frame::Accepted { message_id, disposition: Disposition::Stored },
        Frame::Rejected { message_id, code: RejectCode::RateLimited, detail: "slow down".to_owned() },
        Frame::Receipt(receipts()[0].1.clone()),
        Frame::GoAway { reconnect_after_ms: 1500, detail: "restarting".to_owned() },
        Frame::Ping(42),
        Frame::Pong(42),
    ];
    let mut seeds: Vec<(String, Vec<u8>)> =
        all.iter().enumerate().map(|(i, frame)| (format!("frame-{i}"), frame.encode())).collect();
    let mut stream = Vec::new();
    for frame in &all {
        frame.encode_into(&mut stream);
    }
    seeds.push(("stream-all".to_owned(), stream));
    seeds
}

fn receipts() -> Vec<(String, Vec<u8>)> {
    let recipient = AgentId::from_inception_key(&sender_key().public_key());
    let receipt =
        Receipt::sign(MessageId::from_bytes([5; 16]), recipient, AgentId::from_bytes([9; 16]), NOW, sender_key())
            .expect("receipt signs");
    vec![("receipt-0".to_owned(), receipt.encode())]
}

fn key_bindings() -> Vec<(String, Vec<u8>)> {
    let binding =
        KeyBinding::sign(sender_id(), recipient_secret().public_key(), NOW, sender_key()).expect("binding signs");
    vec![("binding-0".to_owned(), binding.encode())]
}

fn certificates() -> Vec<(String, Vec<u8>)> {
    let fixtures = pki();
    let agent_key = sender_key().public_key();
    let agent = cert::issue_leaf(
        &fixtures.org,
        &fixtures.org_key,
        &agent_key,
        Role::Agent(sender_id()),
        &[],
        around_now(30),
        serial(3),
    )
    .expect("agent certificate issues");
    let edge_key = recipient_key().public_key();
    let edge_id = EdgeId::from_inception_key(&edge_key);
    let dns_names = ["edge.example".to_owned()];
    let edge = cert::issue_leaf(
        &fixtures.org,
        &fixtures.org_key,
        &edge_key,
        Role::Edge(edge_id),
        &dns_names,
        around_now(30),
        serial(4),
    )
    .expect("edge certificate issues");
    // The targets re-sign TBS inputs with `sign_tbs`; it must rebuild rcgen's output exactly.
    assert_eq!(sign_tbs(tbs_of(agent.der()).expect("tbs"), &fixtures.org_key).as_deref(), Some(agent.der()));
    with_tbs(vec![
        ("root".to_owned(), fixtures.root.der().to_vec()),
        ("org".to_owned(), fixtures.org.der().to_vec()),
        ("agent".to_owned(), agent.der().to_vec()),
        ("edge".to_owned(), edge.der().to_vec()),
    ])
}

fn revocation_lists() -> Vec<(String, Vec<u8>)> {
    let fixtures = pki();
    let next_update = UnixMillis(NOW.0 + 7 * 24 * 3600 * 1000);
    let lists = [("crl-empty", vec![]), ("crl-three", vec![serial(2), serial(3), serial(4)])].map(|(name, revoked)| {
        let list = RevocationList::issue(&fixtures.root, &fixtures.root_key, 7, NOW, next_update, &revoked)
            .expect("crl issues");
        (name.to_owned(), list.der().to_vec())
    });
    assert_eq!(sign_tbs(tbs_of(&lists[1].1).expect("tbs"), &fixtures.root_key).as_ref(), Some(&lists[1].1));
    with_tbs(lists.to_vec())
}

/// Adds the TBS part of each DER seed: the targets sign a lone SEQUENCE themselves.
fn with_tbs(seeds: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    let tbs: Vec<(String, Vec<u8>)> = seeds
        .iter()
        .map(|(name, der)| (format!("{name}-tbs"), tbs_of(der).expect("issued DER has a TBS part").to_vec()))
        .collect();
    seeds.into_iter().chain(tbs).collect()
}

fn ids() -> Vec<(String, Vec<u8>)> {
    let key = sender_key().public_key();
    [
        ("agent", AgentId::from_inception_key(&key).to_string()),
        ("edge", EdgeId::from_inception_key(&key).to_string()),
        ("message", MessageId::from_bytes([0x3c; 16]).to_string()),
    ]
    .into_iter()
    .map(|(name, text)| (name.to_owned(), text.into_bytes()))
    .collect()
}

fn write(seeds: &Path, target: &str, files: impl IntoIterator<Item = (String, Vec<u8>)>) {
    let directory: PathBuf = seeds.join(target);
    fs::create_dir_all(&directory).expect("seed directory is writable");
    for (name, bytes) in files {
        fs::write(directory.join(name), bytes).expect("seed file is writable");
    }
}

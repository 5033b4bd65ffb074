//! Cost of the per-message cryptography and codecs on the relay and client hot paths:
//! Ed25519 signing and verification (single and batched), envelope sealing, opening and
//! decoding, and the frame codec.
//!
//! "256B" and "1KiB" are plaintext sizes; a sealed payload adds the HPKE overhead
//! (encapsulated key and tag). Run with `cargo bench -p molt-protocol --bench crypto`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use molt_protocol::envelope::{self, EnvelopeHeader, EnvelopeView, Ttl};
use molt_protocol::frame::{Frame, FrameReader};
use molt_protocol::keys::{self, EncryptionSecret, PublicKey, Signature};
use molt_protocol::{AgentId, MessageId, SigningKey, UnixMillis};
use rand::SeedableRng;
use rand::rngs::StdRng;

const BATCH: usize = 256;

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = ed25519, envelopes, frames
}
criterion_main!(benches);

fn ed25519(c: &mut Criterion) {
    let fixture = Fixture::new();
    let sealed = fixture.seal(256);
    let view = EnvelopeView::decode(&sealed).expect("sealed envelope decodes");
    let sender_key = fixture.sender.public_key();
    let batch = Batch::new();
    let messages = batch.messages();

    let mut group = c.benchmark_group("ed25519");
    group.throughput(Throughput::Elements(1));
    group.bench_function("verify_single", |b| {
        b.iter(|| sender_key.verify(black_box(view.signed_bytes()), black_box(&view.signature)))
    });
    group.bench_function("sign", |b| b.iter(|| fixture.sender.sign(black_box(view.signed_bytes()))));
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("verify_batch_256", |b| {
        b.iter(|| {
            let valid = keys::verify_batch(black_box(&messages), &batch.signatures, &batch.keys);
            assert!(valid, "the batch holds only valid signatures");
        })
    });
    group.finish();
}

fn envelopes(c: &mut Criterion) {
    let fixture = Fixture::new();
    let mut rng = StdRng::seed_from_u64(7);
    let sealed = fixture.seal(256);
    let view = EnvelopeView::decode(&sealed).expect("sealed envelope decodes");
    let sender_key = fixture.sender.public_key();

    let mut group = c.benchmark_group("envelope");
    for (name, plaintext_len) in [("seal_256B", 256), ("seal_1KiB", 1024)] {
        let plaintext = vec![0x42; plaintext_len];
        group.throughput(Throughput::Bytes(plaintext_len as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                envelope::seal(
                    &fixture.header,
                    &fixture.recipient_public(),
                    black_box(&plaintext),
                    &fixture.sender,
                    &mut rng,
                )
            })
        });
    }
    group.throughput(Throughput::Bytes(256));
    group.bench_function("open_256B", |b| {
        b.iter(|| black_box(&view).open(&sender_key, &fixture.recipient_secret).expect("sealed envelope opens"))
    });
    group
        .bench_function("decode_256B", |b| b.iter(|| EnvelopeView::decode(black_box(&sealed)).map(|view| view.header)));
    group.finish();
}

fn frames(c: &mut Criterion) {
    let fixture = Fixture::new();
    let frame = Frame::Send(fixture.seal(256));
    let mut wire = Vec::with_capacity(1024);
    let mut reader = FrameReader::new();

    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_decode_256B", |b| {
        b.iter(|| {
            wire.clear();
            black_box(&frame).encode_into(&mut wire);
            reader.extend(black_box(&wire));
            reader.next_frame().expect("frame decodes").expect("frame is complete")
        })
    });
    group.finish();
}

struct Fixture {
    sender: SigningKey,
    recipient_secret: EncryptionSecret,
    header: EnvelopeHeader,
}

impl Fixture {
    fn new() -> Fixture {
        let sender = SigningKey::from_bytes(&[1; 32]);
        let recipient = SigningKey::from_bytes(&[2; 32]);
        let header = EnvelopeHeader {
            message_id: MessageId::from_bytes([9; 16]),
            sender: AgentId::from_inception_key(&sender.public_key()),
            recipient: AgentId::from_inception_key(&recipient.public_key()),
            timestamp: UnixMillis(1_750_000_000_000),
            ttl: Ttl::from_secs(3600).expect("one hour is a valid ttl"),
        };
        Fixture { sender, recipient_secret: EncryptionSecret::from_bytes([3; 32]), header }
    }

    fn recipient_public(&self) -> keys::EncryptionPublicKey {
        self.recipient_secret.public_key()
    }

    fn seal(&self, plaintext_len: usize) -> Vec<u8> {
        let plaintext = vec![0x42; plaintext_len];
        let mut rng = StdRng::seed_from_u64(1);
        envelope::seal(&self.header, &self.recipient_public(), &plaintext, &self.sender, &mut rng)
            .expect("fixture envelope seals")
    }
}

/// 256 envelopes (256-byte payloads) from 256 different senders, as a relay sees them.
struct Batch {
    envelopes: Vec<Vec<u8>>,
    signatures: Vec<Signature>,
    keys: Vec<PublicKey>,
}

impl Batch {
    fn new() -> Batch {
        let fixture = Fixture::new();
        let mut batch = Batch { envelopes: Vec::new(), signatures: Vec::new(), keys: Vec::new() };
        for index in 0..BATCH {
            let sender = SigningKey::from_bytes(&[index as u8; 32]);
            let header = EnvelopeHeader {
                message_id: MessageId::from_bytes([index as u8; 16]),
                sender: AgentId::from_inception_key(&sender.public_key()),
                ..fixture.header
            };
            let bytes = envelope::sign_raw(&header, &[0x42; 256], &sender).expect("envelope signs");
            let signature = EnvelopeView::decode(&bytes).expect("signed envelope decodes").signature;
            batch.envelopes.push(bytes);
            batch.signatures.push(signature);
            batch.keys.push(sender.public_key());
        }
        batch
    }

    fn messages(&self) -> Vec<&[u8]> {
        self.envelopes
            .iter()
            .map(|bytes| EnvelopeView::decode(bytes).expect("signed envelope decodes").signed_bytes())
            .collect()
    }
}

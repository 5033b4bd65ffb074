//! This machine's Ed25519 costs, measured in-process on one core: the reference that the
//! edge's CPU per message is compared with. Run in the same process (and so under the same
//! load and frequency) as the relay figures it is the yardstick for.

use std::hint::black_box;
use std::time::{Duration, Instant};

use molt_protocol::keys::{self, PublicKey, Signature, SigningKey};

use crate::report::{Section, thousands, thread_cpu_time};

/// Single verifications timed.
pub const SINGLE_VERIFICATIONS: usize = 20_480;
/// Signatures per batch, as in the brief's reference figure.
pub const BATCH_SIZE: usize = 256;
/// Batches timed.
pub const BATCHES: usize = 80;
/// Smaller batches timed too: what the edge gets when it verifies per QUIC packet
/// (about 3 envelopes of 256 B) rather than per read of many packets.
pub const SMALL_BATCHES: [usize; 3] = [4, 16, 64];
/// Signatures timed.
pub const SIGNATURES: usize = 4_096;
/// Bytes signed per message: a 256-byte-payload envelope's signed part.
const MESSAGE_BYTES: usize = 322;

/// Microseconds per operation on this machine, in this thread's CPU time (so that other
/// processes competing for the cores do not inflate it; wall-clock figures are kept too).
#[derive(Clone, Copy, Debug)]
pub struct CryptoReference {
    /// One strict `PublicKey::verify`.
    pub verify_us: f64,
    /// `keys::verify_batch` of [`BATCH_SIZE`], per signature.
    pub batch_us: f64,
    /// One signature (what pre-signing costs the bench).
    pub sign_us: f64,
    /// `keys::verify_batch` per signature for small batches, as (batch size, µs).
    pub small_batches_us: [(usize, f64); 3],
    /// The same three by the wall clock.
    pub wall_us: [f64; 3],
    /// False where the kernel gives no per-thread CPU time and the wall clock was used.
    pub cpu_timed: bool,
}

impl CryptoReference {
    /// What the edge must verify per relayed message: the envelope (batched on the read
    /// path) and the recipient's receipt (verified one by one).
    pub fn relay_floor_us(&self) -> f64 {
        self.batch_us + self.verify_us
    }
}

pub fn measure() -> CryptoReference {
    let key = SigningKey::from_bytes(&[7; 32]);
    let public = key.public_key();
    let messages: Vec<Vec<u8>> =
        (0..BATCH_SIZE).map(|i| (0..MESSAGE_BYTES).map(|j| (i * 31 + j * 7) as u8).collect()).collect();
    let signatures: Vec<Signature> = messages.iter().map(|m| key.sign(m)).collect();

    // Warm caches and the CPU's clock before timing.
    for (message, signature) in messages.iter().zip(&signatures).cycle().take(1_000) {
        assert!(public.verify(message, signature).is_ok(), "reference signature verifies");
    }
    let verify = timed(SINGLE_VERIFICATIONS, || {
        for (message, signature) in messages.iter().zip(&signatures).cycle().take(SINGLE_VERIFICATIONS) {
            black_box(public.verify(black_box(message), black_box(signature)).is_ok());
        }
    });

    let pick = |(wall, cpu): (f64, Option<f64>)| cpu.unwrap_or(wall);
    let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    let publics: Vec<PublicKey> = vec![public; BATCH_SIZE];
    assert!(keys::verify_batch(&refs, &signatures, &publics), "reference batch verifies");
    let batch = timed(BATCHES * BATCH_SIZE, || {
        for _ in 0..BATCHES {
            black_box(keys::verify_batch(black_box(&refs), black_box(&signatures), black_box(&publics)));
        }
    });

    let small_batches_us = SMALL_BATCHES.map(|size| {
        let batches = BATCHES * BATCH_SIZE / size;
        let measured = timed(batches * size, || {
            for chunk in 0..batches {
                let range = (chunk * size) % BATCH_SIZE..(chunk * size) % BATCH_SIZE + size;
                let (refs, signatures, publics) = (&refs[range.clone()], &signatures[range.clone()], &publics[range]);
                black_box(keys::verify_batch(black_box(refs), black_box(signatures), black_box(publics)));
            }
        });
        (size, pick(measured))
    });

    let sign = timed(SIGNATURES, || {
        for message in messages.iter().cycle().take(SIGNATURES) {
            black_box(key.sign(black_box(message)));
        }
    });
    let cpu_timed = verify.1.is_some() && batch.1.is_some() && sign.1.is_some();
    CryptoReference {
        verify_us: pick(verify),
        batch_us: pick(batch),
        sign_us: pick(sign),
        small_batches_us,
        wall_us: [verify.0, batch.0, sign.0],
        cpu_timed,
    }
}

/// Runs `work` (`operations` of something) and returns µs per operation by the wall clock
/// and, where available, by this thread's CPU time.
fn timed(operations: usize, work: impl FnOnce()) -> (f64, Option<f64>) {
    let cpu_before = thread_cpu_time();
    let started = Instant::now();
    work();
    let wall = started.elapsed();
    let cpu = cpu_before.zip(thread_cpu_time()).map(|(before, after)| after.saturating_sub(before));
    let per = |total: Duration| total.as_secs_f64() * 1e6 / operations as f64;
    (per(wall), cpu.map(per))
}

pub fn section(reference: &CryptoReference) -> Section {
    let mut section = Section::new("crypto: Ed25519 on this machine (one core, in-process)");
    section.note(format!(
        "{} single verifications, {} batches of {} (one key, {MESSAGE_BYTES}-byte messages), {} signatures",
        thousands(SINGLE_VERIFICATIONS as f64),
        BATCHES,
        BATCH_SIZE,
        thousands(SIGNATURES as f64)
    ));
    section.note(if reference.cpu_timed {
        format!(
            "per-thread CPU time (wall clock: verify {:.1}, batch {:.1}, sign {:.1} µs)",
            reference.wall_us[0], reference.wall_us[1], reference.wall_us[2]
        )
    } else {
        "wall clock (no per-thread CPU time on this kernel)".to_string()
    });
    section.info("single verify (strict)", format!("{:.1} µs/op", reference.verify_us));
    section.info(format!("batch verify ({BATCH_SIZE}/batch)"), format!("{:.1} µs/signature", reference.batch_us));
    for (size, micros) in reference.small_batches_us {
        section.info(format!("batch verify ({size}/batch)"), format!("{micros:.1} µs/signature"));
    }
    section.info("sign", format!("{:.1} µs/op", reference.sign_us));
    section.info("single verifications/s, one core", thousands(1e6 / reference.verify_us));
    section.info("batched verifications/s, one core", thousands(1e6 / reference.batch_us));
    section.info(
        "edge crypto floor per relayed message (batched envelope + single receipt)",
        format!(
            "{:.1} µs = {:.2}× single",
            reference.relay_floor_us(),
            reference.relay_floor_us() / reference.verify_us
        ),
    );
    section
}

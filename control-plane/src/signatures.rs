//! The Ed25519 signatures of concurrent agent requests, verified together.
//!
//! A signed request hands its key, signed bytes and signature to one verifier task
//! ([`SignatureVerifier::verify`]). The task takes what is queued ([`crate::batch::collect`],
//! at most [`VERIFY_BATCH_MAX`]) and checks it with one batch verification
//! ([`molt_protocol::keys::verify_each`]), which costs a fraction of a verify per
//! signature; only when the batch fails does it check each strictly, to find the bad ones.
//! A request alone in the queue is checked strictly, as before.
//!
//! Batch verification (random coefficients, as at the edge) can accept a signature the
//! strict check refuses only where the difference is a small-order component, which only
//! the key's holder can put into a signature; a key of small order, which would let anyone
//! do so, is refused when parsed ([`molt_protocol::keys::PublicKey::from_bytes`]).

use std::sync::{Arc, OnceLock};

use molt_protocol::keys::{PublicKey, Signature, verify_each};
use tokio::sync::{mpsc, oneshot};

use crate::batch;

/// Signatures waiting for the verifier at most; callers beyond wait for room.
pub const VERIFY_QUEUE_DEPTH: usize = 4096;
/// Signatures one batch verification checks at most (about 1 ms of one core).
pub const VERIFY_BATCH_MAX: usize = 64;

/// The verifier task is gone (the runtime is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the signature verifier stopped")]
pub struct VerifierStopped;

#[derive(Debug)]
struct Job {
    key: PublicKey,
    message: Arc<str>,
    signature: Signature,
    reply: oneshot::Sender<bool>,
}

/// Verifies concurrent requests' signatures in batches; one per `AppState`. Its task
/// starts with the first signature and stops when the verifier is dropped.
#[derive(Debug, Default)]
pub struct SignatureVerifier {
    queue: OnceLock<mpsc::Sender<Job>>,
}

impl SignatureVerifier {
    pub fn new() -> SignatureVerifier {
        SignatureVerifier::default()
    }

    /// Whether `signature` is `key`'s over `message`.
    pub async fn verify(
        &self,
        key: &PublicKey,
        message: &Arc<str>,
        signature: &Signature,
    ) -> Result<bool, VerifierStopped> {
        let queue = self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(VERIFY_QUEUE_DEPTH);
            tokio::spawn(run_verifier(receiver));
            sender
        });
        let (reply, answer) = oneshot::channel();
        let job = Job { key: *key, message: Arc::clone(message), signature: *signature, reply };
        queue.send(job).await.map_err(|_| VerifierStopped)?;
        answer.await.map_err(|_| VerifierStopped)
    }
}

async fn run_verifier(mut receiver: mpsc::Receiver<Job>) {
    while let Some(jobs) = batch::collect(&mut receiver, VERIFY_BATCH_MAX, |_| 1).await {
        let valid = check(&jobs);
        for (job, valid) in jobs.into_iter().zip(valid) {
            let _ = job.reply.send(valid);
        }
    }
}

/// Each job's verdict: all true if the batch verifies, else each checked strictly.
fn check(jobs: &[Job]) -> Vec<bool> {
    let messages: Vec<&[u8]> = jobs.iter().map(|job| job.message.as_bytes()).collect();
    let signatures: Vec<Signature> = jobs.iter().map(|job| job.signature).collect();
    let keys: Vec<PublicKey> = jobs.iter().map(|job| job.key).collect();
    verify_each(&messages, &signatures, &keys)
}

#[cfg(test)]
mod tests {
    use molt_protocol::keys::SigningKey;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn good_signatures_pass_and_bad_ones_fail_in_one_batch() {
        let verifier = Arc::new(SignatureVerifier::new());
        let mut tasks = tokio::task::JoinSet::new();
        // More than one batch holds, a quarter of them bad in different ways.
        for i in 0..(VERIFY_BATCH_MAX * 3) {
            let verifier = Arc::clone(&verifier);
            tasks.spawn(async move {
                let key = SigningKey::generate(&mut rand::rngs::OsRng);
                let message: Arc<str> = format!("request {i}").into();
                let signature = key.sign(message.as_bytes());
                let (checked_key, checked_message, good) = match i % 8 {
                    // Another key's signature.
                    1 => (SigningKey::generate(&mut rand::rngs::OsRng).public_key(), Arc::clone(&message), false),
                    // The signature of another message.
                    3 => (key.public_key(), Arc::from(format!("request {}", i + 1)), false),
                    _ => (key.public_key(), Arc::clone(&message), true),
                };
                let valid = verifier.verify(&checked_key, &checked_message, &signature).await.unwrap();
                (i, valid, good)
            });
        }
        let results = tasks.join_all().await;
        assert_eq!(results.len(), VERIFY_BATCH_MAX * 3);
        for (i, valid, good) in results {
            assert_eq!(valid, good, "request {i}");
        }
    }

    #[test]
    fn a_batch_with_a_tampered_signature_is_checked_one_by_one() {
        let jobs: Vec<Job> = (0..4)
            .map(|i| {
                let key = SigningKey::generate(&mut rand::rngs::OsRng);
                let message: Arc<str> = format!("m{i}").into();
                let mut signature = key.sign(message.as_bytes());
                if i == 2 {
                    signature.0[0] ^= 1;
                }
                Job { key: key.public_key(), message, signature, reply: oneshot::channel().0 }
            })
            .collect();
        assert_eq!(check(&jobs), [true, true, false, true]);
        assert_eq!(check(&jobs[..1]), [true]);
        assert_eq!(check(&jobs[2..3]), [false]);
    }
}

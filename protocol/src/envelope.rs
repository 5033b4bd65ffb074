//! The envelope: what one agent sends another, end-to-end encrypted and signed.
//!
//! Wire layout (big-endian), version 1:
//!
//! ```text
//! version u8 = 1 | kind u8 = 1 | message id [16] | sender [16] | recipient [16]
//! timestamp ms u64 | ttl s u32 | payload length u32 | payload | signature [64]
//! ```
//!
//! The signature covers every byte before it, exactly as sent: verification never
//! re-encodes. The payload is an HPKE ciphertext for the recipient whose associated data
//! is the header (everything before the payload length), so header and payload cannot be
//! recombined. The `kind` byte separates envelopes from receipts signed by the same key.

use std::time::Duration;

use rand_core::{CryptoRng, RngCore};

use crate::e2e::{self, E2eError};
use crate::ids::{AgentId, MessageId};
use crate::keys::{
    EncryptionPublicKey, EncryptionSecret, KeyError, PublicKey, SIGNATURE_LEN, SignError, Signature, Signer,
};
use crate::limits::{ENVELOPE_OVERHEAD_BYTES, MAX_ENVELOPE_BYTES, MAX_PAYLOAD_BYTES, MAX_TTL};
use crate::time::UnixMillis;
use crate::wire::{Reader, WireError, Writer};

pub const ENVELOPE_VERSION: u8 = 1;
pub(crate) const KIND_ENVELOPE: u8 = 1;
/// Header bytes: version, kind, message id, sender, recipient, timestamp, ttl.
pub const HEADER_LEN: usize = 1 + 1 + 16 + 16 + 16 + 8 + 4;
/// Largest plaintext that fits once sealed.
pub const MAX_PLAINTEXT_BYTES: usize = MAX_PAYLOAD_BYTES - e2e::SEAL_OVERHEAD;

const _: () = assert!(HEADER_LEN + 4 + SIGNATURE_LEN == ENVELOPE_OVERHEAD_BYTES);

/// Time-to-live in whole seconds, at most [`MAX_TTL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ttl(u32);

impl Ttl {
    pub const MAX: Ttl = Ttl(MAX_TTL.as_secs() as u32);

    pub fn from_secs(secs: u32) -> Result<Ttl, EnvelopeError> {
        if secs == 0 || secs > Ttl::MAX.0 {
            return Err(EnvelopeError::BadTtl { secs });
        }
        Ok(Ttl(secs))
    }

    pub fn as_secs(self) -> u32 {
        self.0
    }

    pub fn as_duration(self) -> Duration {
        Duration::from_secs(u64::from(self.0))
    }
}

/// Why an envelope could not be built, decoded or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    #[error("envelope is {length} bytes, over the {MAX_ENVELOPE_BYTES}-byte limit")]
    TooLarge { length: usize },
    #[error("malformed envelope: {0}")]
    Malformed(#[from] WireError),
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u8),
    #[error("not an envelope (kind {0})")]
    WrongKind(u8),
    #[error("ttl of {secs} s is outside 1..={} s", Ttl::MAX.0)]
    BadTtl { secs: u32 },
    #[error("plaintext of {length} bytes exceeds {MAX_PLAINTEXT_BYTES}")]
    PlaintextTooLarge { length: usize },
    #[error("signature does not verify")]
    BadSignature,
    #[error("sealing failed: {0}")]
    Seal(#[from] E2eError),
    #[error("signing failed: {0}")]
    Sign(String),
}

impl From<SignError> for EnvelopeError {
    fn from(error: SignError) -> EnvelopeError {
        EnvelopeError::Sign(error.0)
    }
}

impl From<KeyError> for EnvelopeError {
    fn from(_: KeyError) -> EnvelopeError {
        EnvelopeError::BadSignature
    }
}

/// The routing header every relay reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnvelopeHeader {
    pub message_id: MessageId,
    pub sender: AgentId,
    pub recipient: AgentId,
    pub timestamp: UnixMillis,
    pub ttl: Ttl,
}

impl EnvelopeHeader {
    /// When relays may drop the message.
    pub fn expires_at(&self) -> UnixMillis {
        self.timestamp.saturating_add(self.ttl.as_duration())
    }

    fn encode_into(&self, writer: &mut Writer) {
        writer.u8(ENVELOPE_VERSION);
        writer.u8(KIND_ENVELOPE);
        writer.bytes(self.message_id.as_bytes());
        writer.bytes(self.sender.as_bytes());
        writer.bytes(self.recipient.as_bytes());
        writer.u64(self.timestamp.0);
        writer.u32(self.ttl.0);
    }
}

/// A decoded envelope borrowing the received bytes. Decoding checks structure and limits
/// only; [`EnvelopeView::verify`] checks the signature.
#[derive(Clone, Copy, Debug)]
pub struct EnvelopeView<'a> {
    pub header: EnvelopeHeader,
    pub payload: &'a [u8],
    pub signature: Signature,
    header_bytes: &'a [u8],
    signed_bytes: &'a [u8],
}

impl<'a> EnvelopeView<'a> {
    pub fn decode(bytes: &'a [u8]) -> Result<EnvelopeView<'a>, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge { length: bytes.len() });
        }
        let mut reader = Reader::new(bytes);
        let version = reader.u8()?;
        if version != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(version));
        }
        let kind = reader.u8()?;
        if kind != KIND_ENVELOPE {
            return Err(EnvelopeError::WrongKind(kind));
        }
        let message_id = MessageId::from_bytes(reader.array()?);
        let sender = AgentId::from_bytes(reader.array()?);
        let recipient = AgentId::from_bytes(reader.array()?);
        let timestamp = UnixMillis(reader.u64()?);
        let ttl = Ttl::from_secs(reader.u32()?)?;
        let header_end = reader.offset();
        let payload = reader.bytes_u32(MAX_PAYLOAD_BYTES)?;
        let signed_end = reader.offset();
        let signature = Signature(reader.array()?);
        reader.finish()?;
        Ok(EnvelopeView {
            header: EnvelopeHeader { message_id, sender, recipient, timestamp, ttl },
            payload,
            signature,
            header_bytes: &bytes[..header_end],
            signed_bytes: &bytes[..signed_end],
        })
    }

    /// The exact bytes the signature covers.
    pub fn signed_bytes(&self) -> &'a [u8] {
        self.signed_bytes
    }

    pub fn verify(&self, sender_key: &PublicKey) -> Result<(), EnvelopeError> {
        sender_key.verify(self.signed_bytes, &self.signature).map_err(|_| EnvelopeError::BadSignature)
    }

    /// Verifies the sender's signature, then decrypts the payload.
    pub fn open(&self, sender_key: &PublicKey, recipient_secret: &EncryptionSecret) -> Result<Vec<u8>, EnvelopeError> {
        self.verify(sender_key)?;
        Ok(e2e::open(recipient_secret, self.header_bytes, self.payload)?)
    }
}

/// Encrypts `plaintext` for the recipient and signs the result as `sender`.
pub fn seal<R: RngCore + CryptoRng>(
    header: &EnvelopeHeader,
    recipient_key: &EncryptionPublicKey,
    plaintext: &[u8],
    signer: &dyn Signer,
    rng: &mut R,
) -> Result<Vec<u8>, EnvelopeError> {
    if plaintext.len() > MAX_PLAINTEXT_BYTES {
        return Err(EnvelopeError::PlaintextTooLarge { length: plaintext.len() });
    }
    let mut writer = Writer::with_capacity(ENVELOPE_OVERHEAD_BYTES + plaintext.len() + e2e::SEAL_OVERHEAD);
    header.encode_into(&mut writer);
    let sealed = {
        let header_bytes = writer.as_slice();
        e2e::seal(recipient_key, header_bytes, plaintext, rng)?
    };
    writer.bytes_u32(&sealed);
    let signature = signer.try_sign(writer.as_slice())?;
    writer.bytes(&signature.0);
    Ok(writer.into_vec())
}

/// Signs an envelope whose payload is already prepared (tests and benchmarks use it to
/// build envelopes without encryption cost; relays cannot tell the difference).
pub fn sign_raw(header: &EnvelopeHeader, payload: &[u8], signer: &dyn Signer) -> Result<Vec<u8>, EnvelopeError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(EnvelopeError::TooLarge { length: payload.len() + ENVELOPE_OVERHEAD_BYTES });
    }
    let mut writer = Writer::with_capacity(ENVELOPE_OVERHEAD_BYTES + payload.len());
    header.encode_into(&mut writer);
    writer.bytes_u32(payload);
    let signature = signer.try_sign(writer.as_slice())?;
    writer.bytes(&signature.0);
    Ok(writer.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;
    use proptest::prelude::*;

    struct Fixture {
        alice: SigningKey,
        alice_id: AgentId,
        bob_id: AgentId,
        bob_secret: EncryptionSecret,
    }

    fn fixture() -> Fixture {
        let alice = SigningKey::from_bytes(&[1; 32]);
        let bob = SigningKey::from_bytes(&[2; 32]);
        Fixture {
            alice_id: AgentId::from_inception_key(&alice.public_key()),
            bob_id: AgentId::from_inception_key(&bob.public_key()),
            alice,
            bob_secret: EncryptionSecret::from_bytes([3; 32]),
        }
    }

    fn header(f: &Fixture) -> EnvelopeHeader {
        EnvelopeHeader {
            message_id: MessageId::from_bytes([9; 16]),
            sender: f.alice_id,
            recipient: f.bob_id,
            timestamp: UnixMillis(1_700_000_000_000),
            ttl: Ttl::from_secs(3600).unwrap(),
        }
    }

    #[test]
    fn seal_decode_open() {
        let f = fixture();
        let bytes = seal(&header(&f), &f.bob_secret.public_key(), b"hi bob", &f.alice, &mut rand::rngs::OsRng).unwrap();
        let view = EnvelopeView::decode(&bytes).unwrap();
        assert_eq!(view.header, header(&f));
        assert_eq!(view.open(&f.alice.public_key(), &f.bob_secret).unwrap(), b"hi bob");
        assert_eq!(view.header.expires_at(), UnixMillis(1_700_000_000_000 + 3_600_000));
    }

    #[test]
    fn forged_and_altered_envelopes_fail() {
        let f = fixture();
        let bytes = seal(&header(&f), &f.bob_secret.public_key(), b"hi bob", &f.alice, &mut rand::rngs::OsRng).unwrap();
        // Signed by someone else.
        let mallory = SigningKey::from_bytes(&[7; 32]);
        let forged =
            seal(&header(&f), &f.bob_secret.public_key(), b"hi bob", &mallory, &mut rand::rngs::OsRng).unwrap();
        assert_eq!(
            EnvelopeView::decode(&forged).unwrap().verify(&f.alice.public_key()),
            Err(EnvelopeError::BadSignature)
        );
        // Any flipped byte before the signature breaks it.
        for index in [0usize, 20, 40, 60, HEADER_LEN + 4, bytes.len() - 65] {
            let mut altered = bytes.clone();
            altered[index] ^= 0x01;
            let verdict = EnvelopeView::decode(&altered).and_then(|v| v.verify(&f.alice.public_key()));
            assert!(verdict.is_err(), "flip at {index} accepted");
        }
    }

    #[test]
    fn malformed_envelopes_get_typed_errors() {
        let f = fixture();
        let bytes = sign_raw(&header(&f), &[0; 100], &f.alice).unwrap();
        assert!(matches!(
            EnvelopeView::decode(&bytes[..10]),
            Err(EnvelopeError::Malformed(WireError::Truncated { .. }))
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(EnvelopeView::decode(&long), Err(EnvelopeError::Malformed(WireError::TrailingBytes { .. }))));
        let mut version = bytes.clone();
        version[0] = 9;
        assert_eq!(EnvelopeView::decode(&version).unwrap_err(), EnvelopeError::UnsupportedVersion(9));
        let mut kind = bytes.clone();
        kind[1] = 2;
        assert_eq!(EnvelopeView::decode(&kind).unwrap_err(), EnvelopeError::WrongKind(2));
        let mut ttl = bytes.clone();
        ttl[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(EnvelopeView::decode(&ttl).unwrap_err(), EnvelopeError::BadTtl { secs: 0 });
        let mut huge_length = bytes.clone();
        huge_length[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(EnvelopeView::decode(&huge_length), Err(EnvelopeError::Malformed(WireError::TooLong { .. }))));
        let oversize = vec![0u8; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(EnvelopeView::decode(&oversize), Err(EnvelopeError::TooLarge { .. })));
        assert!(sign_raw(&header(&f), &vec![0; MAX_PAYLOAD_BYTES + 1], &f.alice).is_err());
        assert!(matches!(
            seal(
                &header(&f),
                &f.bob_secret.public_key(),
                &vec![0; MAX_PLAINTEXT_BYTES + 1],
                &f.alice,
                &mut rand::rngs::OsRng
            ),
            Err(EnvelopeError::PlaintextTooLarge { .. })
        ));
    }

    #[test]
    fn largest_envelope_fits() {
        let f = fixture();
        let bytes = seal(
            &header(&f),
            &f.bob_secret.public_key(),
            &vec![7; MAX_PLAINTEXT_BYTES],
            &f.alice,
            &mut rand::rngs::OsRng,
        )
        .unwrap();
        assert_eq!(bytes.len(), MAX_ENVELOPE_BYTES);
        assert_eq!(
            EnvelopeView::decode(&bytes).unwrap().open(&f.alice.public_key(), &f.bob_secret).unwrap().len(),
            MAX_PLAINTEXT_BYTES
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = EnvelopeView::decode(&bytes);
        }

        #[test]
        fn sign_raw_round_trips(id in any::<[u8; 16]>(), ts in any::<u64>(), ttl in 1u32..=Ttl::MAX.as_secs(), payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let f = fixture();
            let header = EnvelopeHeader { message_id: MessageId::from_bytes(id), sender: f.alice_id, recipient: f.bob_id, timestamp: UnixMillis(ts), ttl: Ttl::from_secs(ttl).unwrap() };
            let bytes = sign_raw(&header, &payload, &f.alice).unwrap();
            let view = EnvelopeView::decode(&bytes).unwrap();
            prop_assert_eq!(view.header, header);
            prop_assert_eq!(view.payload, &payload[..]);
            prop_assert!(view.verify(&f.alice.public_key()).is_ok());
        }
    }
}

//! Delivery receipts: the recipient's signed statement that it received a message.
//!
//! Wire layout: `version u8 = 1 | kind u8 = 2 | message id [16] | recipient [16] |
//! original sender [16] | received at ms u64 | signature [64]`, the signature (by the
//! recipient) covering every byte before it. The edge checks that the recipient is the
//! authenticated peer, deletes the buffered copy, and routes the receipt to the sender.

use crate::envelope::ENVELOPE_VERSION;
use crate::ids::{AgentId, MessageId};
use crate::keys::{PublicKey, SIGNATURE_LEN, SignError, Signature, Signer};
use crate::time::UnixMillis;
use crate::wire::{Reader, WireError, Writer};

pub(crate) const KIND_RECEIPT: u8 = 2;
pub const RECEIPT_LEN: usize = 1 + 1 + 16 + 16 + 16 + 8 + SIGNATURE_LEN;

/// Why a receipt was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiptError {
    #[error("malformed receipt: {0}")]
    Malformed(#[from] WireError),
    #[error("unsupported receipt version {0}")]
    UnsupportedVersion(u8),
    #[error("not a receipt (kind {0})")]
    WrongKind(u8),
    #[error("receipt signature does not verify")]
    BadSignature,
    #[error("signing failed: {0}")]
    Sign(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub message_id: MessageId,
    /// Who received the message and signed this receipt.
    pub recipient: AgentId,
    /// Who sent the message; the receipt is routed to it.
    pub sender: AgentId,
    pub received_at: UnixMillis,
    pub signature: Signature,
}

impl Receipt {
    pub fn sign(
        message_id: MessageId,
        recipient: AgentId,
        sender: AgentId,
        received_at: UnixMillis,
        signer: &dyn Signer,
    ) -> Result<Receipt, ReceiptError> {
        let unsigned = encode_unsigned(message_id, recipient, sender, received_at);
        let signature = signer.try_sign(&unsigned).map_err(|SignError(e)| ReceiptError::Sign(e))?;
        Ok(Receipt { message_id, recipient, sender, received_at, signature })
    }

    pub fn verify(&self, recipient_key: &PublicKey) -> Result<(), ReceiptError> {
        let unsigned = encode_unsigned(self.message_id, self.recipient, self.sender, self.received_at);
        recipient_key.verify(&unsigned, &self.signature).map_err(|_| ReceiptError::BadSignature)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = encode_unsigned(self.message_id, self.recipient, self.sender, self.received_at);
        bytes.extend_from_slice(&self.signature.0);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Receipt, ReceiptError> {
        let mut reader = Reader::new(bytes);
        let version = reader.u8()?;
        if version != ENVELOPE_VERSION {
            return Err(ReceiptError::UnsupportedVersion(version));
        }
        let kind = reader.u8()?;
        if kind != KIND_RECEIPT {
            return Err(ReceiptError::WrongKind(kind));
        }
        let message_id = MessageId::from_bytes(reader.array()?);
        let recipient = AgentId::from_bytes(reader.array()?);
        let sender = AgentId::from_bytes(reader.array()?);
        let received_at = UnixMillis(reader.u64()?);
        let signature = Signature(reader.array()?);
        reader.finish()?;
        Ok(Receipt { message_id, recipient, sender, received_at, signature })
    }
}

fn encode_unsigned(message_id: MessageId, recipient: AgentId, sender: AgentId, received_at: UnixMillis) -> Vec<u8> {
    let mut writer = Writer::with_capacity(RECEIPT_LEN);
    writer.u8(ENVELOPE_VERSION);
    writer.u8(KIND_RECEIPT);
    writer.bytes(message_id.as_bytes());
    writer.bytes(recipient.as_bytes());
    writer.bytes(sender.as_bytes());
    writer.u64(received_at.0);
    writer.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;
    use proptest::prelude::*;

    #[test]
    fn receipt_round_trips_and_verifies() {
        let bob = SigningKey::from_bytes(&[2; 32]);
        let bob_id = AgentId::from_inception_key(&bob.public_key());
        let alice_id = AgentId::from_bytes([1; 16]);
        let receipt = Receipt::sign(MessageId::from_bytes([5; 16]), bob_id, alice_id, UnixMillis(42), &bob).unwrap();
        let bytes = receipt.encode();
        assert_eq!(bytes.len(), RECEIPT_LEN);
        let decoded = Receipt::decode(&bytes).unwrap();
        assert_eq!(decoded, receipt);
        decoded.verify(&bob.public_key()).unwrap();
        let mallory = SigningKey::from_bytes(&[6; 32]);
        assert_eq!(decoded.verify(&mallory.public_key()), Err(ReceiptError::BadSignature));
        let mut altered = bytes.clone();
        altered[5] ^= 1;
        assert_eq!(Receipt::decode(&altered).unwrap().verify(&bob.public_key()), Err(ReceiptError::BadSignature));
        assert!(Receipt::decode(&bytes[..RECEIPT_LEN - 1]).is_err());
        let mut kind = bytes.clone();
        kind[1] = 1;
        assert_eq!(Receipt::decode(&kind), Err(ReceiptError::WrongKind(1)));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Receipt::decode(&bytes);
        }
    }
}

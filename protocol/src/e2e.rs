//! End-to-end encryption of payloads with HPKE (RFC 9180), base mode, single shot:
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305.
//!
//! A sealed payload is the 32-byte encapsulated key followed by the AEAD ciphertext. The
//! caller passes the envelope header as associated data, so a ciphertext cannot be moved
//! under another header.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use rand_core::{CryptoRng, RngCore};

use crate::keys::{EncryptionPublicKey, EncryptionSecret};

/// HPKE `info` string: binds every ciphertext to this protocol and version.
pub const HPKE_INFO: &[u8] = b"molt/e2e/v1";
/// Size of the encapsulated key at the start of a sealed payload.
pub const ENCAPSULATED_KEY_LEN: usize = 32;
/// Size of the AEAD tag.
pub const TAG_LEN: usize = 16;
/// What sealing adds to the plaintext.
pub const SEAL_OVERHEAD: usize = ENCAPSULATED_KEY_LEN + TAG_LEN;

type Kem = X25519HkdfSha256;
type Kdf = HkdfSha256;
type Aead = ChaCha20Poly1305;

/// Why a payload could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum E2eError {
    #[error("recipient encryption key is invalid")]
    InvalidRecipientKey,
    #[error("sealed payload is shorter than the {SEAL_OVERHEAD}-byte minimum")]
    Truncated,
    #[error("payload does not decrypt (wrong key, or altered ciphertext or header)")]
    DecryptFailed,
    #[error("hpke sealing failed")]
    SealFailed,
}

/// Encrypts `plaintext` for `recipient`, binding `aad`.
pub fn seal<R: RngCore + CryptoRng>(
    recipient: &EncryptionPublicKey,
    aad: &[u8],
    plaintext: &[u8],
    rng: &mut R,
) -> Result<Vec<u8>, E2eError> {
    let public = <Kem as hpke::Kem>::PublicKey::from_bytes(&recipient.0).map_err(|_| E2eError::InvalidRecipientKey)?;
    let (encapsulated, ciphertext) =
        hpke::single_shot_seal::<Aead, Kdf, Kem, R>(&OpModeS::Base, &public, HPKE_INFO, plaintext, aad, rng)
            .map_err(|_| E2eError::SealFailed)?;
    let mut sealed = Vec::with_capacity(ENCAPSULATED_KEY_LEN + ciphertext.len());
    sealed.extend_from_slice(&encapsulated.to_bytes());
    sealed.extend_from_slice(&ciphertext);
    Ok(sealed)
}

/// Decrypts a payload sealed for `secret` with the same `aad`.
pub fn open(secret: &EncryptionSecret, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, E2eError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(E2eError::Truncated);
    }
    let (encapsulated, ciphertext) = sealed.split_at(ENCAPSULATED_KEY_LEN);
    let encapsulated =
        <Kem as hpke::Kem>::EncappedKey::from_bytes(encapsulated).map_err(|_| E2eError::DecryptFailed)?;
    let private = <Kem as hpke::Kem>::PrivateKey::from_bytes(secret.as_bytes()).map_err(|_| E2eError::DecryptFailed)?;
    hpke::single_shot_open::<Aead, Kdf, Kem>(&OpModeR::Base, &private, &encapsulated, HPKE_INFO, ciphertext, aad)
        .map_err(|_| E2eError::DecryptFailed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hpke::Kem as _;

    fn unhex(text: &str) -> Vec<u8> {
        hex::decode(text).unwrap()
    }

    /// Hands out fixed bytes: makes the ephemeral key of a seal the one in the test vector.
    struct FixedRng(Vec<u8>);
    impl RngCore for FixedRng {
        fn next_u32(&mut self) -> u32 {
            unimplemented!("only fill_bytes is used")
        }
        fn next_u64(&mut self) -> u64 {
            unimplemented!("only fill_bytes is used")
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            let n = dest.len();
            dest.copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }
    impl CryptoRng for FixedRng {}

    /// RFC 9180 appendix A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305,
    /// base mode, sequence number 0.
    #[test]
    fn hpke_known_answer_rfc9180_a_2_1() {
        let info = unhex("4f6465206f6e2061204772656369616e2055726e");
        let (sk_r, pk_r) =
            Kem::derive_keypair(&unhex("1ac01f181fdf9f352797655161c58b75c656a6cc2716dcb66372da835542e1df"));
        assert_eq!(sk_r.to_bytes().to_vec(), unhex("8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb"));
        assert_eq!(pk_r.to_bytes().to_vec(), unhex("4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a"));
        let enc = unhex("1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a");
        let plaintext = unhex("4265617574792069732074727574682c20747275746820626561757479");
        let aad = unhex("436f756e742d30");
        let ciphertext =
            unhex("1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28");

        // Seal with the vector's ephemeral key material: identical output.
        let mut rng = FixedRng(unhex("909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b"));
        let (encapsulated, produced) =
            hpke::single_shot_seal::<Aead, Kdf, Kem, _>(&OpModeS::Base, &pk_r, &info, &plaintext, &aad, &mut rng)
                .unwrap();
        assert_eq!(encapsulated.to_bytes().to_vec(), enc);
        assert_eq!(produced, ciphertext);

        // Our open() decrypts the vector's ciphertext.
        let secret = EncryptionSecret::from_bytes(sk_r.to_bytes().into());
        assert_eq!(secret.public_key().0.to_vec(), pk_r.to_bytes().to_vec());
        let sealed = [enc.clone(), ciphertext.clone()].concat();
        let opened = hpke::single_shot_open::<Aead, Kdf, Kem>(
            &OpModeR::Base,
            &<Kem as hpke::Kem>::PrivateKey::from_bytes(secret.as_bytes()).unwrap(),
            &<Kem as hpke::Kem>::EncappedKey::from_bytes(&sealed[..32]).unwrap(),
            &info,
            &sealed[32..],
            &aad,
        )
        .unwrap();
        assert_eq!(opened, plaintext);
    }

    #[test]
    fn seal_then_open_with_our_info() {
        let mut rng = rand::rngs::OsRng;
        let secret = EncryptionSecret::generate(&mut rng);
        let sealed = seal(&secret.public_key(), b"header", b"hello agent", &mut rng).unwrap();
        assert_eq!(sealed.len(), b"hello agent".len() + SEAL_OVERHEAD);
        assert_eq!(open(&secret, b"header", &sealed).unwrap(), b"hello agent");
        assert_eq!(open(&secret, b"other header", &sealed), Err(E2eError::DecryptFailed));
        let wrong = EncryptionSecret::generate(&mut rng);
        assert_eq!(open(&wrong, b"header", &sealed), Err(E2eError::DecryptFailed));
        let mut flipped = sealed.clone();
        flipped[40] ^= 1;
        assert_eq!(open(&secret, b"header", &flipped), Err(E2eError::DecryptFailed));
        assert_eq!(open(&secret, b"header", &sealed[..SEAL_OVERHEAD - 1]), Err(E2eError::Truncated));
    }
}

//! Keys: Ed25519 for identity and signatures, X25519 for end-to-end encryption, and the
//! signed binding that publishes an agent's X25519 key under its id.

use std::fmt;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signer as _, Verifier as _};
use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroizing;

use crate::ids::{AgentId, ID_LEN};
use crate::time::UnixMillis;
use crate::wire::{Reader, WireError, Writer};

pub const PUBLIC_KEY_LEN: usize = 32;
pub const SIGNATURE_LEN: usize = 64;

/// Why a key, signature or binding was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("public key is not a valid Ed25519 point")]
    InvalidPublicKey,
    #[error("public key has small order and is refused")]
    WeakPublicKey,
    #[error("signature does not verify")]
    BadSignature,
    #[error("private key encoding is invalid: {0}")]
    InvalidPrivateKey(String),
    #[error("key binding is malformed: {0}")]
    MalformedBinding(#[from] WireError),
}

/// Why a signer could not sign (an HSM can fail where a software key cannot).
#[derive(Debug, thiserror::Error)]
#[error("signing failed: {0}")]
pub struct SignError(pub String);

/// Anything that holds an Ed25519 private key: a software key here, an HSM key in
/// `molt-hsm`. Certificate issuance, receipts and envelopes sign through it.
pub trait Signer: Send + Sync {
    fn public_key(&self) -> PublicKey;
    fn try_sign(&self, message: &[u8]) -> Result<Signature, SignError>;
}

/// An Ed25519 private key held in memory; zeroed on drop.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> SigningKey {
        SigningKey(ed25519_dalek::SigningKey::generate(rng))
    }

    pub fn from_bytes(secret: &[u8; 32]) -> SigningKey {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(secret))
    }

    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.0.sign(message).to_bytes())
    }

    /// PKCS#8 v1 DER, the form rustls and rcgen load.
    pub fn to_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        // Invariant: encoding an in-memory Ed25519 key as PKCS#8 cannot fail.
        let document = self.0.to_pkcs8_der().expect("ed25519 key encodes as pkcs8");
        Zeroizing::new(document.as_bytes().to_vec())
    }

    pub fn from_pkcs8_der(der: &[u8]) -> Result<SigningKey, KeyError> {
        ed25519_dalek::SigningKey::from_pkcs8_der(der)
            .map(SigningKey)
            .map_err(|e| KeyError::InvalidPrivateKey(e.to_string()))
    }

    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(crate::cert::pem_encode("PRIVATE KEY", &self.to_pkcs8_der()))
    }

    pub fn from_pkcs8_pem(pem: &str) -> Result<SigningKey, KeyError> {
        let der =
            crate::cert::pem_decode("PRIVATE KEY", pem).map_err(|e| KeyError::InvalidPrivateKey(e.to_string()))?;
        SigningKey::from_pkcs8_der(&Zeroizing::new(der))
    }
}

impl Signer for SigningKey {
    fn public_key(&self) -> PublicKey {
        SigningKey::public_key(self)
    }
    fn try_sign(&self, message: &[u8]) -> Result<Signature, SignError> {
        Ok(self.sign(message))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("public", &self.public_key()).finish_non_exhaustive()
    }
}

/// An Ed25519 public key, checked to be a valid point of full order when parsed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    pub fn from_bytes(bytes: &[u8; PUBLIC_KEY_LEN]) -> Result<PublicKey, KeyError> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::InvalidPublicKey)?;
        if key.is_weak() {
            return Err(KeyError::WeakPublicKey);
        }
        Ok(PublicKey(key))
    }

    pub fn from_slice(bytes: &[u8]) -> Result<PublicKey, KeyError> {
        let array: &[u8; PUBLIC_KEY_LEN] = bytes.try_into().map_err(|_| KeyError::InvalidPublicKey)?;
        PublicKey::from_bytes(array)
    }

    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        self.0.as_bytes()
    }

    /// Strict RFC 8032 verification (rejects non-canonical encodings and weak keys).
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), KeyError> {
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.0.verify_strict(message, &signature).map_err(|_| KeyError::BadSignature)
    }

    /// Lenient verification as used by batch verification; prefer [`PublicKey::verify`].
    pub fn verify_cofactorless(&self, message: &[u8], signature: &Signature) -> Result<(), KeyError> {
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.0.verify(message, &signature).map_err(|_| KeyError::BadSignature)
    }

    pub(crate) fn dalek(&self) -> &ed25519_dalek::VerifyingKey {
        &self.0
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(")?;
        for byte in self.as_bytes() {
            write!(f, "{byte:02x}")?;
        }
        write!(f, ")")
    }
}

/// A 64-byte Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; SIGNATURE_LEN]);

impl Signature {
    pub fn from_slice(bytes: &[u8]) -> Option<Signature> {
        bytes.try_into().ok().map(Signature)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// Verifies many signatures at once; much cheaper per signature than one by one. On
/// `false` the caller verifies one by one to find the bad ones.
pub fn verify_batch(messages: &[&[u8]], signatures: &[Signature], keys: &[PublicKey]) -> bool {
    if messages.len() != signatures.len() || messages.len() != keys.len() {
        return false;
    }
    let signatures: Vec<ed25519_dalek::Signature> =
        signatures.iter().map(|s| ed25519_dalek::Signature::from_bytes(&s.0)).collect();
    let keys: Vec<ed25519_dalek::VerifyingKey> = keys.iter().map(|k| *k.dalek()).collect();
    ed25519_dalek::verify_batch(messages, &signatures, &keys).is_ok()
}

/// Each signature's verdict: all valid if they verify as one batch, else each checked
/// strictly ([`PublicKey::verify`]) to find the bad ones. A single signature is checked
/// strictly. `false` for every item if the lengths differ.
pub fn verify_each(messages: &[&[u8]], signatures: &[Signature], keys: &[PublicKey]) -> Vec<bool> {
    if messages.len() != signatures.len() || messages.len() != keys.len() {
        return vec![false; messages.len()];
    }
    if messages.len() > 1 && verify_batch(messages, signatures, keys) {
        return vec![true; messages.len()];
    }
    messages
        .iter()
        .zip(signatures)
        .zip(keys)
        .map(|((message, signature), key)| key.verify(message, signature).is_ok())
        .collect()
}

/// An X25519 private key for end-to-end decryption; zeroed on drop. Kept in software.
#[derive(Clone)]
pub struct EncryptionSecret(Zeroizing<[u8; 32]>);

impl EncryptionSecret {
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> EncryptionSecret {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(bytes.as_mut());
        EncryptionSecret(bytes)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> EncryptionSecret {
        EncryptionSecret(Zeroizing::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn public_key(&self) -> EncryptionPublicKey {
        let secret = x25519_dalek::StaticSecret::from(*self.0);
        EncryptionPublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }
}

impl fmt::Debug for EncryptionSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionSecret").field("public", &self.public_key()).finish_non_exhaustive()
    }
}

/// An X25519 public key that others encrypt to.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EncryptionPublicKey(pub [u8; 32]);

impl fmt::Debug for EncryptionPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionPublicKey(")?;
        for byte in &self.0 {
            write!(f, "{byte:02x}")?;
        }
        write!(f, ")")
    }
}

const BINDING_CONTEXT: &[u8] = b"molt/key-binding/v1";
/// Encoded size of a [`KeyBinding`].
pub const KEY_BINDING_LEN: usize = ID_LEN + 32 + 8 + SIGNATURE_LEN;

/// An agent's statement, signed with its Ed25519 key, that `encryption_key` is its X25519
/// key as of `issued_at`. Published in the registry; senders check it before encrypting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyBinding {
    pub agent: AgentId,
    pub encryption_key: EncryptionPublicKey,
    pub issued_at: UnixMillis,
    pub signature: Signature,
}

impl KeyBinding {
    pub fn sign(
        agent: AgentId,
        encryption_key: EncryptionPublicKey,
        issued_at: UnixMillis,
        signer: &dyn Signer,
    ) -> Result<KeyBinding, SignError> {
        let signature = signer.try_sign(&binding_message(agent, &encryption_key, issued_at))?;
        Ok(KeyBinding { agent, encryption_key, issued_at, signature })
    }

    /// Checks the signature against the agent's current Ed25519 key (from its certificate).
    pub fn verify(&self, signing_key: &PublicKey) -> Result<(), KeyError> {
        signing_key.verify(&binding_message(self.agent, &self.encryption_key, self.issued_at), &self.signature)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut writer = Writer::with_capacity(KEY_BINDING_LEN);
        writer.bytes(self.agent.as_bytes());
        writer.bytes(&self.encryption_key.0);
        writer.u64(self.issued_at.0);
        writer.bytes(&self.signature.0);
        writer.into_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<KeyBinding, KeyError> {
        let mut reader = Reader::new(bytes);
        let agent = AgentId::from_bytes(reader.array()?);
        let encryption_key = EncryptionPublicKey(reader.array()?);
        let issued_at = UnixMillis(reader.u64()?);
        let signature = Signature(reader.array()?);
        reader.finish()?;
        Ok(KeyBinding { agent, encryption_key, issued_at, signature })
    }
}

fn binding_message(agent: AgentId, key: &EncryptionPublicKey, issued_at: UnixMillis) -> Vec<u8> {
    let mut writer = Writer::with_capacity(BINDING_CONTEXT.len() + KEY_BINDING_LEN);
    writer.bytes(BINDING_CONTEXT);
    writer.bytes(agent.as_bytes());
    writer.bytes(&key.0);
    writer.u64(issued_at.0);
    writer.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex<const N: usize>(text: &str) -> [u8; N] {
        hex::decode(text).unwrap().try_into().unwrap()
    }

    /// RFC 8032 section 7.1, TEST 1, TEST 2 and TEST 3.
    #[test]
    fn ed25519_known_answers_rfc8032() {
        let cases = [
            (
                "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
                "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
                "",
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
            ),
            (
                "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
                "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
                "72",
                "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
            ),
            (
                "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
                "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
                "af82",
                "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
            ),
        ];
        for (secret, public, message, signature) in cases {
            let key = SigningKey::from_bytes(&unhex::<32>(secret));
            assert_eq!(key.public_key().as_bytes(), &unhex::<32>(public));
            let message = hex::decode(message).unwrap();
            let produced = key.sign(&message);
            assert_eq!(produced, Signature(unhex::<64>(signature)));
            key.public_key().verify(&message, &produced).unwrap();
            let mut tampered = produced;
            tampered.0[0] ^= 1;
            assert_eq!(key.public_key().verify(&message, &tampered), Err(KeyError::BadSignature));
        }
    }

    /// RFC 7748 section 5.2 (single scalar multiplication) and section 6.1 (Diffie-Hellman).
    #[test]
    fn x25519_known_answers_rfc7748() {
        let scalar = unhex::<32>("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4");
        let u = unhex::<32>("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c");
        let out = unhex::<32>("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552");
        assert_eq!(x25519_dalek::x25519(scalar, u), out);

        let alice =
            EncryptionSecret::from_bytes(unhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"));
        let bob =
            EncryptionSecret::from_bytes(unhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"));
        assert_eq!(
            alice.public_key().0,
            unhex::<32>("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        assert_eq!(bob.public_key().0, unhex::<32>("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"));
        let shared = unhex::<32>("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        assert_eq!(x25519_dalek::x25519(*alice.as_bytes(), bob.public_key().0), shared);
        assert_eq!(x25519_dalek::x25519(*bob.as_bytes(), alice.public_key().0), shared);
    }

    #[test]
    fn pkcs8_round_trips() {
        let key = SigningKey::from_bytes(&[3u8; 32]);
        let back = SigningKey::from_pkcs8_pem(&key.to_pkcs8_pem()).unwrap();
        assert_eq!(back.public_key(), key.public_key());
        assert!(SigningKey::from_pkcs8_der(b"not a key").is_err());
    }

    #[test]
    fn weak_and_invalid_public_keys_are_refused() {
        // The identity point (small order) encodes as 1 followed by zeros.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(PublicKey::from_bytes(&identity), Err(KeyError::WeakPublicKey));
        assert!(PublicKey::from_slice(&[1, 2, 3]).is_err());
    }

    #[test]
    fn batch_verification_finds_a_bad_signature() {
        let keys: Vec<SigningKey> = (0..8u8).map(|i| SigningKey::from_bytes(&[i + 1; 32])).collect();
        let messages: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 100]).collect();
        let mut signatures: Vec<Signature> = keys.iter().zip(&messages).map(|(k, m)| k.sign(m)).collect();
        let publics: Vec<PublicKey> = keys.iter().map(SigningKey::public_key).collect();
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        assert!(verify_batch(&refs, &signatures, &publics));
        signatures[5].0[10] ^= 0x40;
        assert!(!verify_batch(&refs, &signatures, &publics));
        assert!(!verify_batch(&refs[..2], &signatures, &publics));
        let mut expected = vec![true; 8];
        expected[5] = false;
        assert_eq!(verify_each(&refs, &signatures, &publics), expected);
        assert_eq!(verify_each(&refs[5..6], &signatures[5..6], &publics[5..6]), [false]);
        assert_eq!(verify_each(&refs[..2], &signatures[..2], &publics[..2]), [true, true]);
        assert_eq!(verify_each(&refs[..2], &signatures, &publics), [false, false]);
    }

    #[test]
    fn key_binding_signs_verifies_and_round_trips() {
        let signing = SigningKey::from_bytes(&[5u8; 32]);
        let agent = AgentId::from_inception_key(&signing.public_key());
        let encryption = EncryptionSecret::from_bytes([6u8; 32]).public_key();
        let binding = KeyBinding::sign(agent, encryption, UnixMillis(1_700_000_000_000), &signing).unwrap();
        binding.verify(&signing.public_key()).unwrap();
        let decoded = KeyBinding::decode(&binding.encode()).unwrap();
        assert_eq!(decoded, binding);

        let other = SigningKey::from_bytes(&[8u8; 32]);
        assert_eq!(binding.verify(&other.public_key()), Err(KeyError::BadSignature));
        let mut forged = binding;
        forged.encryption_key.0[0] ^= 1;
        assert_eq!(forged.verify(&signing.public_key()), Err(KeyError::BadSignature));
        assert!(KeyBinding::decode(&binding.encode()[..KEY_BINDING_LEN - 1]).is_err());
        let mut long = binding.encode();
        long.push(0);
        assert!(KeyBinding::decode(&long).is_err());
    }
}

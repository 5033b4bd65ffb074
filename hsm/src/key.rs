//! Ed25519 keys inside a token: generation, lookup, signing and removal.

use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use molt_protocol::keys::{PublicKey, SignError, Signature, Signer};

use crate::error::{FindKeyError, GenerateKeyError, Pkcs11Failure};
use crate::token::Token;

/// DER of the Ed25519 curve OID 1.3.101.112, the `CKA_EC_PARAMS` of Ed25519 keys.
pub const ED25519_EC_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// The same curve named by its printable string, which some tokens return instead.
const ED25519_EC_PARAMS_NAMED: &[u8] = b"\x13\x0cedwards25519";
/// Length of the `CKA_ID` given to generated keys (from the token's random generator).
pub const KEY_ID_LEN: usize = 16;
/// Longest key label accepted.
pub const KEY_LABEL_LEN_MAX: usize = 64;

/// An Ed25519 key pair held by a token. Signing borrows a pooled session for the
/// duration of one `C_Sign`, so one key may sign from many threads at once.
#[derive(Clone, Debug)]
pub struct HsmKey {
    token: Token,
    private: ObjectHandle,
    public: ObjectHandle,
    label: String,
    id: Vec<u8>,
    public_key: PublicKey,
}

/// The protection attributes of a private key (`CKA_SENSITIVE`, `CKA_EXTRACTABLE`,
/// `CKA_ALWAYS_SENSITIVE`, `CKA_NEVER_EXTRACTABLE`). An attribute the token does not
/// report reads as `false`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyProtection {
    pub sensitive: bool,
    pub extractable: bool,
    pub always_sensitive: bool,
    pub never_extractable: bool,
}

/// How a key is named on the token.
#[derive(Clone, Copy, Debug)]
pub enum KeyName<'a> {
    Label(&'a str),
    Id(&'a [u8]),
}

impl std::fmt::Display for KeyName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyName::Label(label) => write!(f, "label {label:?}"),
            KeyName::Id(id) => write!(f, "id {}", data_encoding::HEXLOWER.encode(id)),
        }
    }
}

impl Token {
    /// Generates an Ed25519 key pair on the token (`CKM_EC_EDWARDS_KEY_PAIR_GEN`). The
    /// private key is a sensitive, non-extractable token object; the id is random. Refuses
    /// a label that any object on the token already carries.
    pub fn generate_ed25519(&self, label: &str) -> Result<HsmKey, GenerateKeyError> {
        if label.is_empty() || label.len() > KEY_LABEL_LEN_MAX || label.chars().any(char::is_control) {
            return Err(GenerateKeyError::InvalidLabel { label: label.to_owned() });
        }
        let failed = |failure: Pkcs11Failure| GenerateKeyError::Pkcs11 { label: label.to_owned(), failure };
        // The label check, the generation and the read of the new public key all hold the
        // object-store lock: SoftHSM2 also fails a generation at random while another
        // thread of the process looks objects up, and two generations racing for one
        // label must not both pass the check.
        let writes = self.object_writes();
        if !self.objects_labelled(label).map_err(failed)?.is_empty() {
            return Err(GenerateKeyError::LabelExists { label: label.to_owned() });
        }
        let id = self.random_bytes(KEY_ID_LEN).map_err(failed)?;
        let public_template = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(ED25519_EC_PARAMS.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        let private_template = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        let mut session = self.session().map_err(failed)?;
        let generated = session.run("C_GenerateKeyPair", |s| {
            s.generate_key_pair(&Mechanism::EccEdwardsKeyPairGen, &public_template, &private_template)
        });
        let (public, private) = match generated {
            Ok(pair) => pair,
            Err(failure) if failure.is(cryptoki::error::RvError::MechanismInvalid) => {
                return Err(GenerateKeyError::Unsupported { label: label.to_owned(), failure });
            }
            Err(failure) => return Err(failed(failure)),
        };
        drop(session);
        let read = self.read_public_key(public);
        // (Destroying takes the lock itself.)
        drop(writes);
        let public_key = match read {
            Ok(key) => key,
            Err(detail) => {
                let _ = self.destroy_objects(&[private, public]);
                return Err(GenerateKeyError::BadPublicKey { label: label.to_owned(), detail });
            }
        };
        Ok(HsmKey { token: self.clone(), private, public, label: label.to_owned(), id, public_key })
    }

    /// Finds the one Ed25519 private key with this label or id, and its public key.
    pub fn find_ed25519(&self, name: KeyName<'_>) -> Result<HsmKey, FindKeyError> {
        let shown = name.to_string();
        let failed = |failure: Pkcs11Failure| FindKeyError::Pkcs11 { name: shown.clone(), failure };
        let naming = match name {
            KeyName::Label(label) => Attribute::Label(label.as_bytes().to_vec()),
            KeyName::Id(id) => Attribute::Id(id.to_vec()),
        };
        let privates = self.find(&[Attribute::Class(ObjectClass::PRIVATE_KEY), naming.clone()]).map_err(failed)?;
        let private = match privates.as_slice() {
            [] => return Err(FindKeyError::NotFound { name: shown }),
            [one] => *one,
            many => return Err(FindKeyError::Ambiguous { name: shown, count: many.len() }),
        };
        let attributes = self
            .attributes(private, &[AttributeType::KeyType, AttributeType::Id, AttributeType::Label])
            .map_err(failed)?;
        let (mut key_type, mut id, mut label) = (None, Vec::new(), String::new());
        for attribute in attributes {
            match attribute {
                Attribute::KeyType(found) => key_type = Some(found),
                Attribute::Id(found) => id = found,
                Attribute::Label(found) => label = String::from_utf8_lossy(&found).into_owned(),
                _ => {}
            }
        }
        if key_type != Some(KeyType::EC_EDWARDS) {
            return Err(FindKeyError::NotEd25519 { name: shown });
        }
        let publics =
            self.find(&[Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::Id(id.clone())]).map_err(failed)?;
        let [public] = publics.as_slice() else {
            return Err(FindKeyError::NoPublicKey { name: shown });
        };
        let public_key = self
            .read_public_key(*public)
            .map_err(|detail| FindKeyError::BadPublicKey { name: shown.clone(), detail })?;
        Ok(HsmKey { token: self.clone(), private, public: *public, label, id, public_key })
    }

    /// Labels of every private key on the token, in the token's order; tests and audits
    /// use it to see what keys exist.
    pub fn private_key_labels(&self) -> Result<Vec<String>, Pkcs11Failure> {
        let privates = self.find(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])?;
        let mut labels = Vec::with_capacity(privates.len());
        for private in privates {
            for attribute in self.attributes(private, &[AttributeType::Label])? {
                if let Attribute::Label(label) = attribute {
                    labels.push(String::from_utf8_lossy(&label).into_owned());
                }
            }
        }
        Ok(labels)
    }

    /// Handles of every object (of any class) carrying `label`.
    pub fn objects_labelled(&self, label: &str) -> Result<Vec<ObjectHandle>, Pkcs11Failure> {
        self.find(&[Attribute::Label(label.as_bytes().to_vec())])
    }

    fn find(&self, template: &[Attribute]) -> Result<Vec<ObjectHandle>, Pkcs11Failure> {
        let mut session = self.session()?;
        session.run("C_FindObjects", |s| s.find_objects(template))
    }

    fn attributes(&self, object: ObjectHandle, types: &[AttributeType]) -> Result<Vec<Attribute>, Pkcs11Failure> {
        let mut session = self.session()?;
        session.run("C_GetAttributeValue", |s| s.get_attributes(object, types))
    }

    fn destroy_objects(&self, objects: &[ObjectHandle]) -> Result<(), Pkcs11Failure> {
        let _writes = self.object_writes();
        let mut session = self.session()?;
        for object in objects {
            session.run("C_DestroyObject", |s| s.destroy_object(*object))?;
        }
        Ok(())
    }

    /// Reads `CKA_EC_PARAMS` and `CKA_EC_POINT` and checks they are an Ed25519 point.
    fn read_public_key(&self, public: ObjectHandle) -> Result<PublicKey, String> {
        let attributes = self
            .attributes(public, &[AttributeType::EcParams, AttributeType::EcPoint])
            .map_err(|failure| failure.to_string())?;
        let mut point = None;
        for attribute in attributes {
            match attribute {
                Attribute::EcParams(params) if params != ED25519_EC_PARAMS && params != ED25519_EC_PARAMS_NAMED => {
                    return Err("the key's curve is not Ed25519".to_owned());
                }
                Attribute::EcPoint(bytes) => point = Some(bytes),
                _ => {}
            }
        }
        let point = point.ok_or("the token did not return CKA_EC_POINT")?;
        // Tokens return the 32-byte point either raw or wrapped in a DER OCTET STRING.
        let raw = match point.as_slice() {
            [0x04, 0x20, rest @ ..] if rest.len() == 32 => rest,
            raw if raw.len() == 32 => raw,
            _ => return Err(format!("CKA_EC_POINT has an unexpected form ({} bytes)", point.len())),
        };
        PublicKey::from_slice(raw).map_err(|error| error.to_string())
    }
}

impl HsmKey {
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn id(&self) -> &[u8] {
        &self.id
    }

    pub fn token(&self) -> &Token {
        &self.token
    }

    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// Signs with `CKM_EDDSA` in pure Ed25519 mode (no parameters).
    pub fn sign(&self, message: &[u8]) -> Result<Signature, Pkcs11Failure> {
        let bytes = self.sign_with(EddsaSignatureScheme::Pure, message)?;
        Signature::from_slice(&bytes).ok_or_else(|| Pkcs11Failure {
            function: "C_Sign".to_owned(),
            code: format!("a {}-byte signature instead of 64", bytes.len()),
            rv: None,
        })
    }

    /// Signs with explicit EdDSA parameters; [`doctor`](crate::doctor) uses it to find
    /// tokens that ignore them.
    pub fn sign_with(&self, scheme: EddsaSignatureScheme<'_>, message: &[u8]) -> Result<Vec<u8>, Pkcs11Failure> {
        let mechanism = Mechanism::Eddsa(EddsaParams::new(scheme));
        let mut session = self.token.session()?;
        session.run("C_Sign", |s| s.sign(&mechanism, self.private, message))
    }

    /// How the token protects the private half, as it reports it.
    pub fn protection(&self) -> Result<KeyProtection, Pkcs11Failure> {
        let types = [
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
        ];
        let mut protection = KeyProtection::default();
        for attribute in self.token.attributes(self.private, &types)? {
            match attribute {
                Attribute::Sensitive(value) => protection.sensitive = value,
                Attribute::Extractable(value) => protection.extractable = value,
                Attribute::AlwaysSensitive(value) => protection.always_sensitive = value,
                Attribute::NeverExtractable(value) => protection.never_extractable = value,
                _ => {}
            }
        }
        Ok(protection)
    }

    /// Destroys both halves of the key on the token.
    pub fn destroy(self) -> Result<(), Pkcs11Failure> {
        self.token.destroy_objects(&[self.private, self.public])
    }
}

impl Signer for HsmKey {
    fn public_key(&self) -> PublicKey {
        self.public_key
    }

    fn try_sign(&self, message: &[u8]) -> Result<Signature, SignError> {
        HsmKey::sign(self, message).map_err(|failure| {
            SignError(format!("hsm key {:?} on token {:?}: {failure}", self.label, self.token.label()))
        })
    }
}

/// Whether the module lists a mechanism for the slot.
pub fn supports(mechanisms: &[MechanismType], wanted: MechanismType) -> bool {
    mechanisms.contains(&wanted)
}

//! `molt-hsm doctor`: what a PKCS#11 module offers and whether Molt can use it, checked
//! for real. Lists every slot, token and mechanism; on a token it is told to use, it
//! generates an Ed25519 key, signs, verifies the signature in software, probes known
//! quirks and destroys what it created.

use std::fmt::Write as _;
use std::time::Instant;

use cryptoki::mechanism::eddsa::EddsaSignatureScheme;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType};

use crate::error::{OpenError, Pkcs11Failure};
use crate::token::{Token, TokenConfig, load_module};

/// DER of the X25519 OID 1.3.101.110.
const X25519_EC_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x6e];
/// Signatures timed for the speed line of the report.
const TIMED_SIGNATURES: u32 = 50;

/// How a finding bears on Molt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Ok,
    /// Works, with a difference worth knowing.
    Quirk,
    /// Molt cannot use this as it is.
    Problem,
}

/// The doctor's report: plain-words findings plus the listing.
#[derive(Debug, Default)]
pub struct Report {
    pub listing: String,
    pub findings: Vec<(Level, String)>,
}

impl Report {
    fn note(&mut self, level: Level, text: impl Into<String>) {
        self.findings.push((level, text.into()));
    }

    pub fn has_problems(&self) -> bool {
        self.findings.iter().any(|(level, _)| *level == Level::Problem)
    }

    /// The report as printed by the binary.
    pub fn render(&self) -> String {
        let mut text = self.listing.clone();
        text.push_str("\nFindings:\n");
        for (level, finding) in &self.findings {
            let tag = match level {
                Level::Ok => "ok     ",
                Level::Quirk => "quirk  ",
                Level::Problem => "PROBLEM",
            };
            let _ = writeln!(text, "  {tag} {finding}");
        }
        text
    }
}

/// Lists the module; with `token`, also checks Ed25519 on it for real.
pub fn run(module: &std::path::Path, token: Option<&TokenConfig>) -> Result<Report, OpenError> {
    let pkcs11 = load_module(module)?;
    let mut report = Report::default();
    let listing = &mut report.listing;
    if let Ok(info) = pkcs11.get_library_info() {
        let _ = writeln!(
            listing,
            "Module {}: {} {} (library {}.{}, cryptoki {}.{})",
            module.display(),
            info.manufacturer_id().trim(),
            info.library_description().trim(),
            info.library_version().major(),
            info.library_version().minor(),
            info.cryptoki_version().major(),
            info.cryptoki_version().minor(),
        );
    }
    let slots =
        pkcs11.get_all_slots().map_err(|e| OpenError::Slot(Pkcs11Failure::from_cryptoki("C_GetSlotList", e)))?;
    let mut ed25519_slots = 0;
    for slot in &slots {
        let description =
            pkcs11.get_slot_info(*slot).map(|i| i.slot_description().trim().to_owned()).unwrap_or_default();
        let _ = writeln!(listing, "Slot {} ({description})", slot.id());
        let Ok(info) = pkcs11.get_token_info(*slot) else {
            let _ = writeln!(listing, "  no token");
            continue;
        };
        let _ = writeln!(
            listing,
            "  token {:?}: {} {}, serial {}, initialised {}, login required {}, rng {}",
            info.label().trim(),
            info.manufacturer_id().trim(),
            info.model().trim(),
            info.serial_number().trim(),
            info.token_initialized(),
            info.login_required(),
            info.rng(),
        );
        let mechanisms = pkcs11.get_mechanism_list(*slot).unwrap_or_default();
        let names: Vec<String> = mechanisms.iter().map(|m| m.to_string()).collect();
        let _ = writeln!(listing, "  {} mechanisms: {}", names.len(), names.join(" "));
        let edwards = mechanisms.contains(&MechanismType::ECC_EDWARDS_KEY_PAIR_GEN);
        let eddsa = mechanisms.contains(&MechanismType::EDDSA);
        let _ = writeln!(listing, "  Ed25519 key generation: {}, EdDSA signing: {}", yes(edwards), yes(eddsa));
        if edwards && eddsa && info.token_initialized() {
            ed25519_slots += 1;
        }
    }
    if ed25519_slots == 0 {
        report.note(Level::Problem, "no initialised token offers Ed25519 (CKM_EC_EDWARDS_KEY_PAIR_GEN and CKM_EDDSA); Molt's keys are Ed25519 only");
    } else {
        report.note(
            Level::Ok,
            format!("{ed25519_slots} initialised token(s) list Ed25519 key generation and EdDSA signing"),
        );
    }
    match token {
        Some(config) => exercise(config, &mut report)?,
        None => report.note(Level::Quirk, "no token named (--token): Ed25519 was listed but not tried for real"),
    }
    Ok(report)
}

fn yes(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

/// Generates, signs, verifies, probes quirks, cleans up.
fn exercise(config: &TokenConfig, report: &mut Report) -> Result<(), OpenError> {
    let token = Token::open(config)?;
    let suffix = token.random_bytes(6).map(|b| crate::transcript::hex(&b)).unwrap_or_else(|_| "0".into());
    let label = format!("molt-doctor-{suffix}");
    let key = match token.generate_ed25519(&label) {
        Ok(key) => key,
        Err(error) => {
            report.note(Level::Problem, format!("token {:?} cannot generate an Ed25519 key: {error}", token.label()));
            return Ok(());
        }
    };
    report.note(Level::Ok, format!("generated Ed25519 key {label:?} on token {:?}", token.label()));
    check_key_attributes(&token, &key, report);
    let message = b"molt doctor: ed25519 check";
    match key.sign(message) {
        Ok(signature) => match key.public_key().verify(message, &signature) {
            Ok(()) => report.note(Level::Ok, "CKM_EDDSA signature verifies in software (strict RFC 8032)"),
            Err(_) => report.note(Level::Problem, "CKM_EDDSA signature does NOT verify in software"),
        },
        Err(failure) => report.note(Level::Problem, format!("signing failed: {failure}")),
    }
    probe_prehash(&key, message, report);
    time_signatures(&key, report);
    probe_x25519(&token, report);
    match key.destroy() {
        Ok(()) => report.note(Level::Ok, format!("cleaned up: key {label:?} destroyed")),
        Err(failure) => report.note(Level::Problem, format!("could not destroy test key {label:?}: {failure}")),
    }
    Ok(())
}

fn check_key_attributes(token: &Token, key: &crate::HsmKey, report: &mut Report) {
    let Ok(objects) = token.objects_labelled(key.label()) else { return };
    let Ok(mut session) = token.session() else { return };
    let mut sensitive = false;
    let mut extractable = true;
    for object in objects {
        let Ok(attributes) = session.run("C_GetAttributeValue", |s| {
            s.get_attributes(object, &[AttributeType::Sensitive, AttributeType::Extractable])
        }) else {
            continue;
        };
        for attribute in attributes {
            match attribute {
                Attribute::Sensitive(true) => sensitive = true,
                Attribute::Extractable(false) => extractable = false,
                _ => {}
            }
        }
    }
    if sensitive && !extractable {
        report.note(Level::Ok, "the private key is sensitive and not extractable");
    } else {
        report.note(Level::Problem, "the token did not keep the private key sensitive and non-extractable");
    }
}

/// Some tokens ignore CK_EDDSA_PARAMS: asking for Ed25519ph returns plain Ed25519.
fn probe_prehash(key: &crate::HsmKey, message: &[u8], report: &mut Report) {
    let plain = key.sign(message).map(|s| s.0.to_vec());
    match (key.sign_with(EddsaSignatureScheme::Ed25519ph(&[]), message), plain) {
        (Ok(prehashed), Ok(plain)) if prehashed == plain => report.note(
            Level::Quirk,
            "the token ignores EdDSA parameters: asking for Ed25519ph returned a plain Ed25519 signature. Molt uses plain Ed25519 only, so this is harmless here, but do not rely on Ed25519ph or Ed25519ctx with this token",
        ),
        (Ok(_), _) => report.note(Level::Ok, "the token honours EdDSA parameters (Ed25519ph differs from Ed25519)"),
        (Err(failure), _) => report.note(Level::Ok, format!("the token refuses Ed25519ph ({failure}); Molt uses plain Ed25519 only")),
    }
}

fn time_signatures(key: &crate::HsmKey, report: &mut Report) {
    let started = Instant::now();
    for round in 0..TIMED_SIGNATURES {
        if key.sign(&round.to_le_bytes()).is_err() {
            return;
        }
    }
    let per_signature = started.elapsed() / TIMED_SIGNATURES;
    report
        .note(Level::Ok, format!("one Ed25519 signature takes about {} µs on one session", per_signature.as_micros()));
}

/// Tries X25519 key generation with a session (non-token) object.
fn probe_x25519(token: &Token, report: &mut Report) {
    let Ok(mut session) = token.session() else { return };
    let public = [Attribute::Token(false), Attribute::EcParams(X25519_EC_PARAMS.to_vec()), Attribute::Derive(true)];
    let private = [Attribute::Token(false), Attribute::Sensitive(true), Attribute::Derive(true)];
    match session.run("C_GenerateKeyPair", |s| s.generate_key_pair(&Mechanism::EccMontgomeryKeyPairGen, &public, &private)) {
        Ok((public, private)) => {
            let _ = session.run("C_DestroyObject", |s| s.destroy_object(private));
            let _ = session.run("C_DestroyObject", |s| s.destroy_object(public));
            report.note(Level::Ok, "X25519 key generation works (Molt keeps X25519 keys in software anyway)");
        }
        Err(failure) => report.note(
            Level::Quirk,
            format!("X25519 key generation is refused ({failure}); Molt keeps X25519 encryption keys in software, so nothing to do"),
        ),
    }
}

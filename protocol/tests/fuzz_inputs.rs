//! Replays the committed fuzz seeds and regressions (`fuzz/seeds/<target>/`,
//! `fuzz/regressions/<target>/`) through the decoders on every test run, so a crash once
//! found by a fuzzer stays fixed without running the fuzzer in CI.

use std::path::{Path, PathBuf};

use molt_protocol::cert::{Certificate, RevocationList, Serial, Validity, issue_root};
use molt_protocol::envelope::EnvelopeView;
use molt_protocol::frame::{Frame, FrameReader};
use molt_protocol::keys::{KeyBinding, SigningKey};
use molt_protocol::receipt::Receipt;
use molt_protocol::{AgentId, EdgeId, MessageId, UnixMillis};

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut found = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_file() && path.file_name().is_some_and(|n| n != ".gitkeep") {
                found.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    found
}

#[test]
fn every_target_has_seeds() {
    for target in ["envelope", "frame", "receipt", "key_binding", "certificate", "revocation_list", "ids"] {
        assert!(!inputs(target).is_empty(), "no committed inputs for {target}");
    }
}

#[test]
fn envelope_inputs() {
    let key = SigningKey::from_bytes(&[1; 32]).public_key();
    for (_, bytes) in inputs("envelope") {
        if let Ok(view) = EnvelopeView::decode(&bytes) {
            let _ = view.verify(&key);
        }
    }
}

#[test]
fn frame_inputs() {
    for (path, bytes) in inputs("frame") {
        let mut reader = FrameReader::new();
        reader.extend(&bytes);
        while let Ok(Some(frame)) = reader.next_frame() {
            let encoded = frame.encode();
            assert_eq!(Frame::decode_body(&encoded[4..]).as_ref(), Ok(&frame), "{}", path.display());
        }
        let _ = Frame::decode_body(&bytes);
    }
}

#[test]
fn receipt_and_binding_inputs() {
    for (path, bytes) in inputs("receipt") {
        if let Ok(receipt) = Receipt::decode(&bytes) {
            assert_eq!(receipt.encode(), bytes, "{}", path.display());
        }
    }
    for (path, bytes) in inputs("key_binding") {
        if let Ok(binding) = KeyBinding::decode(&bytes) {
            assert_eq!(binding.encode(), bytes, "{}", path.display());
        }
    }
}

#[test]
fn certificate_and_crl_inputs() {
    let root_key = SigningKey::from_bytes(&[9; 32]);
    let validity = Validity { not_before: UnixMillis(1_700_000_000_000), not_after: UnixMillis(1_900_000_000_000) };
    let root = issue_root(&root_key, "fuzz root", validity, Serial([1; 16])).unwrap();
    for (_, bytes) in inputs("certificate") {
        let _ = Certificate::from_der(&bytes);
    }
    for (_, bytes) in inputs("revocation_list") {
        let _ = RevocationList::from_der_verified(&bytes, &root);
    }
}

#[test]
fn id_inputs() {
    for (path, bytes) in inputs("ids") {
        let Ok(text) = std::str::from_utf8(&bytes) else { continue };
        if let Ok(id) = text.parse::<AgentId>() {
            assert_eq!(id.to_string(), text, "{}", path.display());
        }
        if let Ok(id) = text.parse::<EdgeId>() {
            assert_eq!(id.to_string(), text, "{}", path.display());
        }
        if let Ok(id) = text.parse::<MessageId>() {
            assert_eq!(id.to_string(), text, "{}", path.display());
        }
    }
}

//! Ceremony transcripts: JSON lines, hash-chained and signed.
//!
//! Each line is `{"entry":{…},"signature":"<hex>"}`. The signature is Ed25519, by the
//! ceremony key, over [`TRANSCRIPT_CONTEXT`] followed by the exact bytes of the `entry`
//! object as they appear in the line (nothing is re-encoded). Each entry carries its
//! sequence number and the SHA-256 of the whole previous line, so removing, reordering
//! or editing a line breaks the chain or a signature. The first entry (`begin`) names
//! the signing public key; the last (`end`) lists every output with its SHA-256.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use molt_protocol::keys::{PublicKey, SignError, Signature, Signer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Domain separation for transcript signatures.
pub const TRANSCRIPT_CONTEXT: &[u8] = b"molt/ceremony-transcript/v1\n";
/// Longest transcript accepted by the verifier.
pub const TRANSCRIPT_BYTES_MAX: usize = 4 * 1024 * 1024;
const LINE_PREFIX: &str = "{\"entry\":";
const SIGNATURE_HEX_LEN: usize = 128;

/// One step of a ceremony.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    /// Hex SHA-256 of the previous line (64 zeros for the first).
    pub prev: String,
    /// Unix seconds when the step was recorded.
    pub time: u64,
    /// `begin`, then steps such as `key-generated`, `certificate-issued`, then `end`.
    pub event: String,
    /// The step's facts; `begin` holds `signer_public_key`, `end` holds `outputs`.
    pub detail: BTreeMap<String, serde_json::Value>,
}

/// Builds a transcript in memory; the caller writes it when the ceremony succeeded.
pub struct TranscriptWriter<'s> {
    signer: &'s dyn Signer,
    lines: Vec<String>,
    previous: [u8; 32],
}

impl std::fmt::Debug for TranscriptWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TranscriptWriter").field("lines", &self.lines.len()).finish_non_exhaustive()
    }
}

impl<'s> TranscriptWriter<'s> {
    /// Starts with a `begin` entry naming the signer's public key.
    pub fn begin(
        signer: &'s dyn Signer,
        time: u64,
        mut detail: BTreeMap<String, serde_json::Value>,
    ) -> Result<TranscriptWriter<'s>, SignError> {
        let mut writer = TranscriptWriter { signer, lines: Vec::new(), previous: [0; 32] };
        detail.insert("signer_public_key".into(), hex(signer.public_key().as_bytes()).into());
        writer.record(time, "begin", detail)?;
        Ok(writer)
    }

    /// Appends one signed entry.
    pub fn record(
        &mut self,
        time: u64,
        event: &str,
        detail: BTreeMap<String, serde_json::Value>,
    ) -> Result<(), SignError> {
        let entry =
            Entry { seq: self.lines.len() as u64, prev: hex(&self.previous), time, event: event.to_owned(), detail };
        // Invariant: the entry holds only strings, numbers and JSON values, which encode.
        let entry_json = serde_json::to_string(&entry).unwrap_or_else(|_| unreachable!("entries encode"));
        let signature = self.signer.try_sign(&signed_message(entry_json.as_bytes()))?;
        let line = format!("{LINE_PREFIX}{entry_json},\"signature\":\"{}\"}}", hex(&signature.0));
        self.previous = Sha256::digest(line.as_bytes()).into();
        self.lines.push(line);
        Ok(())
    }

    /// Appends the `end` entry listing every output, and returns the text.
    pub fn finish(mut self, time: u64, outputs: &[(String, [u8; 32])]) -> Result<String, SignError> {
        let listed: Vec<serde_json::Value> =
            outputs.iter().map(|(path, digest)| serde_json::json!({ "path": path, "sha256": hex(digest) })).collect();
        let mut detail = BTreeMap::new();
        detail.insert("outputs".into(), serde_json::Value::Array(listed));
        self.record(time, "end", detail)?;
        let mut text = self.lines.join("\n");
        text.push('\n');
        Ok(text)
    }
}

/// Why a transcript does not verify. Every variant names the line (from 1).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TranscriptError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("transcript is larger than {TRANSCRIPT_BYTES_MAX} bytes")]
    TooLarge,
    #[error("transcript is empty")]
    Empty,
    #[error("line {line}: not a transcript line ({detail})")]
    Malformed { line: usize, detail: String },
    #[error("line {line}: sequence number {found}, expected {expected} (a line was removed or reordered)")]
    Sequence { line: usize, found: u64, expected: u64 },
    #[error("line {line}: hash chain broken (the previous line was changed, removed or reordered)")]
    Chain { line: usize },
    #[error("line {line}: signature does not verify (the line was changed)")]
    Signature { line: usize },
    #[error("line 1: the first entry is not `begin` with a valid signer_public_key")]
    NoBegin,
    #[error("the signing key {found} is not the expected key {expected}")]
    UnexpectedSigner { expected: String, found: String },
    #[error("line {line}: the transcript does not end with an `end` entry (truncated?)")]
    NoEnd { line: usize },
    #[error("output {path}: sha256 is {found}, the transcript records {recorded}")]
    OutputMismatch { path: String, recorded: String, found: String },
}

/// What a verified transcript says.
#[derive(Debug)]
pub struct VerifiedTranscript {
    pub signer: PublicKey,
    pub entries: Vec<Entry>,
    /// Outputs recorded by `end`: path, recorded sha256, and whether the file was found
    /// next to the transcript (a file that was found always matched).
    pub outputs: Vec<(String, String, bool)>,
}

/// Verifies `path`: chain, sequence, signatures, `begin` and `end`, and the SHA-256 of
/// every recorded output found (relative to the transcript's directory). With
/// `expected_signer`, the signing key must be that key.
pub fn verify_file(path: &Path, expected_signer: Option<&PublicKey>) -> Result<VerifiedTranscript, TranscriptError> {
    let metadata = std::fs::metadata(path).map_err(|source| TranscriptError::Read { path: path.into(), source })?;
    if metadata.len() > TRANSCRIPT_BYTES_MAX as u64 {
        return Err(TranscriptError::TooLarge);
    }
    let text = std::fs::read_to_string(path).map_err(|source| TranscriptError::Read { path: path.into(), source })?;
    let mut verified = verify_text(&text, expected_signer)?;
    let base = path.parent().unwrap_or(Path::new("."));
    for (output, recorded, found) in &mut verified.outputs {
        let Ok(bytes) = std::fs::read(base.join(&*output)) else { continue };
        let digest = hex(&Sha256::digest(&bytes));
        if digest != *recorded {
            return Err(TranscriptError::OutputMismatch {
                path: output.clone(),
                recorded: recorded.clone(),
                found: digest,
            });
        }
        *found = true;
    }
    Ok(verified)
}

/// Verifies transcript text (outputs are not looked at).
pub fn verify_text(text: &str, expected_signer: Option<&PublicKey>) -> Result<VerifiedTranscript, TranscriptError> {
    if text.len() > TRANSCRIPT_BYTES_MAX {
        return Err(TranscriptError::TooLarge);
    }
    let lines: Vec<&str> = text.strip_suffix('\n').unwrap_or(text).split('\n').collect();
    if text.is_empty() {
        return Err(TranscriptError::Empty);
    }
    let mut previous = [0u8; 32];
    let mut signer: Option<PublicKey> = None;
    let mut entries = Vec::with_capacity(lines.len());
    for (index, line) in lines.iter().enumerate() {
        let number = index + 1;
        let (entry_json, signature) =
            split_line(line).map_err(|detail| TranscriptError::Malformed { line: number, detail })?;
        let entry: Entry = serde_json::from_str(entry_json)
            .map_err(|error| TranscriptError::Malformed { line: number, detail: error.to_string() })?;
        if entry.seq != index as u64 {
            return Err(TranscriptError::Sequence { line: number, found: entry.seq, expected: index as u64 });
        }
        if entry.prev != hex(&previous) {
            return Err(TranscriptError::Chain { line: number });
        }
        if index == 0 {
            signer = Some(begin_signer(&entry).ok_or(TranscriptError::NoBegin)?);
        }
        // Invariant: set on the first line.
        let key = signer.as_ref().unwrap_or_else(|| unreachable!("signer read from line 1"));
        key.verify(&signed_message(entry_json.as_bytes()), &signature)
            .map_err(|_| TranscriptError::Signature { line: number })?;
        previous = Sha256::digest(line.as_bytes()).into();
        entries.push(entry);
    }
    let signer = signer.ok_or(TranscriptError::NoBegin)?;
    if let Some(expected) = expected_signer {
        if *expected != signer {
            return Err(TranscriptError::UnexpectedSigner {
                expected: hex(expected.as_bytes()),
                found: hex(signer.as_bytes()),
            });
        }
    }
    let last = entries.last().ok_or(TranscriptError::Empty)?;
    if last.event != "end" || entries.len() < 2 {
        return Err(TranscriptError::NoEnd { line: entries.len() });
    }
    let outputs = end_outputs(last).ok_or(TranscriptError::Malformed {
        line: entries.len(),
        detail: "the end entry has no valid outputs list".into(),
    })?;
    Ok(VerifiedTranscript { signer, entries, outputs })
}

/// SHA-256 of `bytes`, for output fingerprints.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

fn signed_message(entry_json: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(TRANSCRIPT_CONTEXT.len() + entry_json.len());
    message.extend_from_slice(TRANSCRIPT_CONTEXT);
    message.extend_from_slice(entry_json);
    message
}

fn split_line(line: &str) -> Result<(&str, Signature), String> {
    let body = line.strip_prefix(LINE_PREFIX).ok_or("it does not start with {\"entry\":")?;
    let suffix_len = ",\"signature\":\"".len() + SIGNATURE_HEX_LEN + "\"}".len();
    if body.len() < suffix_len || !body.is_char_boundary(body.len() - suffix_len) {
        return Err("it has no signature".into());
    }
    let (entry_json, suffix) = body.split_at(body.len() - suffix_len);
    let signature_hex = suffix
        .strip_prefix(",\"signature\":\"")
        .and_then(|rest| rest.strip_suffix("\"}"))
        .ok_or("it does not end with the signature")?;
    let bytes = data_encoding::HEXLOWER.decode(signature_hex.as_bytes()).map_err(|_| "the signature is not hex")?;
    let signature = Signature::from_slice(&bytes).ok_or("the signature is not 64 bytes")?;
    Ok((entry_json, signature))
}

fn begin_signer(entry: &Entry) -> Option<PublicKey> {
    if entry.event != "begin" {
        return None;
    }
    let text = entry.detail.get("signer_public_key")?.as_str()?;
    let bytes = data_encoding::HEXLOWER.decode(text.as_bytes()).ok()?;
    PublicKey::from_slice(&bytes).ok()
}

fn end_outputs(entry: &Entry) -> Option<Vec<(String, String, bool)>> {
    let listed = entry.detail.get("outputs")?.as_array()?;
    listed
        .iter()
        .map(|output| {
            let path = output.get("path")?.as_str()?;
            let digest = output.get("sha256")?.as_str()?;
            Some((path.to_owned(), digest.to_owned(), false))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use molt_protocol::keys::SigningKey;

    use super::*;

    fn transcript(key: &SigningKey) -> String {
        let mut detail = BTreeMap::new();
        detail.insert("kind".into(), "root".into());
        let mut writer = TranscriptWriter::begin(key, 1, detail).unwrap();
        let mut step = BTreeMap::new();
        step.insert("serial".into(), "0102".into());
        writer.record(2, "certificate-issued", step).unwrap();
        writer.finish(3, &[("root.pem".into(), sha256(b"pem"))]).unwrap()
    }

    #[test]
    fn a_transcript_verifies_and_any_tampering_is_detected() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let text = transcript(&key);
        let verified = verify_text(&text, Some(&key.public_key())).unwrap();
        assert_eq!(verified.entries.len(), 3);
        assert_eq!(verified.outputs[0].1, hex(&sha256(b"pem")));

        let other = SigningKey::from_bytes(&[2; 32]);
        assert!(matches!(verify_text(&text, Some(&other.public_key())), Err(TranscriptError::UnexpectedSigner { .. })));
        // A whole transcript forged with another key verifies only without a pinned key.
        assert!(verify_text(&transcript(&other), None).is_ok());

        let lines: Vec<&str> = text.lines().collect();
        let edited = text.replace("0102", "0103");
        assert!(matches!(verify_text(&edited, None), Err(TranscriptError::Signature { line: 2 })));
        let dropped = format!("{}\n{}\n", lines[0], lines[2]);
        assert!(matches!(verify_text(&dropped, None), Err(TranscriptError::Sequence { line: 2, .. })));
        let truncated = format!("{}\n{}\n", lines[0], lines[1]);
        assert!(matches!(verify_text(&truncated, None), Err(TranscriptError::NoEnd { .. })));
        let swapped_time = text.replacen("\"time\":1", "\"time\":9", 1);
        assert!(matches!(verify_text(&swapped_time, None), Err(TranscriptError::Signature { line: 1 })));
        assert!(matches!(verify_text("", None), Err(TranscriptError::Empty)));
        assert!(matches!(verify_text("{}\n", None), Err(TranscriptError::Malformed { line: 1, .. })));
        // Re-signing a changed line with another key breaks the chain to the next line.
        let mut forged = TranscriptWriter::begin(&other, 1, BTreeMap::new()).unwrap();
        forged.record(2, "x", BTreeMap::new()).unwrap();
        let spliced = format!("{}\n{}\n{}\n", forged.lines[0], lines[1], lines[2]);
        assert!(matches!(verify_text(&spliced, None), Err(TranscriptError::Chain { line: 2 })));
    }
}

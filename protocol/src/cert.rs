//! X.509 certificates (placeholder, being written).

/// Why PEM text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    #[error("no `{0}` PEM block found")]
    Missing(String),
    #[error("PEM block is not valid base64")]
    BadBase64,
}

pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = data_encoding::BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub fn pem_decode(label: &str, text: &str) -> Result<Vec<u8>, PemError> {
    pem_decode_all(label, text)?.into_iter().next().ok_or_else(|| PemError::Missing(label.to_owned()))
}

pub fn pem_decode_all(label: &str, text: &str) -> Result<Vec<Vec<u8>>, PemError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let Some(stop) = after.find(&end) else { break };
        let body: String = after[..stop].chars().filter(|c| !c.is_whitespace()).collect();
        blocks.push(data_encoding::BASE64.decode(body.as_bytes()).map_err(|_| PemError::BadBase64)?);
        rest = &after[stop + end.len()..];
    }
    if blocks.is_empty() {
        return Err(PemError::Missing(label.to_owned()));
    }
    Ok(blocks)
}

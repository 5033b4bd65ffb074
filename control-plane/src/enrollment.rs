//! Enrollment tokens and edge enrollment.
//!
//! An admin creates a token bound to an org and a region ([`create_token`]); the secret
//! is shown once and only its SHA-256 is stored. The operator of a new edge hands it to
//! `molt-edge enroll`, which proves possession of the edge's fresh Ed25519 key and calls
//! [`enroll`]. The token is consumed by one conditional `UPDATE` (unused, unrevoked, not
//! expired), so of two concurrent enrollments with the same token exactly one wins; the
//! winner's certificate is then issued by [`Authority::issue_with`]. Every refusal
//! (unknown, used, revoked or expired token, a bad proof) writes nothing.

use std::fmt;
use std::time::Duration;

use molt_protocol::ids::EdgeId;
use molt_protocol::keys::{PublicKey, Signature};
use molt_protocol::time::UnixMillis;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use sqlx::Row as _;
use sqlx::any::AnyRow;
use zeroize::Zeroizing;

use crate::ca::{self, Authority, IssueCertificateError, IssuedCertificate, LeafKind, LeafOptions, PossessionProof};
use crate::db::Database;
pub use crate::ids::EnrollmentTokenId;
use crate::ids::{AdminKeyId, OrgId};

/// Text in front of every enrollment token.
pub const ENROLLMENT_TOKEN_PREFIX: &str = "molt_enroll_";
/// Random bytes in a token.
pub const ENROLLMENT_TOKEN_RANDOM_BYTES: usize = 32;
/// Characters after the prefix: 32 bytes in unpadded base64url.
pub const ENROLLMENT_TOKEN_ENCODED_LEN: usize = 43;
/// Lifetime of a token when the admin names none.
pub const TOKEN_TTL_DEFAULT: Duration = Duration::from_secs(24 * 3600);
/// Longest lifetime a token may be given.
pub const TOKEN_TTL_MAX: Duration = Duration::from_secs(30 * 24 * 3600);
/// Shortest lifetime a token may be given.
pub const TOKEN_TTL_MIN: Duration = Duration::from_secs(60);
/// Shortest lifetime of an enrolled edge's certificates (the longest is
/// [`ca::LEAF_VALIDITY`], also the default).
pub const CERTIFICATE_VALIDITY_MIN: Duration = Duration::from_secs(60);
/// Longest region name (as the edge's config and `Register` allow).
pub const REGION_LEN_MAX: usize = 63;

const _: () = assert!(TOKEN_TTL_MIN.as_secs() <= TOKEN_TTL_DEFAULT.as_secs());
const _: () = assert!(TOKEN_TTL_DEFAULT.as_secs() <= TOKEN_TTL_MAX.as_secs());
const _: () = assert!(CERTIFICATE_VALIDITY_MIN.as_secs() < ca::LEAF_VALIDITY.as_secs());
const _: () = assert!(ENROLLMENT_TOKEN_RANDOM_BYTES.div_ceil(3) * 4 - 1 == ENROLLMENT_TOKEN_ENCODED_LEN);

/// A secret enrollment token. Zeroed on drop; `Debug` does not show it.
pub struct EnrollmentToken(Zeroizing<String>);

impl EnrollmentToken {
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; ENROLLMENT_TOKEN_RANDOM_BYTES]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        let encoded = Zeroizing::new(data_encoding::BASE64URL_NOPAD.encode(bytes.as_ref()));
        EnrollmentToken(Zeroizing::new(format!("{ENROLLMENT_TOKEN_PREFIX}{}", encoded.as_str())))
    }

    /// Accepts text of the token's shape; anything else cannot be a token.
    pub fn parse(text: &str) -> Option<Self> {
        let encoded = text.strip_prefix(ENROLLMENT_TOKEN_PREFIX)?;
        let well_formed = encoded.len() == ENROLLMENT_TOKEN_ENCODED_LEN
            && data_encoding::BASE64URL_NOPAD
                .decode(encoded.as_bytes())
                .is_ok_and(|bytes| bytes.len() == ENROLLMENT_TOKEN_RANDOM_BYTES);
        well_formed.then(|| EnrollmentToken(Zeroizing::new(text.to_owned())))
    }

    /// The token text, to show once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn hash(&self) -> Vec<u8> {
        Sha256::digest(self.0.as_bytes()).to_vec()
    }
}

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnrollmentToken(<redacted>)")
    }
}

/// What an admin asks for.
#[derive(Clone, Debug)]
pub struct NewToken {
    pub org: OrgId,
    pub region: String,
    pub ttl: Duration,
    pub certificate_validity: Duration,
}

/// A token as stored, without its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: EnrollmentTokenId,
    pub org: OrgId,
    pub region: String,
    pub certificate_validity: Duration,
    pub created_by: String,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub used_at: Option<UnixMillis>,
    pub used_by_edge: Option<String>,
    pub revoked_at: Option<UnixMillis>,
}

/// Why a token could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateTokenError {
    #[error("failed to create an enrollment token: no such org")]
    OrgNotFound,
    #[error("failed to create an enrollment token: the ttl must be {}s to {}s", TOKEN_TTL_MIN.as_secs(), TOKEN_TTL_MAX.as_secs())]
    Ttl,
    #[error(
        "failed to create an enrollment token: the certificate validity must be {}s to {}s",
        CERTIFICATE_VALIDITY_MIN.as_secs(),
        ca::LEAF_VALIDITY.as_secs()
    )]
    CertificateValidity,
    #[error(
        "failed to create an enrollment token: a region is 1 to {REGION_LEN_MAX} lower-case letters, digits and '-'"
    )]
    Region,
    #[error("failed to create an enrollment token: storage")]
    Store(#[source] sqlx::Error),
    #[error("failed to create an enrollment token")]
    Query(#[source] crate::db::QueryError),
}

/// Why a token could not be revoked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevokeTokenError {
    #[error("failed to revoke the enrollment token: no such token")]
    NotFound,
    #[error("failed to revoke the enrollment token: storage")]
    Store(#[source] sqlx::Error),
}

/// Why an enrollment was refused or failed. Nothing is written on a refusal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    #[error("enrollment refused: the token is not a known enrollment token")]
    UnknownToken,
    #[error("enrollment refused: the token was already used")]
    TokenUsed,
    #[error("enrollment refused: the token was revoked")]
    TokenRevoked,
    #[error("enrollment refused: the token expired")]
    TokenExpired,
    #[error("enrollment refused: {0}")]
    Proof(#[from] ca::ProofError),
    #[error("enrollment failed: issuing the certificate")]
    Issue(#[source] IssueCertificateError),
    #[error("enrollment failed: storage")]
    Store(#[source] sqlx::Error),
}

/// What the edge sends to enroll.
#[derive(Clone, Debug)]
pub struct EnrollRequest<'a> {
    pub token: &'a str,
    pub public_key: PublicKey,
    pub timestamp: UnixMillis,
    pub signature: Signature,
}

/// An enrolled edge's certificate and where it belongs.
#[derive(Clone, Debug)]
pub struct Enrolled {
    pub edge_id: EdgeId,
    pub org: OrgId,
    pub region: String,
    pub issued: IssuedCertificate,
}

/// Stores a new token; returns its record and the secret (to show once).
pub async fn create_token(
    db: &Database,
    request: &NewToken,
    created_by: &AdminKeyId,
    now: UnixMillis,
) -> Result<(TokenRecord, EnrollmentToken), CreateTokenError> {
    if !(TOKEN_TTL_MIN..=TOKEN_TTL_MAX).contains(&request.ttl) {
        return Err(CreateTokenError::Ttl);
    }
    if !(CERTIFICATE_VALIDITY_MIN..=ca::LEAF_VALIDITY).contains(&request.certificate_validity) {
        return Err(CreateTokenError::CertificateValidity);
    }
    if !is_region(&request.region) {
        return Err(CreateTokenError::Region);
    }
    if db.org(&request.org).await.map_err(CreateTokenError::Query)?.is_none() {
        return Err(CreateTokenError::OrgNotFound);
    }
    let token = EnrollmentToken::generate();
    let record = TokenRecord {
        id: EnrollmentTokenId::generate(),
        org: request.org.clone(),
        region: request.region.clone(),
        certificate_validity: request.certificate_validity,
        created_by: created_by.to_string(),
        created_at: now,
        expires_at: now.saturating_add(request.ttl),
        used_at: None,
        used_by_edge: None,
        revoked_at: None,
    };
    sqlx::query(
        "INSERT INTO enrollment_tokens (id, token_hash, org_id, region, certificate_validity_ms, created_by, \
         created_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(record.id.to_string())
    .bind(token.hash())
    .bind(record.org.to_string())
    .bind(record.region.clone())
    .bind(duration_to_db(record.certificate_validity))
    .bind(record.created_by.clone())
    .bind(to_db(now))
    .bind(to_db(record.expires_at))
    .execute(db.pool())
    .await
    .map_err(CreateTokenError::Store)?;
    tracing::info!(token = %record.id, org = %record.org, region = %record.region, "enrollment token created");
    Ok((record, token))
}

/// Tokens ordered by id, after `after`, at most `limit`.
pub async fn list_tokens(
    db: &Database,
    after: Option<&EnrollmentTokenId>,
    limit: u32,
) -> Result<Vec<TokenRecord>, sqlx::Error> {
    let rows =
        sqlx::query(concat!("SELECT ", token_columns!(), " FROM enrollment_tokens WHERE id > $1 ORDER BY id LIMIT $2"))
            .bind(after.map_or_else(String::new, ToString::to_string))
            .bind(i64::from(limit))
            .fetch_all(db.pool())
            .await?;
    rows.iter().map(token_from_row).collect()
}

/// Revokes a token; revoking it again (or after use) changes nothing.
pub async fn revoke_token(
    db: &Database,
    id: &EnrollmentTokenId,
    now: UnixMillis,
) -> Result<TokenRecord, RevokeTokenError> {
    sqlx::query("UPDATE enrollment_tokens SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL")
        .bind(to_db(now))
        .bind(id.to_string())
        .execute(db.pool())
        .await
        .map_err(RevokeTokenError::Store)?;
    let row = sqlx::query(concat!("SELECT ", token_columns!(), " FROM enrollment_tokens WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(RevokeTokenError::Store)?
        .ok_or(RevokeTokenError::NotFound)?;
    let record = token_from_row(&row).map_err(RevokeTokenError::Store)?;
    tracing::info!(token = %record.id, "enrollment token revoked");
    Ok(record)
}

/// Checks the token and the proof of possession, consumes the token and issues the edge
/// certificate (see the module docs).
pub async fn enroll(
    db: &Database,
    authority: &Authority,
    request: &EnrollRequest<'_>,
    now: UnixMillis,
) -> Result<Enrolled, EnrollError> {
    let token = EnrollmentToken::parse(request.token).ok_or(EnrollError::UnknownToken)?;
    let hash = token.hash();
    let record = token_by_hash(db, &hash).await?.ok_or(EnrollError::UnknownToken)?;
    refusal(&record, now).map_or(Ok(()), Err)?;
    let proof = PossessionProof::verify(
        LeafKind::Edge,
        &record.org,
        &request.public_key,
        request.timestamp,
        &request.signature,
        now,
    )?;
    let edge_id = EdgeId::from_inception_key(&request.public_key);
    let consumed = sqlx::query(
        "UPDATE enrollment_tokens SET used_at_ms = $1, used_by_edge = $2 WHERE token_hash = $3 \
         AND used_at_ms IS NULL AND revoked_at_ms IS NULL AND expires_at_ms > $1",
    )
    .bind(to_db(now))
    .bind(edge_id.to_string())
    .bind(hash.clone())
    .execute(db.pool())
    .await
    .map_err(EnrollError::Store)?
    .rows_affected();
    if consumed != 1 {
        // Another enrollment (or a revocation) won the race: say which.
        let record = token_by_hash(db, &hash).await?.ok_or(EnrollError::UnknownToken)?;
        return Err(refusal(&record, now).unwrap_or(EnrollError::TokenUsed));
    }
    let options = LeafOptions { lifetime: record.certificate_validity, edge_id: None };
    let issued = match authority.issue_with(db, &proof, &options, &[], now).await {
        Ok(issued) => issued,
        Err(error) => {
            // Give the token back: the operator can retry once the CA works.
            let _ = sqlx::query("UPDATE enrollment_tokens SET used_at_ms = NULL, used_by_edge = NULL WHERE id = $1")
                .bind(record.id.to_string())
                .execute(db.pool())
                .await;
            return Err(EnrollError::Issue(error));
        }
    };
    tracing::info!(edge = %edge_id, org = %record.org, region = %record.region, token = %record.id, "edge enrolled");
    Ok(Enrolled { edge_id, org: record.org, region: record.region, issued })
}

/// The token's record if it can still enroll at `now` (read-only; the edge asks which org
/// to sign its proof for).
pub async fn usable_token(db: &Database, token: &str, now: UnixMillis) -> Result<TokenRecord, EnrollError> {
    let token = EnrollmentToken::parse(token).ok_or(EnrollError::UnknownToken)?;
    let record = token_by_hash(db, &token.hash()).await?.ok_or(EnrollError::UnknownToken)?;
    refusal(&record, now).map_or(Ok(record), Err)
}

/// Why `record` cannot enroll at `now`, if it cannot.
fn refusal(record: &TokenRecord, now: UnixMillis) -> Option<EnrollError> {
    if record.revoked_at.is_some() {
        Some(EnrollError::TokenRevoked)
    } else if record.used_at.is_some() {
        Some(EnrollError::TokenUsed)
    } else if record.expires_at <= now {
        Some(EnrollError::TokenExpired)
    } else {
        None
    }
}

/// 1 to [`REGION_LEN_MAX`] lower-case ASCII letters, digits and `-`.
pub fn is_region(text: &str) -> bool {
    (1..=REGION_LEN_MAX).contains(&text.len())
        && text.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
}

async fn token_by_hash(db: &Database, hash: &[u8]) -> Result<Option<TokenRecord>, EnrollError> {
    let row = sqlx::query(concat!("SELECT ", token_columns!(), " FROM enrollment_tokens WHERE token_hash = $1"))
        .bind(hash.to_vec())
        .fetch_optional(db.pool())
        .await
        .map_err(EnrollError::Store)?;
    row.as_ref().map(token_from_row).transpose().map_err(EnrollError::Store)
}

macro_rules! token_columns {
    () => {
        "id, org_id, region, certificate_validity_ms, created_by, created_at_ms, expires_at_ms, used_at_ms, \
         used_by_edge, revoked_at_ms"
    };
}
use token_columns;

fn token_from_row(row: &AnyRow) -> Result<TokenRecord, sqlx::Error> {
    let corrupt = |what: &str| sqlx::Error::Decode(format!("enrollment_tokens.{what}").into());
    let id: String = row.try_get("id")?;
    let org: String = row.try_get("org_id")?;
    let validity: i64 = row.try_get("certificate_validity_ms")?;
    let time = |name: &str| -> Result<Option<UnixMillis>, sqlx::Error> {
        Ok(row.try_get::<Option<i64>, _>(name)?.map(from_db))
    };
    Ok(TokenRecord {
        id: id.parse().map_err(|_| corrupt("id"))?,
        org: org.parse().map_err(|_| corrupt("org_id"))?,
        region: row.try_get("region")?,
        certificate_validity: Duration::from_millis(u64::try_from(validity).map_err(|_| corrupt("validity"))?),
        created_by: row.try_get("created_by")?,
        created_at: from_db(row.try_get("created_at_ms")?),
        expires_at: from_db(row.try_get("expires_at_ms")?),
        used_at: time("used_at_ms")?,
        used_by_edge: row.try_get("used_by_edge")?,
        revoked_at: time("revoked_at_ms")?,
    })
}

fn to_db(time: UnixMillis) -> i64 {
    i64::try_from(time.0).unwrap_or(i64::MAX)
}

fn from_db(millis: i64) -> UnixMillis {
    UnixMillis(u64::try_from(millis).unwrap_or(0))
}

fn duration_to_db(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_documented_shape_and_parse_back() {
        let token = EnrollmentToken::generate();
        assert_eq!(token.expose().len(), ENROLLMENT_TOKEN_PREFIX.len() + ENROLLMENT_TOKEN_ENCODED_LEN);
        let parsed = EnrollmentToken::parse(token.expose()).expect("parses");
        assert_eq!(parsed.hash(), token.hash());
        assert!(!format!("{token:?}").contains(token.expose()));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let token = EnrollmentToken::generate();
        let text = token.expose();
        for bad in [
            "",
            ENROLLMENT_TOKEN_PREFIX,
            &text[..text.len() - 1],
            &format!("{text}A"),
            &text.replace(ENROLLMENT_TOKEN_PREFIX, "molt_admin_"),
            &format!("{ENROLLMENT_TOKEN_PREFIX}{}", "!".repeat(ENROLLMENT_TOKEN_ENCODED_LEN)),
        ] {
            assert!(EnrollmentToken::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn regions_are_bounded_lower_case_names() {
        assert!(is_region("eu-west-1"));
        assert!(is_region(&"a".repeat(REGION_LEN_MAX)));
        for bad in ["", "EU", "eu west", "eu_west", &"a".repeat(REGION_LEN_MAX + 1)] {
            assert!(!is_region(bad), "{bad:?}");
        }
    }
}

//! `molt-edge config migrate`: brings a config file to [`CONFIG_VERSION_CURRENT`].
//!
//! The model: a file's version is its top-level `config_version` key, or
//! [`CONFIG_VERSION_UNVERSIONED`] without it. Each step rewrites the text of version *n*
//! into version *n + 1* ([`STEPS`]), keeping comments and layout; steps run in order
//! until the current version. The result must load as a valid config before anything is
//! written. The original is kept as `FILE.v<n>.bak`, then the new text replaces the file
//! atomically ([`crate::trust::write_atomically`]), with the original's permissions.
//!
//! Version 2 introduced `config_version` itself: the 1 → 2 step adds the key after the
//! file's leading comments. Every key of version 1 means the same in version 2.

use std::path::{Path, PathBuf};

use crate::config::{self, CONFIG_VERSION_CURRENT, CONFIG_VERSION_UNVERSIONED, ConfigError};
use crate::trust::write_atomically;

/// One migration step: the text of version `from`, rewritten as version `from + 1`.
struct Step {
    from: u32,
    rewrite: fn(&str) -> String,
}

/// Every step, in order; the last one produces [`CONFIG_VERSION_CURRENT`].
const STEPS: &[Step] = &[Step { from: 1, rewrite: add_version_key }];

// One step per version after the first.
const _: () = assert!(STEPS.len() as u32 == CONFIG_VERSION_CURRENT - CONFIG_VERSION_UNVERSIONED);

/// What a migration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Migrated {
    /// The file was already at the current version; nothing was written.
    AlreadyCurrent,
    /// The file was rewritten from `from`; the original is at `backup`.
    Rewritten { from: u32, backup: PathBuf },
}

/// Why a file could not be migrated. The file is unchanged in every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    #[error("failed to read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} has no usable config_version: {detail}", path.display())]
    Version { path: PathBuf, detail: String },
    #[error("{} is not a valid config; fix it before migrating: {source}", path.display())]
    Invalid { path: PathBuf, source: ConfigError },
    #[error("the migrated config would not be valid (a bug in the migration): {source}")]
    Result { source: ConfigError },
    #[error("failed to write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// Migrates the file at `path` as the module docs describe.
pub fn migrate_file(path: &Path) -> Result<Migrated, MigrateError> {
    let text = std::fs::read_to_string(path).map_err(|source| MigrateError::Read { path: path.to_owned(), source })?;
    let version = version_of(&text).map_err(|detail| MigrateError::Version { path: path.to_owned(), detail })?;
    // The original must be valid as it stands, so the result can only differ by the steps.
    config::load(path).map_err(|source| MigrateError::Invalid { path: path.to_owned(), source })?;
    if version == CONFIG_VERSION_CURRENT {
        return Ok(Migrated::AlreadyCurrent);
    }
    let migrated = migrate_text(&text, version);
    let base_dir = std::path::absolute(path)
        .ok()
        .and_then(|absolute| absolute.parent().map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from("."));
    config::parse(&migrated, &base_dir).map_err(|source| MigrateError::Result { source })?;

    let mode = permissions_of(path);
    let mut backup_name = path.file_name().unwrap_or_default().to_owned();
    backup_name.push(format!(".v{version}.bak"));
    let backup = path.with_file_name(backup_name);
    write_atomically(&backup, text.as_bytes(), mode)
        .map_err(|source| MigrateError::Write { path: backup.clone(), source })?;
    write_atomically(path, migrated.as_bytes(), mode)
        .map_err(|source| MigrateError::Write { path: path.to_owned(), source })?;
    Ok(Migrated::Rewritten { from: version, backup })
}

/// The text migrated from `version` to the current version.
pub fn migrate_text(text: &str, version: u32) -> String {
    STEPS.iter().filter(|step| step.from >= version).fold(text.to_owned(), |text, step| (step.rewrite)(&text))
}

/// The file's version: its `config_version`, or 1 without one.
pub fn version_of(text: &str) -> Result<u32, String> {
    let table: toml::Table = text.parse().map_err(|error: toml::de::Error| error.message().to_owned())?;
    match table.get("config_version") {
        None => Ok(CONFIG_VERSION_UNVERSIONED),
        Some(toml::Value::Integer(version)) => u32::try_from(*version)
            .ok()
            .filter(|version| (CONFIG_VERSION_UNVERSIONED..=CONFIG_VERSION_CURRENT).contains(version))
            .ok_or_else(|| format!("unknown version {version}")),
        Some(other) => Err(format!("expected an integer, found {}", other.type_str())),
    }
}

/// 1 → 2: `config_version = 2` after the leading comment block.
fn add_version_key(text: &str) -> String {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if !(trimmed.starts_with('#') || trimmed.is_empty()) {
            break;
        }
        offset += line.len();
    }
    // Keep a blank line between the comments and the key if the file had one there.
    let (head, rest) = text.split_at(offset);
    let separator = if head.ends_with("\n\n") { "\n" } else { "" };
    let head = head.trim_end_matches('\n');
    let lead = if head.is_empty() { String::new() } else { format!("{head}\n{separator}") };
    format!("{lead}config_version = 2\n\n{}", rest.trim_start_matches('\n'))
}

fn permissions_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).map(|metadata| metadata.permissions().mode() & 0o7777).unwrap_or(0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "# my edge\n# second comment\n\n[identity]\ncertificate_chain = \"edge.pem\"\nprivate_key = \"edge.key\"\n\n[trust]\nanchors = \"roots.pem\" # inline\n";

    #[test]
    fn an_unversioned_file_is_version_1_and_gains_the_key() {
        assert_eq!(version_of(V1), Ok(1));
        let migrated = migrate_text(V1, 1);
        assert_eq!(version_of(&migrated), Ok(CONFIG_VERSION_CURRENT));
        assert!(
            migrated.starts_with("# my edge\n# second comment\n\nconfig_version = 2\n\n[identity]\n"),
            "{migrated}"
        );
        assert!(migrated.ends_with("anchors = \"roots.pem\" # inline\n"), "comments are kept");
        let old = config::parse(V1, Path::new("/etc/molt")).unwrap();
        let new = config::parse(&migrated, Path::new("/etc/molt")).unwrap();
        assert_eq!(old, new, "every key means the same");
    }

    #[test]
    fn a_file_without_comments_gets_the_key_first() {
        let text = "[identity]\ncertificate_chain = \"a\"\nprivate_key = \"b\"\n[trust]\nanchors = \"c\"\n";
        let migrated = migrate_text(text, 1);
        assert!(migrated.starts_with("config_version = 2\n\n[identity]\n"), "{migrated}");
    }

    #[test]
    fn config_check_reports_an_unknown_version_with_its_key_and_line() {
        let newer = format!("# comment\nconfig_version = 3\n{}", V1.replace("anchors = ", "anchor = "));
        let error = config::parse(&newer, Path::new("/etc/molt")).unwrap_err();
        let problems = error.problems();
        assert_eq!(problems.len(), 3, "{error}");
        assert_eq!((problems[0].key.as_deref(), problems[0].line), (Some("config_version"), Some(2)));
        assert!(problems[0].to_string().contains("newer than this molt-edge reads"), "{error}");
        let wrong_type = config::parse(&format!("config_version = \"2\"\n{V1}"), Path::new("/")).unwrap_err();
        assert!(wrong_type.to_string().contains("config_version: expected integer, found string"), "{wrong_type}");
        assert!(config::parse(&format!("config_version = 1\n{V1}"), Path::new("/")).is_ok());
    }

    #[test]
    fn versions_out_of_range_are_named() {
        assert_eq!(version_of("config_version = 2\n"), Ok(2));
        assert!(version_of("config_version = 7\n").unwrap_err().contains("unknown version 7"));
        assert!(version_of("config_version = \"2\"\n").unwrap_err().contains("expected an integer"));
    }

    #[test]
    fn migrating_a_file_keeps_a_backup_and_is_idempotent() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, V1).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let Migrated::Rewritten { from: 1, backup } = migrate_file(&path).unwrap() else { panic!("rewritten") };
        assert_eq!(std::fs::read_to_string(&backup).unwrap(), V1);
        assert_eq!(version_of(&std::fs::read_to_string(&path).unwrap()), Ok(2));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(migrate_file(&path).unwrap(), Migrated::AlreadyCurrent);
    }

    #[test]
    fn an_invalid_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        let broken = format!("{V1}\n[limits]\nmessages_per_minute = 0\n");
        std::fs::write(&path, &broken).unwrap();
        let error = migrate_file(&path).unwrap_err();
        assert!(matches!(error, MigrateError::Invalid { .. }), "{error}");
        assert!(error.to_string().contains("limits.messages_per_minute"), "{error}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), broken);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no backup of a refused file");
    }
}

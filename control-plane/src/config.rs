//! The service's configuration: defaults, then a TOML file, then `MOLT_CP_*` environment
//! variables, then command-line flags, each overriding the one before.
//!
//! The file is read into [`ConfigFile`], its own serde type: a syntax error or an unknown
//! key stops there, with the line. Then every setting is validated from wherever it came,
//! and *all* the problems are reported together, each naming its key and origin
//! (`database.max_connections (file)`, `MOLT_CP_LISTEN (environment)`).
//!
//! | file key                       | environment                            | default |
//! |--------------------------------|----------------------------------------|---------|
//! | `listen_addr`                  | `MOLT_CP_LISTEN`                       | `127.0.0.1:8080` |
//! | `grpc_listen_addr`             | `MOLT_CP_GRPC_LISTEN`                  | off (no gRPC listener) |
//! | `database.url`                 | `MOLT_CP_DATABASE_URL`                 | `sqlite:molt-control-plane.db` |
//! | `database.max_connections`     | `MOLT_CP_DATABASE_MAX_CONNECTIONS`     | 8 |
//! | `database.acquire_timeout_ms`  | `MOLT_CP_DATABASE_ACQUIRE_TIMEOUT_MS`  | 5000 |
//! | `log.level`                    | `MOLT_CP_LOG_LEVEL`                    | `info` |
//! | `log.format`                   | `MOLT_CP_LOG_FORMAT`                   | `text` |
//! | `ca.key_encryption_key_file`   | `MOLT_CP_KEK` (the key itself, hex)    | `<database file>.kek` (SQLite only) |
//! | `ca.root_certificate_file`     |                                        | generated development root |
//! | `ca.root_key_file`             |                                        | (with the certificate file) |
//! | `ca.pkcs11.module`             |                                        | no HSM: org CA keys sealed in the database |
//! | `ca.pkcs11.token_label`        |                                        | (this or `slot`) |
//! | `ca.pkcs11.slot`               |                                        | (this or `token_label`): n-th slot with a token, from 0 |
//! | `ca.pkcs11.pin_file`           |                                        | (this or `pin_env`): file holding the PIN, mode 0600 |
//! | `ca.pkcs11.pin_env`            |                                        | (this or `pin_file`): name of the variable holding the PIN |
//! | `ca.pkcs11.pool_size`          |                                        | 4 sessions (1 to 64) |
//! | `ca.pkcs11.key_label_prefix`   |                                        | `molt-org-ca-` |
//! | `keys.recovery_time_lock_secs` | `MOLT_CP_RECOVERY_TIME_LOCK_SECS`      | 604800 (7 days; 1 s to 90 days) |
//!
//! With a `[ca.pkcs11]` section, new org CA keys are generated inside that token (see
//! [`crate::ca`]); `module` is then required, and exactly one of `token_label` and
//! `slot`, and exactly one of `pin_file` and `pin_env`. The PIN itself is never a config
//! value. A variable named by `pin_env` may start with `MOLT_CP_` without being reported
//! as unknown.
//!
//! Unknown `MOLT_CP_*` variables are reported too: a typo must not go unnoticed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::db::{Backend, DatabaseOptions};

/// Default HTTP address: loopback, so a fresh install is not reachable from outside.
pub const DEFAULT_LISTEN_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
/// Default database: a SQLite file in the working directory, created on first start.
pub const DEFAULT_DATABASE_URL: &str = "sqlite:molt-control-plane.db";
/// Default size of the connection pool.
pub const DEFAULT_DATABASE_MAX_CONNECTIONS: u32 = 8;
/// Largest `database.max_connections`.
pub const DATABASE_MAX_CONNECTIONS_MAX: u32 = 1000;
/// Default wait for a pooled connection.
pub const DEFAULT_DATABASE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `database.acquire_timeout_ms`.
pub const DATABASE_ACQUIRE_TIMEOUT_MAX: Duration = Duration::from_secs(300);
/// Largest `ca.pkcs11.slot` (slot indexes count initialised tokens from 0).
pub const SLOT_INDEX_MAX: u64 = 1023;
/// Prefix of the environment variables read.
pub const ENV_PREFIX: &str = "MOLT_CP_";

const _: () = assert!(DEFAULT_DATABASE_MAX_CONNECTIONS <= DATABASE_MAX_CONNECTIONS_MAX);
const _: () = assert!(DEFAULT_DATABASE_ACQUIRE_TIMEOUT.as_millis() <= DATABASE_ACQUIRE_TIMEOUT_MAX.as_millis());

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// HTTP address of the API.
    pub listen_addr: SocketAddr,
    /// Address of the gRPC service for edges ([`crate::grpc`]); `None`: not served.
    pub grpc_listen_addr: Option<SocketAddr>,
    pub database: DatabaseOptions,
    pub log: LogConfig,
    pub ca: crate::ca::CaOptions,
    pub keys: crate::keys::KeyPolicy,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `tracing` env-filter directive, e.g. `info,molt_control_plane=debug`.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The file's shape. Every key is optional; values keep their TOML type so that a wrong
/// type is reported with the other value errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen_addr: Option<toml::Value>,
    pub grpc_listen_addr: Option<toml::Value>,
    #[serde(default)]
    pub database: DatabaseSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub ca: CaSection,
    #[serde(default)]
    pub keys: KeysSection,
}

/// `[keys]`: agent key management.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysSection {
    pub recovery_time_lock_secs: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSection {
    pub key_encryption_key_file: Option<toml::Value>,
    pub root_certificate_file: Option<toml::Value>,
    pub root_key_file: Option<toml::Value>,
    pub pkcs11: Option<Pkcs11Section>,
}

/// `[ca.pkcs11]`: the token that holds org CA keys. There is deliberately no `pin` key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Section {
    pub module: Option<toml::Value>,
    pub token_label: Option<toml::Value>,
    pub slot: Option<toml::Value>,
    pub pin_file: Option<toml::Value>,
    pub pin_env: Option<toml::Value>,
    pub pool_size: Option<toml::Value>,
    pub key_label_prefix: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSection {
    pub url: Option<toml::Value>,
    pub max_connections: Option<toml::Value>,
    pub acquire_timeout_ms: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub level: Option<toml::Value>,
    pub format: Option<toml::Value>,
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub database_url: Option<String>,
    pub listen_addr: Option<String>,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("failed to read the config file {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("failed to parse the config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:{}", Problems(.0))]
    Invalid(Vec<Problem>),
}

/// One invalid setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file key (`database.url`), or the variable or flag it came from.
    pub key: String,
    pub origin: Origin,
    pub message: String,
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    File,
    Environment,
    Flag,
}

/// Loads the configuration from an optional file, the environment (`MOLT_CP_*` entries
/// of `environment`) and the command line.
pub fn load(
    file: Option<&Path>,
    environment: &BTreeMap<String, String>,
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    let parsed = match file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
            parse_file(&text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })?
        }
        None => ConfigFile::default(),
    };
    validate(parsed, environment, overrides)
}

/// The process environment's `MOLT_CP_*` variables.
pub fn process_environment() -> BTreeMap<String, String> {
    std::env::vars().filter(|(name, _)| name.starts_with(ENV_PREFIX)).collect()
}

/// Parses the file's text; the message names the line and key of the first error.
pub fn parse_file(text: &str) -> Result<ConfigFile, String> {
    toml::from_str(text).map_err(|error| error.to_string().trim_end().to_owned())
}

/// Merges file, environment and overrides, and validates every value.
pub fn validate(
    file: ConfigFile,
    environment: &BTreeMap<String, String>,
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    // The variable `ca.pkcs11.pin_env` names is read for the PIN, so it is not unknown.
    let pin_variable =
        file.ca.pkcs11.as_ref().and_then(|section| section.pin_env.as_ref()?.as_str()?.to_owned().into());
    let mut checker = Checker { environment, problems: Vec::new() };
    checker.unknown_variables(pin_variable.as_deref());

    let listen_addr = checker
        .setting("listen_addr", "MOLT_CP_LISTEN", file.listen_addr, overrides.listen_addr.as_deref(), "--listen")
        .and_then(|input| checker.check(input, parse_listen_addr))
        .unwrap_or(DEFAULT_LISTEN_ADDR);
    let grpc_listen_addr = checker
        .setting("grpc_listen_addr", "MOLT_CP_GRPC_LISTEN", file.grpc_listen_addr, None, "")
        .and_then(|input| checker.check(input, parse_listen_addr));
    let url = checker
        .setting(
            "database.url",
            "MOLT_CP_DATABASE_URL",
            file.database.url,
            overrides.database_url.as_deref(),
            "--database-url",
        )
        .and_then(|input| checker.check(input, parse_database_url))
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
    let max_connections = checker
        .setting(
            "database.max_connections",
            "MOLT_CP_DATABASE_MAX_CONNECTIONS",
            file.database.max_connections,
            None,
            "",
        )
        .and_then(|input| checker.check(input, |value| integer_in(value, 1, DATABASE_MAX_CONNECTIONS_MAX.into())))
        .map_or(DEFAULT_DATABASE_MAX_CONNECTIONS, |count| u32::try_from(count).unwrap_or(DATABASE_MAX_CONNECTIONS_MAX));
    let acquire_timeout_ms_max = u64::try_from(DATABASE_ACQUIRE_TIMEOUT_MAX.as_millis()).unwrap_or(u64::MAX);
    let acquire_timeout = checker
        .setting(
            "database.acquire_timeout_ms",
            "MOLT_CP_DATABASE_ACQUIRE_TIMEOUT_MS",
            file.database.acquire_timeout_ms,
            None,
            "",
        )
        .and_then(|input| checker.check(input, |value| integer_in(value, 1, acquire_timeout_ms_max)))
        .map_or(DEFAULT_DATABASE_ACQUIRE_TIMEOUT, Duration::from_millis);
    let level = checker
        .setting("log.level", "MOLT_CP_LOG_LEVEL", file.log.level, None, "")
        .and_then(|input| checker.check(input, parse_log_level))
        .unwrap_or_else(|| "info".to_owned());
    let format = checker
        .setting("log.format", "MOLT_CP_LOG_FORMAT", file.log.format, None, "")
        .and_then(|input| checker.check(input, parse_log_format))
        .unwrap_or(LogFormat::Text);

    let ca = checker.ca(file.ca);
    let (lock_min, lock_max) = (crate::keys::RECOVERY_TIME_LOCK_MIN, crate::keys::RECOVERY_TIME_LOCK_MAX);
    let recovery_time_lock = checker
        .setting(
            "keys.recovery_time_lock_secs",
            "MOLT_CP_RECOVERY_TIME_LOCK_SECS",
            file.keys.recovery_time_lock_secs,
            None,
            "",
        )
        .and_then(|input| checker.check(input, |value| integer_in(value, lock_min.as_secs(), lock_max.as_secs())))
        .map_or(crate::keys::RECOVERY_TIME_LOCK_DEFAULT, Duration::from_secs);

    if !checker.problems.is_empty() {
        return Err(ConfigError::Invalid(checker.problems));
    }
    Ok(Config {
        listen_addr,
        grpc_listen_addr,
        database: DatabaseOptions { url, max_connections, acquire_timeout },
        log: LogConfig { level, format },
        ca,
        keys: crate::keys::KeyPolicy { recovery_time_lock },
    })
}

/// Every `MOLT_CP_*` variable this module reads.
pub const ENVIRONMENT_VARIABLES: [&str; 9] = [
    "MOLT_CP_LISTEN",
    "MOLT_CP_GRPC_LISTEN",
    "MOLT_CP_DATABASE_URL",
    "MOLT_CP_DATABASE_MAX_CONNECTIONS",
    "MOLT_CP_DATABASE_ACQUIRE_TIMEOUT_MS",
    "MOLT_CP_LOG_LEVEL",
    "MOLT_CP_LOG_FORMAT",
    "MOLT_CP_RECOVERY_TIME_LOCK_SECS",
    crate::ca::KEK_VARIABLE,
];

/// A raw value and where it came from.
#[derive(Debug)]
struct Input {
    value: toml::Value,
    key: String,
    origin: Origin,
}

struct Checker<'a> {
    environment: &'a BTreeMap<String, String>,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn unknown_variables(&mut self, pin_variable: Option<&str>) {
        for name in self.environment.keys() {
            if name.starts_with(ENV_PREFIX)
                && !ENVIRONMENT_VARIABLES.contains(&name.as_str())
                && pin_variable != Some(name.as_str())
            {
                self.problems.push(Problem {
                    key: name.clone(),
                    origin: Origin::Environment,
                    message: format!("unknown variable (known: {})", ENVIRONMENT_VARIABLES.join(", ")),
                });
            }
        }
    }

    /// The winning input for one setting: flag, then environment, then file.
    fn setting(
        &self,
        file_key: &str,
        variable: &str,
        file_value: Option<toml::Value>,
        flag_value: Option<&str>,
        flag: &str,
    ) -> Option<Input> {
        let text = |value: &str| toml::Value::String(value.to_owned());
        if let Some(value) = flag_value {
            return Some(Input { value: text(value), key: flag.to_owned(), origin: Origin::Flag });
        }
        if let Some(value) = self.environment.get(variable) {
            return Some(Input { value: text(value), key: variable.to_owned(), origin: Origin::Environment });
        }
        file_value.map(|value| Input { value, key: file_key.to_owned(), origin: Origin::File })
    }

    /// `[ca]` and `MOLT_CP_KEK`: the KEK from the variable or a file, the root from both
    /// files or neither.
    fn ca(&mut self, section: CaSection) -> crate::ca::CaOptions {
        use crate::ca::{CaOptions, KekSource, KeyEncryptionKey, RootSource};
        let path = |value: &toml::Value| text(value).map(std::path::PathBuf::from);
        let kek_file = self
            .setting("ca.key_encryption_key_file", "", section.key_encryption_key_file, None, "")
            .and_then(|input| self.check(input, path));
        let kek_variable = self.environment.get(crate::ca::KEK_VARIABLE).map(|hex| toml::Value::String(hex.clone()));
        let kek_value = kek_variable.and_then(|value| {
            let input = Input { value, key: crate::ca::KEK_VARIABLE.to_owned(), origin: Origin::Environment };
            self.check(input, |value| KeyEncryptionKey::from_hex(text(value)?).map_err(|error| error.to_string()))
        });
        let key_encryption_key = match (kek_value, kek_file) {
            (Some(key), _) => KekSource::Value(key),
            (None, Some(file)) => KekSource::File(file),
            (None, None) => KekSource::BesideDatabase,
        };
        let certificate = self
            .setting("ca.root_certificate_file", "", section.root_certificate_file, None, "")
            .and_then(|input| self.check(input, path));
        let key = self
            .setting("ca.root_key_file", "", section.root_key_file, None, "")
            .and_then(|input| self.check(input, path));
        let root = match (certificate, key) {
            (Some(certificate), Some(key)) => RootSource::Files { certificate, key },
            (None, None) => RootSource::Generated,
            _ => {
                self.problems.push(Problem {
                    key: "ca.root_certificate_file".to_owned(),
                    origin: Origin::File,
                    message: "give both ca.root_certificate_file and ca.root_key_file, or neither".to_owned(),
                });
                RootSource::Generated
            }
        };
        let pkcs11 = section.pkcs11.and_then(|section| self.pkcs11(section));
        CaOptions { key_encryption_key, root, pkcs11 }
    }

    /// `[ca.pkcs11]`: every key checked, the required ones and the either-or pairs too.
    fn pkcs11(&mut self, section: Pkcs11Section) -> Option<crate::ca::Pkcs11Options> {
        use crate::ca::{DEFAULT_KEY_LABEL_PREFIX, Pkcs11Options};
        use molt_hsm::{PinSource, SESSION_POOL_SIZE_DEFAULT, SESSION_POOL_SIZE_MAX, TokenSelector};
        // Required and either-or keys are counted as given, valid or not: an invalid value
        // is reported once, by its own check.
        let given = |value: &Option<toml::Value>| usize::from(value.is_some());
        let module_count = given(&section.module);
        let token_count = given(&section.token_label) + given(&section.slot);
        let pin_count = given(&section.pin_file) + given(&section.pin_env);
        let path = |value: &toml::Value| text(value).map(PathBuf::from);
        let module = self.file_setting("ca.pkcs11.module", section.module, path);
        let token_label = self.file_setting("ca.pkcs11.token_label", section.token_label, |value| {
            non_empty_text(value).map(TokenSelector::Label)
        });
        let slot = self.file_setting("ca.pkcs11.slot", section.slot, |value| {
            let index = integer_in(value, 0, SLOT_INDEX_MAX)?;
            Ok(TokenSelector::SlotIndex(usize::try_from(index).unwrap_or(usize::MAX)))
        });
        let pin_file =
            self.file_setting("ca.pkcs11.pin_file", section.pin_file, |value| path(value).map(PinSource::File));
        let pin_env = self
            .file_setting("ca.pkcs11.pin_env", section.pin_env, |value| parse_variable_name(value).map(PinSource::Env));
        let pool_size = self.file_setting("ca.pkcs11.pool_size", section.pool_size, |value| {
            let size = integer_in(value, 1, u64::try_from(SESSION_POOL_SIZE_MAX).unwrap_or(u64::MAX))?;
            Ok(usize::try_from(size).unwrap_or(SESSION_POOL_SIZE_MAX))
        });
        let key_label_prefix =
            self.file_setting("ca.pkcs11.key_label_prefix", section.key_label_prefix, parse_key_label_prefix);
        for (found, key, message) in [
            (module_count, "ca.pkcs11.module", "required in [ca.pkcs11]: the PKCS#11 module's path"),
            (token_count, "ca.pkcs11.token_label", "give exactly one of ca.pkcs11.token_label and ca.pkcs11.slot"),
            (pin_count, "ca.pkcs11.pin_file", "give exactly one of ca.pkcs11.pin_file and ca.pkcs11.pin_env"),
        ] {
            if found != 1 {
                self.problems.push(Problem { key: key.to_owned(), origin: Origin::File, message: message.to_owned() });
            }
        }
        Some(Pkcs11Options {
            module: module?,
            token: token_label.xor(slot)?,
            pin: pin_file.xor(pin_env)?,
            pool_size: pool_size.unwrap_or(SESSION_POOL_SIZE_DEFAULT),
            key_label_prefix: key_label_prefix.unwrap_or_else(|| DEFAULT_KEY_LABEL_PREFIX.to_owned()),
        })
    }

    /// A setting only the file gives.
    fn file_setting<T>(
        &mut self,
        key: &str,
        value: Option<toml::Value>,
        parse: impl FnOnce(&toml::Value) -> Result<T, String>,
    ) -> Option<T> {
        let input = Input { value: value?, key: key.to_owned(), origin: Origin::File };
        self.check(input, parse)
    }

    fn check<T>(&mut self, input: Input, parse: impl FnOnce(&toml::Value) -> Result<T, String>) -> Option<T> {
        parse(&input.value)
            .map_err(|message| self.problems.push(Problem { key: input.key, origin: input.origin, message }))
            .ok()
    }
}

fn text(value: &toml::Value) -> Result<&str, String> {
    value.as_str().ok_or_else(|| format!("expected a string, found {}", value.type_str()))
}

fn non_empty_text(value: &toml::Value) -> Result<String, String> {
    let text = text(value)?;
    if text.is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(text.to_owned())
}

/// The name of an environment variable: letters, digits and `_`, not starting with a digit.
fn parse_variable_name(value: &toml::Value) -> Result<String, String> {
    let name = text(value)?;
    let valid = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.chars().next().is_some_and(|c| !c.is_ascii_digit());
    if !valid {
        return Err(format!("expected the name of an environment variable (letters, digits, _), found {name:?}"));
    }
    Ok(name.to_owned())
}

fn parse_key_label_prefix(value: &toml::Value) -> Result<String, String> {
    let prefix = text(value)?;
    let max = crate::ca::KEY_LABEL_PREFIX_LEN_MAX;
    if prefix.len() > max || !prefix.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!("expected at most {max} printable ASCII characters without spaces, found {prefix:?}"));
    }
    Ok(prefix.to_owned())
}

/// An integer: a TOML integer, or a decimal string from the environment.
fn integer_in(value: &toml::Value, min: u64, max: u64) -> Result<u64, String> {
    let number = match value {
        toml::Value::Integer(number) => *number,
        toml::Value::String(text) => {
            text.trim().parse::<i64>().map_err(|_| format!("expected an integer, found {text:?}"))?
        }
        other => return Err(format!("expected an integer, found {}", other.type_str())),
    };
    u64::try_from(number)
        .ok()
        .filter(|number| (min..=max).contains(number))
        .ok_or_else(|| format!("must be between {min} and {max}, found {number}"))
}

fn parse_listen_addr(value: &toml::Value) -> Result<SocketAddr, String> {
    let text = text(value)?;
    text.parse().map_err(|_| format!("expected an address like 127.0.0.1:8080, found {text:?}"))
}

fn parse_database_url(value: &toml::Value) -> Result<String, String> {
    let url = text(value)?;
    match Backend::from_url(url) {
        None => Err("expected sqlite:PATH or postgres://USER@HOST/DATABASE".to_owned()),
        // Each pooled connection would get its own empty in-memory database.
        Some(Backend::Sqlite) if url.contains(":memory:") || url.contains("mode=memory") => {
            Err("in-memory SQLite is not supported: give a file path".to_owned())
        }
        Some(Backend::Sqlite) if url.trim_start_matches("sqlite:").trim_start_matches("//").is_empty() => {
            Err("expected a file path after sqlite:".to_owned())
        }
        Some(_) => Ok(url.to_owned()),
    }
}

fn parse_log_level(value: &toml::Value) -> Result<String, String> {
    let level = text(value)?;
    tracing_subscriber::EnvFilter::try_new(level).map_err(|error| format!("not a log filter: {error}"))?;
    Ok(level.to_owned())
}

fn parse_log_format(value: &toml::Value) -> Result<LogFormat, String> {
    match text(value)? {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("expected \"text\" or \"json\", found {other:?}")),
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::File => "file",
            Origin::Environment => "environment",
            Origin::Flag => "command line",
        })
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.key, self.origin, self.message)
    }
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|problem| write!(f, "\n  {problem}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn environment(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect()
    }

    fn problems(result: Result<Config, ConfigError>) -> Vec<String> {
        match result {
            Err(ConfigError::Invalid(problems)) => problems.iter().map(ToString::to_string).collect(),
            other => panic!("expected invalid configuration, got {other:?}"),
        }
    }

    #[test]
    fn no_input_gives_the_embedded_defaults() {
        let config = validate(ConfigFile::default(), &BTreeMap::new(), &Overrides::default()).unwrap();
        assert_eq!(config.listen_addr, DEFAULT_LISTEN_ADDR);
        assert_eq!(config.database.url, DEFAULT_DATABASE_URL);
        assert_eq!(config.database.max_connections, DEFAULT_DATABASE_MAX_CONNECTIONS);
        assert_eq!(config.database.acquire_timeout, DEFAULT_DATABASE_ACQUIRE_TIMEOUT);
        assert_eq!(config.log, LogConfig { level: "info".into(), format: LogFormat::Text });
        assert_eq!(config.grpc_listen_addr, None);
    }

    #[test]
    fn the_grpc_listener_is_configured_by_file_or_environment() {
        let file = parse_file("grpc_listen_addr = \"127.0.0.1:8443\"\n").unwrap();
        let config = validate(file, &BTreeMap::new(), &Overrides::default()).unwrap();
        assert_eq!(config.grpc_listen_addr, Some("127.0.0.1:8443".parse().unwrap()));
        let env = environment(&[("MOLT_CP_GRPC_LISTEN", "0.0.0.0:9443")]);
        let config = validate(ConfigFile::default(), &env, &Overrides::default()).unwrap();
        assert_eq!(config.grpc_listen_addr, Some("0.0.0.0:9443".parse().unwrap()));
        let env = environment(&[("MOLT_CP_GRPC_LISTEN", "nowhere")]);
        let found = problems(validate(ConfigFile::default(), &env, &Overrides::default()));
        assert!(found[0].starts_with("MOLT_CP_GRPC_LISTEN (environment): expected an address"), "{found:?}");
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let file = parse_file(
            "listen_addr = \"0.0.0.0:1\"\n[database]\nurl = \"sqlite:file.db\"\nmax_connections = 3\n[log]\nformat = \"json\"\n",
        )
        .unwrap();
        let env = environment(&[("MOLT_CP_LISTEN", "0.0.0.0:2"), ("MOLT_CP_DATABASE_URL", "postgres://env@h/db")]);
        let flags = Overrides { database_url: Some("postgres://flag@h/db".into()), listen_addr: None };
        let config = validate(file, &env, &flags).unwrap();
        assert_eq!(config.listen_addr, "0.0.0.0:2".parse().unwrap());
        assert_eq!(config.database.url, "postgres://flag@h/db");
        assert_eq!(config.database.max_connections, 3);
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn every_value_error_is_reported_with_its_key_and_origin() {
        let file = parse_file(
            "listen_addr = 8080\n[database]\nurl = \"mysql://x\"\nmax_connections = 0\nacquire_timeout_ms = \"soon\"\n[log]\nformat = \"xml\"\n",
        )
        .unwrap();
        let env = environment(&[("MOLT_CP_LOG_LEVEL", "info,=[bad"), ("MOLT_CP_LISTN", "x")]);
        let found = problems(validate(file, &env, &Overrides::default()));
        let expected = [
            "MOLT_CP_LISTN (environment): unknown variable",
            "listen_addr (file): expected a string, found integer",
            "database.url (file): expected sqlite:PATH or postgres://",
            "database.max_connections (file): must be between 1 and 1000, found 0",
            "database.acquire_timeout_ms (file): expected an integer, found \"soon\"",
            "MOLT_CP_LOG_LEVEL (environment): not a log filter",
            "log.format (file): expected \"text\" or \"json\", found \"xml\"",
        ];
        assert_eq!(found.len(), expected.len(), "{found:#?}");
        for (found, expected) in found.iter().zip(expected) {
            assert!(found.starts_with(expected), "{found:?} should start with {expected:?}");
        }
    }

    #[test]
    fn environment_integers_and_flags_are_checked_too() {
        let env = environment(&[("MOLT_CP_DATABASE_MAX_CONNECTIONS", "many")]);
        let flags = Overrides { database_url: Some("sqlite::memory:".into()), listen_addr: Some("nowhere".into()) };
        let found = problems(validate(ConfigFile::default(), &env, &flags));
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(found[0].starts_with("--listen (command line): expected an address"));
        assert!(found[1].starts_with("--database-url (command line): in-memory SQLite is not supported"));
        assert!(found[2].starts_with("MOLT_CP_DATABASE_MAX_CONNECTIONS (environment): expected an integer"));
    }

    #[test]
    fn unknown_file_keys_and_syntax_errors_stop_at_parsing() {
        let error = parse_file("[database]\nurll = \"sqlite:x.db\"\n").unwrap_err();
        assert!(error.contains("unknown field `urll`"), "{error}");
        assert!(error.contains("line 2"), "{error}");
        assert!(parse_file("listen_addr = ").is_err());
    }

    #[test]
    fn the_pkcs11_section_configures_the_org_ca_token() {
        assert_eq!(validate(ConfigFile::default(), &BTreeMap::new(), &Overrides::default()).unwrap().ca.pkcs11, None);
        let file = parse_file(
            "[ca.pkcs11]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"molt-org-cas\"\n\
             pin_env = \"MOLT_CP_HSM_PIN\"\n",
        )
        .unwrap();
        // The variable named by pin_env is known, though it starts with MOLT_CP_.
        let env = environment(&[("MOLT_CP_HSM_PIN", "1234")]);
        let pkcs11 = validate(file, &env, &Overrides::default()).unwrap().ca.pkcs11.unwrap();
        assert_eq!(pkcs11.module, PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(pkcs11.token, molt_hsm::TokenSelector::Label("molt-org-cas".into()));
        assert_eq!(pkcs11.pin, molt_hsm::PinSource::Env("MOLT_CP_HSM_PIN".into()));
        assert_eq!(pkcs11.pool_size, molt_hsm::SESSION_POOL_SIZE_DEFAULT);
        assert_eq!(pkcs11.key_label_prefix, crate::ca::DEFAULT_KEY_LABEL_PREFIX);
        let file = parse_file(
            "[ca.pkcs11]\nmodule = \"/m.so\"\nslot = 2\npin_file = \"/etc/molt/pin\"\npool_size = 8\n\
             key_label_prefix = \"prod-\"\n",
        )
        .unwrap();
        let pkcs11 = validate(file, &BTreeMap::new(), &Overrides::default()).unwrap().ca.pkcs11.unwrap();
        assert_eq!(pkcs11.token, molt_hsm::TokenSelector::SlotIndex(2));
        assert_eq!(pkcs11.pin, molt_hsm::PinSource::File("/etc/molt/pin".into()));
        assert_eq!((pkcs11.pool_size, pkcs11.key_label_prefix.as_str()), (8, "prod-"));
    }

    #[test]
    fn bad_pkcs11_settings_are_each_reported_and_a_pin_value_is_refused() {
        let error = parse_file("[ca.pkcs11]\nmodule = \"/m.so\"\npin = \"1234\"\n").unwrap_err();
        assert!(error.contains("unknown field `pin`"), "{error}");
        let found = problems(validate(parse_file("[ca.pkcs11]\n").unwrap(), &BTreeMap::new(), &Overrides::default()));
        let expected = [
            "ca.pkcs11.module (file): required",
            "ca.pkcs11.token_label (file): give exactly one of",
            "ca.pkcs11.pin_file (file): give exactly one of",
        ];
        assert_eq!(found.len(), expected.len(), "{found:#?}");
        for (found, expected) in found.iter().zip(expected) {
            assert!(found.starts_with(expected), "{found:?} should start with {expected:?}");
        }
        let file = parse_file(&format!(
            "[ca.pkcs11]\nmodule = 7\ntoken_label = \"\"\nslot = -1\npin_file = \"/p\"\npin_env = \"1BAD-NAME\"\n\
             pool_size = 0\nkey_label_prefix = \"{}\"\n",
            "x".repeat(crate::ca::KEY_LABEL_PREFIX_LEN_MAX + 1)
        ))
        .unwrap();
        let found = problems(validate(file, &BTreeMap::new(), &Overrides::default()));
        let expected = [
            "ca.pkcs11.module (file): expected a string, found integer",
            "ca.pkcs11.token_label (file): must not be empty",
            "ca.pkcs11.slot (file): must be between 0 and 1023, found -1",
            "ca.pkcs11.pin_env (file): expected the name of an environment variable",
            "ca.pkcs11.pool_size (file): must be between 1 and 64, found 0",
            "ca.pkcs11.key_label_prefix (file): expected at most 25 printable ASCII characters",
            "ca.pkcs11.token_label (file): give exactly one of ca.pkcs11.token_label and ca.pkcs11.slot",
            "ca.pkcs11.pin_file (file): give exactly one of ca.pkcs11.pin_file and ca.pkcs11.pin_env",
        ];
        assert_eq!(found.len(), expected.len(), "{found:#?}");
        for (found, expected) in found.iter().zip(expected) {
            assert!(found.starts_with(expected), "{found:?} should start with {expected:?}");
        }
        // Without pin_env, a MOLT_CP_ variable of that kind is still unknown.
        let env = environment(&[("MOLT_CP_HSM_PIN", "1234")]);
        let found = problems(validate(ConfigFile::default(), &env, &Overrides::default()));
        assert!(found[0].starts_with("MOLT_CP_HSM_PIN (environment): unknown variable"), "{found:?}");
    }

    #[test]
    fn files_are_read_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.toml");
        std::fs::write(&path, "[database]\nurl = \"postgres://postgres@127.0.0.1/cp\"\n").unwrap();
        let config = load(Some(&path), &BTreeMap::new(), &Overrides::default()).unwrap();
        assert_eq!(config.database.url, "postgres://postgres@127.0.0.1/cp");
        assert!(matches!(
            load(Some(&dir.path().join("missing.toml")), &BTreeMap::new(), &Overrides::default()),
            Err(ConfigError::Read { .. })
        ));
    }
}

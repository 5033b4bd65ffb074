//! The edge's configuration: one TOML file, turned into a validated [`EdgeConfig`].
//!
//! Loading takes two passes so that a single run reports every mistake in the file, each
//! with its dotted key path (`limits.messages_per_minute`,
//! `trust.revocation_lists[1].crl`) and line:
//!
//! 1. *read*: the TOML document, parsed with byte spans, is walked into [`ConfigFile`],
//!    the file's own shape — every key optional, spanned and of its TOML type. This pass
//!    finds unknown keys, wrong types and missing required keys. A serde derive would stop
//!    at the first error, so the walk is written out.
//! 2. *validate*: each raw value becomes its typed form (socket addresses, paths resolved
//!    against the config file's directory, durations, non-zero counts) and the relations
//!    between limits are checked.
//!
//! Only paths are handled here: the certificates, key and CRLs are read by whoever builds
//! the TLS configuration. The documented reference file is [`reference()`].

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use molt_protocol::limits;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// The config format this edge writes (`config_version`). Version 2 added the key
/// itself; a file without it is version 1 and loads unchanged (`molt-edge config migrate`
/// adds it). See [`crate::migrate`].
pub const CONFIG_VERSION_CURRENT: u32 = 2;
/// The version of a file without `config_version`.
pub const CONFIG_VERSION_UNVERSIONED: u32 = 1;

/// Default QUIC (UDP) address agents connect to.
pub const DEFAULT_LISTEN_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 4433));
/// Default HTTP address of `/healthz` and `/metrics`; loopback so it is not public by accident.
pub const DEFAULT_ADMIN_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9090));
/// Default directory of the offline buffer, relative to the config file's directory.
pub const DEFAULT_DATA_DIR: &str = "data";
/// Default region name.
pub const DEFAULT_REGION: &str = "local";

/// Malformed or forged messages tolerated on one connection before it is closed.
pub const DEFAULT_BAD_MESSAGES_PER_CONNECTION_MAX: u32 = 100;
/// How long a connection may stay silent before it is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Frames queued to one connection before the sender is pushed back.
pub const DEFAULT_OUTBOUND_QUEUE_DEPTH_MAX: NonZeroUsize = nonzero_usize(1024);
/// Messages the whole offline buffer holds.
pub const DEFAULT_BUFFER_MESSAGES_MAX: NonZeroU64 = nonzero_u64(1_000_000);
/// Payload bytes the whole offline buffer holds: 1 GiB.
pub const DEFAULT_BUFFER_BYTES_MAX: NonZeroU64 = nonzero_u64(1024 * 1024 * 1024);
/// How long connections get to finish in-flight work on shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Delay before reconnecting that the go-away notice tells agents.
pub const DEFAULT_RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Largest `limits.clock_skew_ms`.
pub const CLOCK_SKEW_MAX: Duration = Duration::from_secs(3600);
/// Largest `limits.idle_timeout_ms` (and so `limits.keep_alive_ms`).
pub const IDLE_TIMEOUT_MAX: Duration = Duration::from_secs(3600);
/// Largest `shutdown.drain_timeout_ms`.
pub const DRAIN_TIMEOUT_MAX: Duration = Duration::from_secs(3600);
/// Largest `shutdown.reconnect_after_ms`.
pub const RECONNECT_AFTER_MAX: Duration = Duration::from_secs(3600);
/// Longest region name.
pub const REGION_LEN_MAX: usize = 63;

/// Default name the edge sends as SNI to the control plane (informational: the
/// control plane is verified by its certificate chain, not by name).
pub const DEFAULT_CONTROL_PLANE_SERVER_NAME: &str = "control-plane.molt";
/// Default file of the cached trust bundle, relative to the config file's directory.
pub const DEFAULT_BUNDLE_CACHE: &str = "trust-bundle.json";
/// Default interval of the periodic presence report (changes are reported sooner).
pub const DEFAULT_PRESENCE_INTERVAL: Duration = Duration::from_secs(30);
/// Bounds of `control_plane.presence_interval_ms`.
pub const PRESENCE_INTERVAL_MIN: Duration = Duration::from_millis(100);
pub const PRESENCE_INTERVAL_MAX: Duration = Duration::from_secs(600);
/// Default first and longest wait before reconnecting to the control plane.
pub const DEFAULT_RECONNECT_BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const DEFAULT_RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Bounds of the reconnect back-off keys.
pub const RECONNECT_BACKOFF_FLOOR: Duration = Duration::from_millis(50);
pub const RECONNECT_BACKOFF_CEILING: Duration = Duration::from_secs(600);
/// Default share of its lifetime a certificate has left when the edge renews it.
pub const DEFAULT_RENEW_AT_REMAINING_PERCENT: u8 = 33;
/// Bounds of `control_plane.renew_at_remaining_percent`.
pub const RENEW_AT_REMAINING_PERCENT_MIN: u8 = 1;
pub const RENEW_AT_REMAINING_PERCENT_MAX: u8 = 90;
/// Default interval between checks of the certificate's remaining lifetime.
pub const DEFAULT_RENEW_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// Bounds of `control_plane.renew_check_interval_ms`.
pub const RENEW_CHECK_INTERVAL_MIN: Duration = Duration::from_millis(100);
pub const RENEW_CHECK_INTERVAL_MAX: Duration = Duration::from_secs(3600);
/// Default time a presence answer from the control plane is used before it is asked again.
pub const DEFAULT_PRESENCE_FRESH: Duration = Duration::from_secs(2);
/// Bounds of `federation.presence_fresh_ms`.
pub const PRESENCE_FRESH_MIN: Duration = Duration::from_millis(100);
pub const PRESENCE_FRESH_MAX: Duration = Duration::from_secs(600);
/// Default interval of the hand-off of buffered messages to the edge their recipient
/// is connected to now.
pub const DEFAULT_HANDOFF_INTERVAL: Duration = Duration::from_millis(500);
/// Bounds of `federation.handoff_interval_ms`.
pub const HANDOFF_INTERVAL_MIN: Duration = Duration::from_millis(50);
pub const HANDOFF_INTERVAL_MAX: Duration = Duration::from_secs(60);
/// Default and largest number of requests queued on one edge-to-edge link.
pub const DEFAULT_LINK_QUEUE_DEPTH: NonZeroUsize = nonzero_usize(8192);
pub const LINK_QUEUE_DEPTH_MAX: usize = 65_536;

const DEFAULT_MESSAGES_PER_MINUTE: NonZeroU32 = nonzero_u32(limits::DEFAULT_MESSAGES_PER_MINUTE);
const DEFAULT_MESSAGES_PER_HOUR: NonZeroU32 = nonzero_u32(limits::DEFAULT_MESSAGES_PER_HOUR);
const DEFAULT_BYTES_PER_MINUTE: NonZeroU64 = nonzero_u64(limits::DEFAULT_BYTES_PER_MINUTE);
const DEFAULT_CONNECTIONS_PER_AGENT: NonZeroU32 = nonzero_u32(limits::DEFAULT_CONNECTIONS_PER_AGENT);
const DEFAULT_CONNECTIONS_PER_IP: NonZeroU32 = nonzero_u32(limits::DEFAULT_CONNECTIONS_PER_IP);
const DEFAULT_REPLAY_WINDOW_CAPACITY: NonZeroUsize = nonzero_usize(limits::DEFAULT_REPLAY_WINDOW_CAPACITY);
const DEFAULT_QUEUE_DEPTH_PER_AGENT_MAX: NonZeroU32 = nonzero_u32(limits::DEFAULT_QUEUE_DEPTH_PER_AGENT);

// The defaults must pass the same checks as a file does.
const _: () = assert!(DEFAULT_MESSAGES_PER_MINUTE.get() <= DEFAULT_MESSAGES_PER_HOUR.get());
const _: () = assert!(limits::DEFAULT_KEEP_ALIVE.as_millis() < DEFAULT_IDLE_TIMEOUT.as_millis());
const _: () = assert!(DEFAULT_IDLE_TIMEOUT.as_millis() <= IDLE_TIMEOUT_MAX.as_millis());
const _: () = assert!(limits::DEFAULT_CLOCK_SKEW.as_millis() <= CLOCK_SKEW_MAX.as_millis());
const _: () = assert!(limits::DEFAULT_QUEUE_RETENTION.as_millis() <= limits::MAX_TTL.as_millis());
const _: () = assert!(DEFAULT_BYTES_PER_MINUTE.get() >= limits::MAX_PAYLOAD_BYTES as u64);
const _: () = assert!(DEFAULT_BUFFER_BYTES_MAX.get() >= limits::MAX_ENVELOPE_BYTES as u64);
const _: () = assert!(DEFAULT_QUEUE_DEPTH_PER_AGENT_MAX.get() as u64 <= DEFAULT_BUFFER_MESSAGES_MAX.get());
const _: () = assert!(DEFAULT_DRAIN_TIMEOUT.as_millis() <= DRAIN_TIMEOUT_MAX.as_millis());
const _: () = assert!(DEFAULT_RECONNECT_AFTER.as_millis() <= RECONNECT_AFTER_MAX.as_millis());
// The go-away frame carries the reconnect delay as u32 milliseconds.
const _: () = assert!(RECONNECT_AFTER_MAX.as_millis() <= u32::MAX as u128);
const _: () = assert!(DEFAULT_RECONNECT_BACKOFF_MIN.as_millis() <= DEFAULT_RECONNECT_BACKOFF_MAX.as_millis());
const _: () = assert!(RECONNECT_BACKOFF_FLOOR.as_millis() <= DEFAULT_RECONNECT_BACKOFF_MIN.as_millis());
const _: () = assert!(DEFAULT_RECONNECT_BACKOFF_MAX.as_millis() <= RECONNECT_BACKOFF_CEILING.as_millis());
const _: () = assert!(PRESENCE_INTERVAL_MIN.as_millis() <= DEFAULT_PRESENCE_INTERVAL.as_millis());
const _: () = assert!(DEFAULT_PRESENCE_INTERVAL.as_millis() <= PRESENCE_INTERVAL_MAX.as_millis());
const _: () = assert!(RENEW_AT_REMAINING_PERCENT_MIN <= DEFAULT_RENEW_AT_REMAINING_PERCENT);
const _: () = assert!(DEFAULT_RENEW_AT_REMAINING_PERCENT <= RENEW_AT_REMAINING_PERCENT_MAX);
const _: () = assert!(RENEW_CHECK_INTERVAL_MIN.as_millis() <= DEFAULT_RENEW_CHECK_INTERVAL.as_millis());
const _: () = assert!(DEFAULT_RENEW_CHECK_INTERVAL.as_millis() <= RENEW_CHECK_INTERVAL_MAX.as_millis());
const _: () = assert!(PRESENCE_FRESH_MIN.as_millis() <= DEFAULT_PRESENCE_FRESH.as_millis());
const _: () = assert!(DEFAULT_PRESENCE_FRESH.as_millis() <= PRESENCE_FRESH_MAX.as_millis());
const _: () = assert!(HANDOFF_INTERVAL_MIN.as_millis() <= DEFAULT_HANDOFF_INTERVAL.as_millis());
const _: () = assert!(DEFAULT_HANDOFF_INTERVAL.as_millis() <= HANDOFF_INTERVAL_MAX.as_millis());
const _: () = assert!(DEFAULT_LINK_QUEUE_DEPTH.get() <= LINK_QUEUE_DEPTH_MAX);

/// The edge's validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeConfig {
    /// `[edge]`: addresses, data directory, region.
    pub edge: ServerConfig,
    /// `[identity]`: the edge's own certificate and key.
    pub identity: IdentityConfig,
    /// `[trust]`: roots and revocation lists that agent certificates are checked against.
    pub trust: TrustConfig,
    /// `[limits]`: per-agent, per-connection and protocol limits.
    pub limits: LimitsConfig,
    /// `[buffer]`: the durable offline buffer's capacity.
    pub buffer: BufferConfig,
    /// `[shutdown]`: draining.
    pub shutdown: ShutdownConfig,
    /// `[log]`: log output.
    pub log: LogConfig,
    /// `[control_plane]`: the gRPC link to the control plane; `None` runs standalone.
    pub control_plane: Option<ControlPlaneConfig>,
    /// `[federation]`: links to other edges; `None` routes only between local agents.
    /// Needs `[control_plane]`, whose presence data says where agents are.
    pub federation: Option<FederationConfig>,
}

/// The `[federation]` section: edge-to-edge QUIC links (ALPN `molt-edge/1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationConfig {
    /// UDP address other edges connect to (`listen_addr`).
    pub listen_addr: SocketAddr,
    /// Address other edges are told to dial; the bound address if absent.
    pub advertise_addr: Option<SocketAddr>,
    /// How long a presence answer is used before the control plane is asked again (a
    /// stale answer is still used while the control plane cannot be reached).
    pub presence_fresh: Duration,
    /// How often buffered messages are checked for a recipient connected elsewhere.
    pub handoff_interval: Duration,
    /// Requests queued on one link before senders are told to wait (stored locally).
    pub link_queue_depth: NonZeroUsize,
}

/// The `[control_plane]` section. Durations come from the `*_ms` keys of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlaneConfig {
    /// Address of the control plane's gRPC service (`grpc_addr`).
    pub grpc_addr: SocketAddr,
    /// SNI sent to the control plane.
    pub server_name: String,
    /// PEM root(s) the control plane's certificate must chain to.
    pub trust_anchor: PathBuf,
    /// Where the last trust bundle applied is kept, for starts without the control plane.
    pub bundle_cache: PathBuf,
    /// QUIC address agents and edges are told to dial; the bound address if absent.
    pub advertise_addr: Option<SocketAddr>,
    /// Longest time between two presence reports.
    pub presence_interval: Duration,
    /// First wait before reconnecting; doubles up to `reconnect_backoff_max`.
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    /// Renew when less than this percentage of the certificate's lifetime is left.
    pub renew_at_remaining_percent: u8,
    /// How often the remaining lifetime is checked.
    pub renew_check_interval: Duration,
}

/// The `[edge]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// QUIC (UDP) address agents connect to (`listen_addr`).
    pub listen_addr: SocketAddr,
    /// HTTP address of `/healthz` and `/metrics` (`admin_addr`).
    pub admin_addr: SocketAddr,
    /// Directory of the redb offline buffer, resolved against the config file's directory.
    pub data_dir: PathBuf,
    /// Region this edge serves.
    pub region: Region,
}

/// The `[identity]` section: paths and names only, the files and token are not read here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    /// PEM chain: the edge's leaf certificate, then the org CA.
    pub certificate_chain: PathBuf,
    /// Where the leaf certificate's private key lives (`key_source`).
    pub key: KeySource,
}

/// Where the edge's private key lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `key_source = "file"` (the default): a PKCS#8 PEM file (`private_key`).
    File(PathBuf),
    /// `key_source = "pkcs11"`: a key inside a PKCS#11 token (`[identity.pkcs11]`); it
    /// never leaves the token, which signs each TLS handshake.
    Pkcs11(Pkcs11KeyConfig),
}

/// The `[identity.pkcs11]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11KeyConfig {
    /// Path of the PKCS#11 module (shared library).
    pub module: PathBuf,
    /// Label of the token holding the key.
    pub token_label: String,
    /// Label of the Ed25519 key on the token.
    pub key_label: String,
    /// Where the token's user PIN comes from (`pin_env` or `pin_file`; never the config).
    pub pin: molt_hsm::PinSource,
}

/// The `[trust]` section: paths only, the files are not read here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustConfig {
    /// PEM root certificate(s).
    pub anchors: PathBuf,
    /// `[[trust.revocation_lists]]`, in file order.
    pub revocation_lists: Vec<RevocationListConfig>,
}

/// One `[[trust.revocation_lists]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationListConfig {
    /// PEM X.509 CRL.
    pub crl: PathBuf,
    /// PEM certificate of the CA that signed the CRL.
    pub issuer: PathBuf,
}

/// The `[limits]` section. Durations come from the `*_ms` keys of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Largest difference tolerated between a sender's timestamp and the edge's clock.
    pub clock_skew: Duration,
    /// Messages one agent may send per minute; at most `messages_per_hour`.
    pub messages_per_minute: NonZeroU32,
    /// Messages one agent may send per hour.
    pub messages_per_hour: NonZeroU32,
    /// Payload bytes one agent may send per minute; at least one largest payload.
    pub bytes_per_minute: NonZeroU64,
    /// Concurrent connections per agent.
    pub connections_per_agent: NonZeroU32,
    /// Concurrent connections per source IP address.
    pub connections_per_ip: NonZeroU32,
    /// Malformed or forged messages tolerated before the connection is closed.
    pub bad_messages_per_connection_max: u32,
    /// Silence after which a connection is closed.
    pub idle_timeout: Duration,
    /// Interval of QUIC keep-alives; shorter than `idle_timeout`.
    pub keep_alive: Duration,
    /// Frames queued to one connection.
    pub outbound_queue_depth_max: NonZeroUsize,
    /// Message ids the replay window remembers.
    pub replay_window_capacity: NonZeroUsize,
}

/// The `[buffer]` section: capacity of the durable offline buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferConfig {
    /// Messages buffered for one offline recipient; at most `messages_max`.
    pub queue_depth_per_agent_max: NonZeroU32,
    /// Messages buffered in total.
    pub messages_max: NonZeroU64,
    /// Payload bytes buffered in total; at least one largest envelope.
    pub bytes_max: NonZeroU64,
    /// Longest a message is kept, whatever its ttl; at most the protocol's `MAX_TTL`.
    pub retention: Duration,
}

/// The `[shutdown]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// How long connections get to finish in-flight work.
    pub drain_timeout: Duration,
    /// Delay before reconnecting that the go-away notice tells agents.
    pub reconnect_after: Duration,
}

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// `tracing` env-filter directive, e.g. `info,molt_edge=debug`.
    pub level: LogFilter,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A region name: 1 to [`REGION_LEN_MAX`] lower-case ASCII letters, digits and `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Region(String);

/// A `tracing` env-filter directive that parses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFilter(String);

/// Why the edge's configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read edge config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but has problems; all of them are listed, in file order.
    #[error("{}", ProblemList { file: file.as_deref(), problems })]
    Invalid {
        /// The file, when loaded from one.
        file: Option<PathBuf>,
        problems: Vec<ConfigProblem>,
    },
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted path of the key, e.g. `trust.revocation_lists[1].crl`; `None` for syntax errors.
    pub key: Option<String>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub kind: ProblemKind,
}

/// What is wrong with a key or the document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProblemKind {
    /// The text is not valid TOML.
    #[error("invalid TOML: {message}")]
    Syntax { message: String },
    /// The key is not part of the configuration.
    #[error("unknown key{}", suggestion_text(suggestion.as_deref()))]
    UnknownKey {
        /// Closest known key, as a dotted path when it lives in another section.
        suggestion: Option<String>,
    },
    /// A required key is absent.
    #[error("missing required key")]
    MissingKey,
    /// The value has the wrong TOML type.
    #[error("expected {expected}, found {found}")]
    WrongType { expected: &'static str, found: &'static str },
    /// The value has the right type but is not allowed.
    #[error("{reason}")]
    InvalidValue { reason: String },
}

/// Why a text is not a [`Region`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegionParseError {
    #[error("region must not be empty")]
    Empty,
    #[error("region must be at most {REGION_LEN_MAX} characters, got {0}")]
    TooLong(usize),
    #[error("region may contain only lower-case ASCII letters, digits and `-`, found {0:?}")]
    InvalidCharacter(char),
}

/// Why a text is not a [`LogFilter`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LogFilterParseError {
    #[error("log filter must not be empty")]
    Empty,
    #[error("invalid log filter directive: {0}")]
    Invalid(String),
}

/// Why a text is not a [`LogFormat`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log format must be \"text\" or \"json\", found {0:?}")]
pub struct LogFormatParseError(String);

/// Reads and validates the config file at `path`; relative paths in it are resolved
/// against the file's directory.
pub fn load(path: &Path) -> Result<EdgeConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    // Absolute, so that resolved paths survive a later change of working directory.
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let base_dir = absolute.parent().unwrap_or(Path::new("."));
    parse_document(&text, base_dir).map_err(|problems| ConfigError::Invalid { file: Some(path.to_owned()), problems })
}

/// Parses and validates config text; relative paths are resolved against `base_dir`.
pub fn parse(text: &str, base_dir: &Path) -> Result<EdgeConfig, ConfigError> {
    parse_document(text, base_dir).map_err(|problems| ConfigError::Invalid { file: None, problems })
}

/// The documented reference configuration: every key, its default and meaning.
pub fn reference() -> &'static str {
    include_str!("../edge.example.toml")
}

impl ConfigError {
    /// Every problem found, in file order; empty for [`ConfigError::Read`].
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            ConfigError::Read { .. } => &[],
        }
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        write!(f, "{}", self.kind)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            clock_skew: limits::DEFAULT_CLOCK_SKEW,
            messages_per_minute: DEFAULT_MESSAGES_PER_MINUTE,
            messages_per_hour: DEFAULT_MESSAGES_PER_HOUR,
            bytes_per_minute: DEFAULT_BYTES_PER_MINUTE,
            connections_per_agent: DEFAULT_CONNECTIONS_PER_AGENT,
            connections_per_ip: DEFAULT_CONNECTIONS_PER_IP,
            bad_messages_per_connection_max: DEFAULT_BAD_MESSAGES_PER_CONNECTION_MAX,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keep_alive: limits::DEFAULT_KEEP_ALIVE,
            outbound_queue_depth_max: DEFAULT_OUTBOUND_QUEUE_DEPTH_MAX,
            replay_window_capacity: DEFAULT_REPLAY_WINDOW_CAPACITY,
        }
    }
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            queue_depth_per_agent_max: DEFAULT_QUEUE_DEPTH_PER_AGENT_MAX,
            messages_max: DEFAULT_BUFFER_MESSAGES_MAX,
            bytes_max: DEFAULT_BUFFER_BYTES_MAX,
            retention: limits::DEFAULT_QUEUE_RETENTION,
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { drain_timeout: DEFAULT_DRAIN_TIMEOUT, reconnect_after: DEFAULT_RECONNECT_AFTER }
    }
}

impl ShutdownConfig {
    /// `reconnect_after` as the go-away frame carries it, saturating at `u32::MAX`.
    pub fn reconnect_after_ms(&self) -> u32 {
        u32::try_from(self.reconnect_after.as_millis()).unwrap_or(u32::MAX)
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: LogFilter::default() }
    }
}

impl Region {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Region {
    fn default() -> Self {
        Region(DEFAULT_REGION.to_owned())
    }
}

impl FromStr for Region {
    type Err = RegionParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(RegionParseError::Empty);
        }
        let length = text.chars().count();
        if length > REGION_LEN_MAX {
            return Err(RegionParseError::TooLong(length));
        }
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        match text.chars().find(|&c| !allowed(c)) {
            Some(c) => Err(RegionParseError::InvalidCharacter(c)),
            None => Ok(Region(text.to_owned())),
        }
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl LogFilter {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The filter for `tracing_subscriber`.
    pub fn to_env_filter(&self) -> tracing_subscriber::EnvFilter {
        // Invariant: `from_str` accepted this directive with the same parser.
        tracing_subscriber::EnvFilter::try_new(&self.0).expect("log filter was validated")
    }
}

impl Default for LogFilter {
    fn default() -> Self {
        LogFilter("info".to_owned())
    }
}

impl FromStr for LogFilter {
    type Err = LogFilterParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().is_empty() {
            return Err(LogFilterParseError::Empty);
        }
        match tracing_subscriber::EnvFilter::try_new(text) {
            Ok(_) => Ok(LogFilter(text.to_owned())),
            Err(error) => Err(LogFilterParseError::Invalid(error.to_string())),
        }
    }
}

impl fmt::Display for LogFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for LogFormat {
    type Err = LogFormatParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(LogFormatParseError(other.to_owned())),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

// ---------------------------------------------------------------------------------------
// Known keys, for unknown-key detection and suggestions.

const SECTION_KEYS: &[&str] = &[
    "config_version",
    "edge",
    "identity",
    "trust",
    "limits",
    "buffer",
    "shutdown",
    "log",
    "control_plane",
    "federation",
];
const EDGE_KEYS: &[&str] = &["listen_addr", "admin_addr", "data_dir", "region"];
const IDENTITY_KEYS: &[&str] = &["certificate_chain", "key_source", "private_key", "pkcs11"];
const PKCS11_KEYS: &[&str] = &["module", "token_label", "key_label", "pin_env", "pin_file"];
const TRUST_KEYS: &[&str] = &["anchors", "revocation_lists"];
const REVOCATION_LIST_KEYS: &[&str] = &["crl", "issuer"];
const LIMITS_KEYS: &[&str] = &[
    "clock_skew_ms",
    "messages_per_minute",
    "messages_per_hour",
    "bytes_per_minute",
    "connections_per_agent",
    "connections_per_ip",
    "bad_messages_per_connection_max",
    "idle_timeout_ms",
    "keep_alive_ms",
    "outbound_queue_depth_max",
    "replay_window_capacity",
];
const BUFFER_KEYS: &[&str] = &["queue_depth_per_agent_max", "messages_max", "bytes_max", "retention_ms"];
const SHUTDOWN_KEYS: &[&str] = &["drain_timeout_ms", "reconnect_after_ms"];
const LOG_KEYS: &[&str] = &["format", "level"];
const CONTROL_PLANE_KEYS: &[&str] = &[
    "grpc_addr",
    "server_name",
    "trust_anchor",
    "bundle_cache",
    "advertise_addr",
    "presence_interval_ms",
    "reconnect_backoff_min_ms",
    "reconnect_backoff_max_ms",
    "renew_at_remaining_percent",
    "renew_check_interval_ms",
];
const FEDERATION_KEYS: &[&str] =
    &["listen_addr", "advertise_addr", "presence_fresh_ms", "handoff_interval_ms", "link_queue_depth"];

/// Every table of the file with its keys, to suggest a key that lives in another table.
const ALL_TABLES: &[(&str, &[&str])] = &[
    ("", SECTION_KEYS),
    ("edge", EDGE_KEYS),
    ("identity", IDENTITY_KEYS),
    ("identity.pkcs11", PKCS11_KEYS),
    ("trust", TRUST_KEYS),
    ("trust.revocation_lists[]", REVOCATION_LIST_KEYS),
    ("limits", LIMITS_KEYS),
    ("buffer", BUFFER_KEYS),
    ("shutdown", SHUTDOWN_KEYS),
    ("log", LOG_KEYS),
    ("control_plane", CONTROL_PLANE_KEYS),
    ("federation", FEDERATION_KEYS),
];

// ---------------------------------------------------------------------------------------
// Pass 1: the file's own shape.

type Span = Range<usize>;
type Raw<T> = Option<Spanned<T>>;

/// The config file as written: every key optional, spanned and of its TOML type.
#[derive(Debug, Default)]
struct ConfigFile {
    config_version: Raw<i64>,
    edge: EdgeFile,
    identity: IdentityFile,
    trust: TrustFile,
    limits: LimitsFile,
    buffer: BufferFile,
    shutdown: ShutdownFile,
    log: LogFile,
    control_plane: Option<ControlPlaneFile>,
    federation: Option<FederationFile>,
}

#[derive(Debug, Default)]
struct FederationFile {
    listen_addr: Raw<String>,
    advertise_addr: Raw<String>,
    presence_fresh_ms: Raw<i64>,
    handoff_interval_ms: Raw<i64>,
    link_queue_depth: Raw<i64>,
    span: Option<Span>,
}

#[derive(Debug, Default)]
struct ControlPlaneFile {
    grpc_addr: Raw<String>,
    server_name: Raw<String>,
    trust_anchor: Raw<String>,
    bundle_cache: Raw<String>,
    advertise_addr: Raw<String>,
    presence_interval_ms: Raw<i64>,
    reconnect_backoff_min_ms: Raw<i64>,
    reconnect_backoff_max_ms: Raw<i64>,
    renew_at_remaining_percent: Raw<i64>,
    renew_check_interval_ms: Raw<i64>,
}

#[derive(Debug, Default)]
struct EdgeFile {
    listen_addr: Raw<String>,
    admin_addr: Raw<String>,
    data_dir: Raw<String>,
    region: Raw<String>,
}

#[derive(Debug, Default)]
struct IdentityFile {
    certificate_chain: Raw<String>,
    key_source: Raw<String>,
    private_key: Raw<String>,
    pkcs11: Option<Pkcs11File>,
}

#[derive(Debug, Default)]
struct Pkcs11File {
    module: Raw<String>,
    token_label: Raw<String>,
    key_label: Raw<String>,
    pin_env: Raw<String>,
    pin_file: Raw<String>,
    span: Option<Span>,
}

#[derive(Debug, Default)]
struct TrustFile {
    anchors: Raw<String>,
    revocation_lists: Vec<RevocationListFile>,
}

#[derive(Debug, Default)]
struct RevocationListFile {
    crl: Raw<String>,
    issuer: Raw<String>,
}

#[derive(Debug, Default)]
struct LimitsFile {
    clock_skew_ms: Raw<i64>,
    messages_per_minute: Raw<i64>,
    messages_per_hour: Raw<i64>,
    bytes_per_minute: Raw<i64>,
    connections_per_agent: Raw<i64>,
    connections_per_ip: Raw<i64>,
    bad_messages_per_connection_max: Raw<i64>,
    idle_timeout_ms: Raw<i64>,
    keep_alive_ms: Raw<i64>,
    outbound_queue_depth_max: Raw<i64>,
    replay_window_capacity: Raw<i64>,
}

#[derive(Debug, Default)]
struct BufferFile {
    queue_depth_per_agent_max: Raw<i64>,
    messages_max: Raw<i64>,
    bytes_max: Raw<i64>,
    retention_ms: Raw<i64>,
}

#[derive(Debug, Default)]
struct ShutdownFile {
    drain_timeout_ms: Raw<i64>,
    reconnect_after_ms: Raw<i64>,
}

#[derive(Debug, Default)]
struct LogFile {
    format: Raw<String>,
    level: Raw<String>,
}

/// Collects problems, turning byte spans into lines.
#[derive(Debug)]
struct Report<'t> {
    text: &'t str,
    problems: Vec<ConfigProblem>,
}

fn parse_document(text: &str, base_dir: &Path) -> Result<EdgeConfig, Vec<ConfigProblem>> {
    let mut report = Report { text, problems: Vec::new() };
    let (document, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        // The recovered document may be missing whole tables: judging it would only add
        // noise to the real mistakes.
        for error in syntax_errors {
            let message = error.message().trim().replace('\n', "; ");
            report.push(None, error.span(), ProblemKind::Syntax { message });
        }
        // Recovery often reports a second, derived error on the same line.
        let mut problems = report.into_problems();
        problems.dedup_by_key(|problem| problem.line);
        return Err(problems);
    }
    let file = read_file(document.get_ref(), &mut report);
    let config = validate(&file, base_dir, &mut report);
    if report.problems.is_empty() { Ok(config) } else { Err(report.into_problems()) }
}

fn read_file<'t>(root: &DeTable<'t>, report: &mut Report<'t>) -> ConfigFile {
    let mut top = TableReader::new(report, String::new(), Some(root), None, SECTION_KEYS);
    let edge = top.table("edge");
    let identity = top.table("identity");
    let trust = top.table("trust");
    let limits = top.table("limits");
    let buffer = top.table("buffer");
    let shutdown = top.table("shutdown");
    let log = top.table("log");
    let control_plane = top.table("control_plane");
    let config_version = top.integer("config_version");
    let federation = top.table("federation");
    top.finish();

    let mut r = TableReader::section(report, "edge", edge, EDGE_KEYS);
    let edge = EdgeFile {
        listen_addr: r.string("listen_addr"),
        admin_addr: r.string("admin_addr"),
        data_dir: r.string("data_dir"),
        region: r.string("region"),
    };
    r.finish();

    let identity = read_identity(report, identity);

    let trust = read_trust(report, trust);

    let mut r = TableReader::section(report, "limits", limits, LIMITS_KEYS);
    let limits = LimitsFile {
        clock_skew_ms: r.integer("clock_skew_ms"),
        messages_per_minute: r.integer("messages_per_minute"),
        messages_per_hour: r.integer("messages_per_hour"),
        bytes_per_minute: r.integer("bytes_per_minute"),
        connections_per_agent: r.integer("connections_per_agent"),
        connections_per_ip: r.integer("connections_per_ip"),
        bad_messages_per_connection_max: r.integer("bad_messages_per_connection_max"),
        idle_timeout_ms: r.integer("idle_timeout_ms"),
        keep_alive_ms: r.integer("keep_alive_ms"),
        outbound_queue_depth_max: r.integer("outbound_queue_depth_max"),
        replay_window_capacity: r.integer("replay_window_capacity"),
    };
    r.finish();

    let mut r = TableReader::section(report, "buffer", buffer, BUFFER_KEYS);
    let buffer = BufferFile {
        queue_depth_per_agent_max: r.integer("queue_depth_per_agent_max"),
        messages_max: r.integer("messages_max"),
        bytes_max: r.integer("bytes_max"),
        retention_ms: r.integer("retention_ms"),
    };
    r.finish();

    let mut r = TableReader::section(report, "shutdown", shutdown, SHUTDOWN_KEYS);
    let shutdown = ShutdownFile {
        drain_timeout_ms: r.integer("drain_timeout_ms"),
        reconnect_after_ms: r.integer("reconnect_after_ms"),
    };
    r.finish();

    let mut r = TableReader::section(report, "log", log, LOG_KEYS);
    let log = LogFile { format: r.string("format"), level: r.string("level") };
    r.finish();

    let control_plane = control_plane.table.is_some().then(|| read_control_plane(report, control_plane));
    let federation = federation.table.is_some().then(|| read_federation(report, federation));

    ConfigFile { config_version, edge, identity, trust, limits, buffer, shutdown, log, control_plane, federation }
}

/// `private_key` is required for a file key; `[identity.pkcs11]` for a PKCS#11 key.
fn read_identity<'t>(report: &mut Report<'t>, identity: TableAt<'_, 't>) -> IdentityFile {
    let span = identity.span.map(|(start, end)| start..end);
    let mut r = TableReader::section(report, "identity", identity, IDENTITY_KEYS);
    let certificate_chain = r.required_string("certificate_chain");
    let key_source = r.string("key_source");
    let uses_pkcs11 = key_source.as_ref().is_some_and(|source| source.get_ref() == "pkcs11");
    let private_key = if uses_pkcs11 { r.string("private_key") } else { r.required_string("private_key") };
    let pkcs11_at = r.table("pkcs11");
    if uses_pkcs11 && pkcs11_at.table.is_none() && r.value("pkcs11").is_none() {
        r.report.push(Some("identity.pkcs11".to_owned()), span.clone(), ProblemKind::MissingKey);
    }
    r.finish();
    let pkcs11 = pkcs11_at.table.is_some().then(|| {
        let table_span = pkcs11_at.span.map(|(start, end)| start..end);
        let mut r = TableReader::section(report, "identity.pkcs11", pkcs11_at, PKCS11_KEYS);
        let file = Pkcs11File {
            module: r.required_string("module"),
            token_label: r.required_string("token_label"),
            key_label: r.required_string("key_label"),
            pin_env: r.string("pin_env"),
            pin_file: r.string("pin_file"),
            span: table_span,
        };
        r.finish();
        file
    });
    IdentityFile { certificate_chain, key_source, private_key, pkcs11 }
}

fn read_trust<'t>(report: &mut Report<'t>, trust: TableAt<'_, 't>) -> TrustFile {
    let mut r = TableReader::section(report, "trust", trust, TRUST_KEYS);
    let anchors = r.required_string("anchors");
    let lists = r.array_of_tables("revocation_lists");
    r.finish();
    let revocation_lists = lists
        .into_iter()
        .enumerate()
        .map(|(index, list)| {
            if list.table.is_none() {
                // Not a table: already reported, and its keys cannot be missing.
                return RevocationListFile::default();
            }
            let path = format!("trust.revocation_lists[{index}]");
            let mut r = TableReader::new(report, path, list.table, list.span, REVOCATION_LIST_KEYS);
            let file = RevocationListFile { crl: r.required_string("crl"), issuer: r.required_string("issuer") };
            r.finish();
            file
        })
        .collect();
    TrustFile { anchors, revocation_lists }
}

fn read_control_plane<'t>(report: &mut Report<'t>, at: TableAt<'_, 't>) -> ControlPlaneFile {
    let mut r = TableReader::section(report, "control_plane", at, CONTROL_PLANE_KEYS);
    let file = ControlPlaneFile {
        grpc_addr: r.required_string("grpc_addr"),
        server_name: r.string("server_name"),
        trust_anchor: r.required_string("trust_anchor"),
        bundle_cache: r.string("bundle_cache"),
        advertise_addr: r.string("advertise_addr"),
        presence_interval_ms: r.integer("presence_interval_ms"),
        reconnect_backoff_min_ms: r.integer("reconnect_backoff_min_ms"),
        reconnect_backoff_max_ms: r.integer("reconnect_backoff_max_ms"),
        renew_at_remaining_percent: r.integer("renew_at_remaining_percent"),
        renew_check_interval_ms: r.integer("renew_check_interval_ms"),
    };
    r.finish();
    file
}

fn read_federation<'t>(report: &mut Report<'t>, at: TableAt<'_, 't>) -> FederationFile {
    let mut r = TableReader::section(report, "federation", at, FEDERATION_KEYS);
    let file = FederationFile {
        listen_addr: r.required_string("listen_addr"),
        advertise_addr: r.string("advertise_addr"),
        presence_fresh_ms: r.integer("presence_fresh_ms"),
        handoff_interval_ms: r.integer("handoff_interval_ms"),
        link_queue_depth: r.integer("link_queue_depth"),
        span: at.span.map(|(start, end)| start..end),
    };
    r.finish();
    file
}

/// A table found in the document, or not.
#[derive(Debug, Clone, Copy)]
struct TableAt<'d, 't> {
    table: Option<&'d DeTable<'t>>,
    span: Option<(usize, usize)>,
}

/// Reads the keys of one table, reporting wrong types, missing and unknown keys.
struct TableReader<'r, 'd, 't> {
    report: &'r mut Report<'t>,
    /// Dotted path of the table; empty for the document.
    path: String,
    table: Option<&'d DeTable<'t>>,
    /// Where the table is, for keys missing from it.
    span: Option<(usize, usize)>,
    known: &'static [&'static str],
}

impl<'r, 'd, 't> TableReader<'r, 'd, 't> {
    fn new(
        report: &'r mut Report<'t>,
        path: String,
        table: Option<&'d DeTable<'t>>,
        span: Option<(usize, usize)>,
        known: &'static [&'static str],
    ) -> Self {
        TableReader { report, path, table, span, known }
    }

    fn section(report: &'r mut Report<'t>, name: &str, at: TableAt<'d, 't>, known: &'static [&'static str]) -> Self {
        Self::new(report, name.to_owned(), at.table, at.span, known)
    }

    fn key_path(&self, key: &str) -> String {
        join_key(&self.path, key)
    }

    fn value(&self, key: &str) -> Option<&'d Spanned<DeValue<'t>>> {
        debug_assert!(self.known.contains(&key), "{key} is not a known key");
        self.table?.get(key)
    }

    fn wrong_type(&mut self, key: String, value: &Spanned<DeValue<'t>>, expected: &'static str) {
        let found = value.get_ref().type_str();
        self.report.push(Some(key), Some(value.span()), ProblemKind::WrongType { expected, found });
    }

    fn table(&mut self, key: &str) -> TableAt<'d, 't> {
        let Some(value) = self.value(key) else { return TableAt { table: None, span: None } };
        match value.get_ref() {
            DeValue::Table(table) => TableAt { table: Some(table), span: Some((value.span().start, value.span().end)) },
            _ => {
                self.wrong_type(self.key_path(key), value, "table");
                TableAt { table: None, span: None }
            }
        }
    }

    fn string(&mut self, key: &str) -> Raw<String> {
        let value = self.value(key)?;
        match value.get_ref() {
            DeValue::String(text) => Some(Spanned::new(value.span(), text.to_string())),
            _ => {
                self.wrong_type(self.key_path(key), value, "string");
                None
            }
        }
    }

    fn required_string(&mut self, key: &str) -> Raw<String> {
        if self.value(key).is_none() {
            let span = self.span.map(|(start, end)| start..end);
            self.report.push(Some(self.key_path(key)), span, ProblemKind::MissingKey);
            return None;
        }
        self.string(key)
    }

    fn integer(&mut self, key: &str) -> Raw<i64> {
        let value = self.value(key)?;
        let DeValue::Integer(integer) = value.get_ref() else {
            self.wrong_type(self.key_path(key), value, "integer");
            return None;
        };
        match i64::from_str_radix(integer.as_str(), integer.radix()) {
            Ok(number) => Some(Spanned::new(value.span(), number)),
            Err(_) => {
                let reason = format!("integer {integer} does not fit in 64 bits");
                let kind = ProblemKind::InvalidValue { reason };
                self.report.push(Some(self.key_path(key)), Some(value.span()), kind);
                None
            }
        }
    }

    fn array_of_tables(&mut self, key: &str) -> Vec<TableAt<'d, 't>> {
        let Some(value) = self.value(key) else { return Vec::new() };
        let DeValue::Array(array) = value.get_ref() else {
            self.wrong_type(self.key_path(key), value, "array of tables");
            return Vec::new();
        };
        let mut tables = Vec::with_capacity(array.len());
        for (index, element) in array.iter().enumerate() {
            let span = element.span();
            match element.get_ref() {
                DeValue::Table(table) => {
                    tables.push(TableAt { table: Some(table), span: Some((span.start, span.end)) })
                }
                _ => {
                    let path = format!("{}[{index}]", self.key_path(key));
                    self.wrong_type(path, element, "table");
                    // Keep the index of later entries equal to their position in the file.
                    tables.push(TableAt { table: None, span: Some((span.start, span.end)) });
                }
            }
        }
        tables
    }

    /// Reports the keys of the table that are not known.
    fn finish(self) {
        let Some(table) = self.table else { return };
        for (key, _) in table.iter() {
            let name: &str = key.get_ref();
            if self.known.contains(&name) {
                continue;
            }
            let suggestion = suggest(name, &self.path, self.known);
            let kind = ProblemKind::UnknownKey { suggestion };
            self.report.push(Some(join_key(&self.path, name)), Some(key.span()), kind);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Pass 2: typed values and the relations between them.

fn validate(file: &ConfigFile, base_dir: &Path, report: &mut Report<'_>) -> EdgeConfig {
    validate_version(&file.config_version, report);
    EdgeConfig {
        edge: validate_server(&file.edge, base_dir, report),
        identity: validate_identity(&file.identity, base_dir, report),
        trust: validate_trust(&file.trust, base_dir, report),
        limits: validate_limits(&file.limits, report),
        buffer: validate_buffer(&file.buffer, report),
        shutdown: validate_shutdown(&file.shutdown, report),
        log: validate_log(&file.log, report),
        control_plane: file.control_plane.as_ref().map(|file| validate_control_plane(file, base_dir, report)),
        federation: file.federation.as_ref().map(|federation| {
            if file.control_plane.is_none() {
                let reason = "edge-to-edge links need [control_plane]: its presence data says where agents are".into();
                report.push(Some("federation".into()), federation.span.clone(), ProblemKind::InvalidValue { reason });
            }
            validate_federation(federation, report)
        }),
    }
}

fn socket_address(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| {
        format!("invalid socket address {text:?}: expected an IP address and port, e.g. \"10.0.0.1:7701\"")
    })
}

fn validate_federation(file: &FederationFile, report: &mut Report<'_>) -> FederationConfig {
    FederationConfig {
        listen_addr: report
            .convert("federation.listen_addr", &file.listen_addr, socket_address)
            .unwrap_or(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))),
        advertise_addr: report.convert("federation.advertise_addr", &file.advertise_addr, socket_address),
        presence_fresh: report
            .millis(
                "federation.presence_fresh_ms",
                &file.presence_fresh_ms,
                millis_of(PRESENCE_FRESH_MIN)..=millis_of(PRESENCE_FRESH_MAX),
            )
            .unwrap_or(DEFAULT_PRESENCE_FRESH),
        handoff_interval: report
            .millis(
                "federation.handoff_interval_ms",
                &file.handoff_interval_ms,
                millis_of(HANDOFF_INTERVAL_MIN)..=millis_of(HANDOFF_INTERVAL_MAX),
            )
            .unwrap_or(DEFAULT_HANDOFF_INTERVAL),
        link_queue_depth: report
            .integer("federation.link_queue_depth", &file.link_queue_depth, 1..=LINK_QUEUE_DEPTH_MAX as u64)
            .and_then(|depth| usize::try_from(depth).ok())
            .and_then(NonZeroUsize::new)
            .unwrap_or(DEFAULT_LINK_QUEUE_DEPTH),
    }
}

/// A version this edge reads: from [`CONFIG_VERSION_UNVERSIONED`] to
/// [`CONFIG_VERSION_CURRENT`].
fn validate_version(raw: &Raw<i64>, report: &mut Report<'_>) {
    let Some(raw) = raw else { return };
    let version = *raw.get_ref();
    let reason = if version > i64::from(CONFIG_VERSION_CURRENT) {
        format!(
            "version {version} is newer than this molt-edge reads (up to {CONFIG_VERSION_CURRENT}); upgrade molt-edge"
        )
    } else if version < i64::from(CONFIG_VERSION_UNVERSIONED) {
        format!("version {version} does not exist: versions start at {CONFIG_VERSION_UNVERSIONED}")
    } else {
        return;
    };
    report.invalid("config_version", raw.span(), reason);
}

fn validate_control_plane(file: &ControlPlaneFile, base_dir: &Path, report: &mut Report<'_>) -> ControlPlaneConfig {
    let address = |text: &str| {
        text.parse::<SocketAddr>().map_err(|_| {
            format!("invalid socket address {text:?}: expected an IP address and port, e.g. \"10.0.0.1:7443\"")
        })
    };
    let name = |text: &str| {
        if text.is_empty() || text.len() > 253 {
            Err("server name must be 1 to 253 characters".to_owned())
        } else {
            Ok(text.to_owned())
        }
    };
    let bundle_cache = match &file.bundle_cache {
        Some(_) => report.path("control_plane.bundle_cache", &file.bundle_cache, base_dir),
        None => base_dir.join(DEFAULT_BUNDLE_CACHE),
    };
    let config = ControlPlaneConfig {
        grpc_addr: report
            .convert("control_plane.grpc_addr", &file.grpc_addr, address)
            .unwrap_or(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))),
        server_name: report
            .convert("control_plane.server_name", &file.server_name, name)
            .unwrap_or_else(|| DEFAULT_CONTROL_PLANE_SERVER_NAME.to_owned()),
        trust_anchor: report.path("control_plane.trust_anchor", &file.trust_anchor, base_dir),
        bundle_cache,
        advertise_addr: report.convert("control_plane.advertise_addr", &file.advertise_addr, address),
        presence_interval: report
            .millis(
                "control_plane.presence_interval_ms",
                &file.presence_interval_ms,
                millis_of(PRESENCE_INTERVAL_MIN)..=millis_of(PRESENCE_INTERVAL_MAX),
            )
            .unwrap_or(DEFAULT_PRESENCE_INTERVAL),
        reconnect_backoff_min: report
            .millis(
                "control_plane.reconnect_backoff_min_ms",
                &file.reconnect_backoff_min_ms,
                millis_of(RECONNECT_BACKOFF_FLOOR)..=millis_of(RECONNECT_BACKOFF_CEILING),
            )
            .unwrap_or(DEFAULT_RECONNECT_BACKOFF_MIN),
        reconnect_backoff_max: report
            .millis(
                "control_plane.reconnect_backoff_max_ms",
                &file.reconnect_backoff_max_ms,
                millis_of(RECONNECT_BACKOFF_FLOOR)..=millis_of(RECONNECT_BACKOFF_CEILING),
            )
            .unwrap_or(DEFAULT_RECONNECT_BACKOFF_MAX),
        renew_at_remaining_percent: report
            .integer(
                "control_plane.renew_at_remaining_percent",
                &file.renew_at_remaining_percent,
                u64::from(RENEW_AT_REMAINING_PERCENT_MIN)..=u64::from(RENEW_AT_REMAINING_PERCENT_MAX),
            )
            .and_then(|percent| u8::try_from(percent).ok())
            .unwrap_or(DEFAULT_RENEW_AT_REMAINING_PERCENT),
        renew_check_interval: report
            .millis(
                "control_plane.renew_check_interval_ms",
                &file.renew_check_interval_ms,
                millis_of(RENEW_CHECK_INTERVAL_MIN)..=millis_of(RENEW_CHECK_INTERVAL_MAX),
            )
            .unwrap_or(DEFAULT_RENEW_CHECK_INTERVAL),
    };
    if config.reconnect_backoff_min > config.reconnect_backoff_max {
        let reason = format!(
            "reconnect_backoff_min_ms ({}) must not exceed control_plane.reconnect_backoff_max_ms ({})",
            config.reconnect_backoff_min.as_millis(),
            config.reconnect_backoff_max.as_millis()
        );
        report.relation(
            "control_plane.reconnect_backoff_min_ms",
            [&file.reconnect_backoff_min_ms, &file.reconnect_backoff_max_ms],
            reason,
        );
    }
    config
}

fn validate_identity(file: &IdentityFile, base_dir: &Path, report: &mut Report<'_>) -> IdentityConfig {
    let certificate_chain = report.path("identity.certificate_chain", &file.certificate_chain, base_dir);
    let uses_pkcs11 = report
        .convert("identity.key_source", &file.key_source, |source| match source {
            "file" => Ok(false),
            "pkcs11" => Ok(true),
            other => Err(format!("key source must be \"file\" or \"pkcs11\", found {other:?}")),
        })
        .unwrap_or(false);
    if !uses_pkcs11 {
        if let Some(pkcs11) = &file.pkcs11 {
            let reason = "[identity.pkcs11] is only used with key_source = \"pkcs11\"".to_owned();
            report.push(Some("identity.pkcs11".into()), pkcs11.span.clone(), ProblemKind::InvalidValue { reason });
        }
        let private_key = report.path("identity.private_key", &file.private_key, base_dir);
        return IdentityConfig { certificate_chain, key: KeySource::File(private_key) };
    }
    if let Some(private_key) = &file.private_key {
        let reason = "private_key is not used with key_source = \"pkcs11\"; remove it".to_owned();
        report.invalid("identity.private_key", private_key.span(), reason);
    }
    let pkcs11 = file.pkcs11.as_ref().map(|pkcs11| validate_pkcs11(pkcs11, base_dir, report));
    IdentityConfig {
        certificate_chain,
        key: KeySource::Pkcs11(pkcs11.unwrap_or_else(|| Pkcs11KeyConfig {
            module: PathBuf::new(),
            token_label: String::new(),
            key_label: String::new(),
            pin: molt_hsm::PinSource::Env(String::new()),
        })),
    }
}

fn validate_pkcs11(file: &Pkcs11File, base_dir: &Path, report: &mut Report<'_>) -> Pkcs11KeyConfig {
    let label = |text: &str| {
        if text.is_empty() { Err("label must not be empty".to_owned()) } else { Ok(text.to_owned()) }
    };
    let module = report.path("identity.pkcs11.module", &file.module, base_dir);
    let token_label = report.convert("identity.pkcs11.token_label", &file.token_label, label).unwrap_or_default();
    let key_label = report.convert("identity.pkcs11.key_label", &file.key_label, label).unwrap_or_default();
    let pin = match (&file.pin_env, &file.pin_file) {
        (Some(_), Some(pin_file)) => {
            report.invalid("identity.pkcs11.pin_file", pin_file.span(), "give pin_env or pin_file, not both".into());
            molt_hsm::PinSource::Env(String::new())
        }
        (Some(_), None) => molt_hsm::PinSource::Env(
            report
                .convert("identity.pkcs11.pin_env", &file.pin_env, |name| {
                    if name.is_empty() {
                        Err("variable name must not be empty".to_owned())
                    } else {
                        Ok(name.to_owned())
                    }
                })
                .unwrap_or_default(),
        ),
        (None, Some(_)) => molt_hsm::PinSource::File(report.path("identity.pkcs11.pin_file", &file.pin_file, base_dir)),
        (None, None) => {
            report.push(Some("identity.pkcs11.pin_env".into()), file.span.clone(), ProblemKind::MissingKey);
            molt_hsm::PinSource::Env(String::new())
        }
    };
    Pkcs11KeyConfig { module, token_label, key_label, pin }
}

fn validate_server(file: &EdgeFile, base_dir: &Path, report: &mut Report<'_>) -> ServerConfig {
    let address = |text: &str| {
        text.parse::<SocketAddr>().map_err(|_| {
            format!("invalid socket address {text:?}: expected an IP address and port, e.g. \"0.0.0.0:4433\"")
        })
    };
    let data_dir = match &file.data_dir {
        Some(_) => report.path("edge.data_dir", &file.data_dir, base_dir),
        None => base_dir.join(DEFAULT_DATA_DIR),
    };
    ServerConfig {
        listen_addr: report.convert("edge.listen_addr", &file.listen_addr, address).unwrap_or(DEFAULT_LISTEN_ADDR),
        admin_addr: report.convert("edge.admin_addr", &file.admin_addr, address).unwrap_or(DEFAULT_ADMIN_ADDR),
        data_dir,
        region: report.convert("edge.region", &file.region, from_str::<Region>).unwrap_or_default(),
    }
}

fn validate_trust(file: &TrustFile, base_dir: &Path, report: &mut Report<'_>) -> TrustConfig {
    let revocation_lists = file
        .revocation_lists
        .iter()
        .enumerate()
        .map(|(index, list)| {
            let key = |name: &str| format!("trust.revocation_lists[{index}].{name}");
            RevocationListConfig {
                crl: report.path(&key("crl"), &list.crl, base_dir),
                issuer: report.path(&key("issuer"), &list.issuer, base_dir),
            }
        })
        .collect();
    TrustConfig { anchors: report.path("trust.anchors", &file.anchors, base_dir), revocation_lists }
}

fn validate_limits(file: &LimitsFile, report: &mut Report<'_>) -> LimitsConfig {
    let default = LimitsConfig::default();
    let limits = LimitsConfig {
        clock_skew: report
            .millis("limits.clock_skew_ms", &file.clock_skew_ms, 1..=millis_of(CLOCK_SKEW_MAX))
            .unwrap_or(default.clock_skew),
        messages_per_minute: report
            .count_u32("limits.messages_per_minute", &file.messages_per_minute)
            .unwrap_or(default.messages_per_minute),
        messages_per_hour: report
            .count_u32("limits.messages_per_hour", &file.messages_per_hour)
            .unwrap_or(default.messages_per_hour),
        bytes_per_minute: report
            .integer("limits.bytes_per_minute", &file.bytes_per_minute, limits::MAX_PAYLOAD_BYTES as u64..=u64::MAX)
            .and_then(NonZeroU64::new)
            .unwrap_or(default.bytes_per_minute),
        connections_per_agent: report
            .count_u32("limits.connections_per_agent", &file.connections_per_agent)
            .unwrap_or(default.connections_per_agent),
        connections_per_ip: report
            .count_u32("limits.connections_per_ip", &file.connections_per_ip)
            .unwrap_or(default.connections_per_ip),
        bad_messages_per_connection_max: report
            .integer(
                "limits.bad_messages_per_connection_max",
                &file.bad_messages_per_connection_max,
                0..=u32::MAX.into(),
            )
            .and_then(|value| u32::try_from(value).ok())
            .unwrap_or(default.bad_messages_per_connection_max),
        idle_timeout: report
            .millis("limits.idle_timeout_ms", &file.idle_timeout_ms, 1..=millis_of(IDLE_TIMEOUT_MAX))
            .unwrap_or(default.idle_timeout),
        keep_alive: report
            .millis("limits.keep_alive_ms", &file.keep_alive_ms, 1..=millis_of(IDLE_TIMEOUT_MAX))
            .unwrap_or(default.keep_alive),
        outbound_queue_depth_max: report
            .count_usize("limits.outbound_queue_depth_max", &file.outbound_queue_depth_max)
            .unwrap_or(default.outbound_queue_depth_max),
        replay_window_capacity: report
            .count_usize("limits.replay_window_capacity", &file.replay_window_capacity)
            .unwrap_or(default.replay_window_capacity),
    };
    if limits.messages_per_minute > limits.messages_per_hour {
        let reason = format!(
            "messages_per_minute ({}) must not exceed limits.messages_per_hour ({})",
            limits.messages_per_minute, limits.messages_per_hour
        );
        report.relation("limits.messages_per_minute", [&file.messages_per_minute, &file.messages_per_hour], reason);
    }
    if limits.keep_alive >= limits.idle_timeout {
        let reason = format!(
            "keep_alive_ms ({}) must be less than limits.idle_timeout_ms ({}), or idle connections time out between keep-alives",
            limits.keep_alive.as_millis(),
            limits.idle_timeout.as_millis()
        );
        report.relation("limits.keep_alive_ms", [&file.keep_alive_ms, &file.idle_timeout_ms], reason);
    }
    limits
}

fn validate_buffer(file: &BufferFile, report: &mut Report<'_>) -> BufferConfig {
    let default = BufferConfig::default();
    let buffer = BufferConfig {
        queue_depth_per_agent_max: report
            .count_u32("buffer.queue_depth_per_agent_max", &file.queue_depth_per_agent_max)
            .unwrap_or(default.queue_depth_per_agent_max),
        messages_max: report
            .integer("buffer.messages_max", &file.messages_max, 1..=u64::MAX)
            .and_then(NonZeroU64::new)
            .unwrap_or(default.messages_max),
        bytes_max: report
            .integer("buffer.bytes_max", &file.bytes_max, limits::MAX_ENVELOPE_BYTES as u64..=u64::MAX)
            .and_then(NonZeroU64::new)
            .unwrap_or(default.bytes_max),
        retention: report
            .millis("buffer.retention_ms", &file.retention_ms, 1..=millis_of(limits::MAX_TTL))
            .unwrap_or(default.retention),
    };
    if u64::from(buffer.queue_depth_per_agent_max.get()) > buffer.messages_max.get() {
        let reason = format!(
            "queue_depth_per_agent_max ({}) must not exceed buffer.messages_max ({})",
            buffer.queue_depth_per_agent_max, buffer.messages_max
        );
        report.relation(
            "buffer.queue_depth_per_agent_max",
            [&file.queue_depth_per_agent_max, &file.messages_max],
            reason,
        );
    }
    buffer
}

fn validate_shutdown(file: &ShutdownFile, report: &mut Report<'_>) -> ShutdownConfig {
    let default = ShutdownConfig::default();
    ShutdownConfig {
        drain_timeout: report
            .millis("shutdown.drain_timeout_ms", &file.drain_timeout_ms, 0..=millis_of(DRAIN_TIMEOUT_MAX))
            .unwrap_or(default.drain_timeout),
        reconnect_after: report
            .millis("shutdown.reconnect_after_ms", &file.reconnect_after_ms, 0..=millis_of(RECONNECT_AFTER_MAX))
            .unwrap_or(default.reconnect_after),
    }
}

fn validate_log(file: &LogFile, report: &mut Report<'_>) -> LogConfig {
    LogConfig {
        format: report.convert("log.format", &file.format, from_str::<LogFormat>).unwrap_or_default(),
        level: report.convert("log.level", &file.level, from_str::<LogFilter>).unwrap_or_default(),
    }
}

fn from_str<T>(text: &str) -> Result<T, String>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    text.parse().map_err(|error: T::Err| error.to_string())
}

impl Report<'_> {
    fn push(&mut self, key: Option<String>, span: Option<Span>, kind: ProblemKind) {
        let line = span.map(|span| self.line_of(span.start));
        self.problems.push(ConfigProblem { key, line, kind });
    }

    fn invalid(&mut self, key: &str, span: Span, reason: String) {
        self.push(Some(key.to_owned()), Some(span), ProblemKind::InvalidValue { reason });
    }

    /// 1-based line of a byte offset.
    fn line_of(&self, offset: usize) -> usize {
        let before = self.text.as_bytes().get(..offset).unwrap_or(self.text.as_bytes());
        before.iter().filter(|&&byte| byte == b'\n').count() + 1
    }

    /// Problems sorted by line, those without a line last.
    fn into_problems(mut self) -> Vec<ConfigProblem> {
        self.problems.sort_by_key(|problem| (problem.line.is_none(), problem.line));
        self.problems
    }

    fn convert<T>(&mut self, key: &str, raw: &Raw<String>, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let raw = raw.as_ref()?;
        parse(raw.get_ref()).map_err(|reason| self.invalid(key, raw.span(), reason)).ok()
    }

    /// A path resolved against `base_dir`; empty when absent (a required key, already
    /// reported missing).
    fn path(&mut self, key: &str, raw: &Raw<String>, base_dir: &Path) -> PathBuf {
        let non_empty = |text: &str| {
            if text.is_empty() { Err("path must not be empty".to_owned()) } else { Ok(base_dir.join(text)) }
        };
        self.convert(key, raw, non_empty).unwrap_or_default()
    }

    fn integer(&mut self, key: &str, raw: &Raw<i64>, range: RangeInclusive<u64>) -> Option<u64> {
        let raw = raw.as_ref()?;
        let value = *raw.get_ref();
        let reason = match u64::try_from(value) {
            Ok(value) if range.contains(&value) => return Some(value),
            Ok(value) if value < *range.start() => format!("{value} is too small: must be at least {}", range.start()),
            Ok(value) => format!("{value} is too large: must be at most {}", range.end()),
            Err(_) => format!("{value} is negative: must be at least {}", range.start()),
        };
        self.invalid(key, raw.span(), reason);
        None
    }

    fn count_u32(&mut self, key: &str, raw: &Raw<i64>) -> Option<NonZeroU32> {
        let value = self.integer(key, raw, 1..=u32::MAX.into())?;
        u32::try_from(value).ok().and_then(NonZeroU32::new)
    }

    /// A count held in memory: bounded by `u32::MAX` so it means the same on every target.
    fn count_usize(&mut self, key: &str, raw: &Raw<i64>) -> Option<NonZeroUsize> {
        let value = self.integer(key, raw, 1..=u32::MAX.into())?;
        usize::try_from(value).ok().and_then(NonZeroUsize::new)
    }

    fn millis(&mut self, key: &str, raw: &Raw<i64>, range_ms: RangeInclusive<u64>) -> Option<Duration> {
        self.integer(key, raw, range_ms).map(Duration::from_millis)
    }

    /// Reports a broken relation between keys, at the line of the first key that is set.
    fn relation(&mut self, key: &str, raws: [&Raw<i64>; 2], reason: String) {
        let span = raws.iter().find_map(|raw| raw.as_ref().map(Spanned::span));
        self.push(Some(key.to_owned()), span, ProblemKind::InvalidValue { reason });
    }
}

// ---------------------------------------------------------------------------------------
// Display helpers and suggestions.

struct ProblemList<'a> {
    file: Option<&'a Path>,
    problems: &'a [ConfigProblem],
}

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        let plural = if count == 1 { "" } else { "s" };
        match self.file {
            Some(file) => write!(f, "invalid edge config {} ({count} problem{plural}):", file.display())?,
            None => write!(f, "invalid edge config ({count} problem{plural}):")?,
        }
        for problem in self.problems {
            write!(f, "\n  ")?;
            match (self.file, problem.line) {
                (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
                (Some(file), None) => write!(f, "{}: ", file.display())?,
                (None, Some(line)) => write!(f, "line {line}: ")?,
                (None, None) => {}
            }
            if let Some(key) = &problem.key {
                write!(f, "{key}: ")?;
            }
            write!(f, "{}", problem.kind)?;
        }
        Ok(())
    }
}

fn suggestion_text(suggestion: Option<&str>) -> String {
    suggestion.map(|key| format!(" (did you mean `{key}`?)")).unwrap_or_default()
}

/// Appends `key` to a dotted path, quoting it when it is not a bare TOML key.
fn join_key(path: &str, key: &str) -> String {
    let bare = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if bare { key.to_owned() } else { format!("{key:?}") };
    if path.is_empty() { key } else { format!("{path}.{key}") }
}

/// The known key closest to `unknown` in the same table, or else the same key in another
/// table (a key put in the wrong section).
fn suggest(unknown: &str, path: &str, known: &[&str]) -> Option<String> {
    let close = known
        .iter()
        .map(|candidate| (edit_distance(unknown, candidate), *candidate))
        .filter(|(distance, candidate)| {
            *distance <= (candidate.len() / 3).max(1)
                || (unknown.len() >= 3 && (candidate.starts_with(unknown) || unknown.starts_with(candidate)))
        })
        .min();
    if let Some((_, candidate)) = close {
        return Some(candidate.to_owned());
    }
    ALL_TABLES
        .iter()
        .filter(|(table, keys)| *table != path && !std::ptr::eq(*keys, known) && keys.contains(&unknown))
        .map(|(table, _)| join_key(table, unknown))
        .next()
}

/// Levenshtein distance in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// Whole milliseconds of a duration; every duration here is far below `u64::MAX` ms.
const fn millis_of(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

const fn nonzero_u32(value: u32) -> NonZeroU32 {
    match NonZeroU32::new(value) {
        Some(value) => value,
        None => panic!("default must not be zero"),
    }
}

const fn nonzero_u64(value: u64) -> NonZeroU64 {
    match NonZeroU64::new(value) {
        Some(value) => value,
        None => panic!("default must not be zero"),
    }
}

const fn nonzero_usize(value: usize) -> NonZeroUsize {
    match NonZeroUsize::new(value) {
        Some(value) => value,
        None => panic!("default must not be zero"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[identity]
certificate_chain = "edge.pem"
private_key = "edge.key"
[trust]
anchors = "root.pem"
"#;

    fn base() -> &'static Path {
        Path::new("/etc/molt")
    }

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match parse(text, base()) {
            Ok(config) => panic!("expected problems, parsed {config:?}"),
            Err(error) => error.problems().to_vec(),
        }
    }

    /// The single problem reported for `text`.
    fn only_problem(text: &str) -> ConfigProblem {
        let mut all = problems(text);
        assert_eq!(all.len(), 1, "expected one problem, got {all:#?}");
        all.remove(0)
    }

    fn with_minimal(extra: &str) -> String {
        format!("{MINIMAL}{extra}")
    }

    fn invalid_reason(problem: &ConfigProblem) -> &str {
        match &problem.kind {
            ProblemKind::InvalidValue { reason } => reason,
            other => panic!("expected an invalid value, got {other:?}"),
        }
    }

    #[test]
    fn minimal_file_gets_every_default() {
        let config = parse(MINIMAL, base()).expect("minimal config parses");
        assert_eq!(config.edge.listen_addr, "0.0.0.0:4433".parse().unwrap());
        assert_eq!(config.edge.admin_addr, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(config.edge.data_dir, Path::new("/etc/molt/data"));
        assert_eq!(config.edge.region.as_str(), "local");
        assert_eq!(config.identity.certificate_chain, Path::new("/etc/molt/edge.pem"));
        assert_eq!(config.identity.key, KeySource::File(Path::new("/etc/molt/edge.key").into()));
        assert_eq!(config.trust.anchors, Path::new("/etc/molt/root.pem"));
        assert!(config.trust.revocation_lists.is_empty());
        assert_eq!(config.limits, LimitsConfig::default());
        assert_eq!(config.buffer, BufferConfig::default());
        assert_eq!(config.shutdown, ShutdownConfig::default());
        assert_eq!(config.log, LogConfig::default());
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let limits = LimitsConfig::default();
        assert_eq!(limits.clock_skew, Duration::from_millis(300_000));
        assert_eq!(limits.messages_per_minute.get(), 1000);
        assert_eq!(limits.messages_per_hour.get(), 50_000);
        assert_eq!(limits.bytes_per_minute.get(), 104_857_600);
        assert_eq!(limits.connections_per_agent.get(), 5);
        assert_eq!(limits.connections_per_ip.get(), 100);
        assert_eq!(limits.bad_messages_per_connection_max, 100);
        assert_eq!(limits.idle_timeout, Duration::from_millis(60_000));
        assert_eq!(limits.keep_alive, Duration::from_millis(30_000));
        assert_eq!(limits.outbound_queue_depth_max.get(), 1024);
        assert_eq!(limits.replay_window_capacity.get(), 1_048_576);
        let buffer = BufferConfig::default();
        assert_eq!(buffer.queue_depth_per_agent_max.get(), 10_000);
        assert_eq!(buffer.messages_max.get(), 1_000_000);
        assert_eq!(buffer.bytes_max.get(), 1_073_741_824);
        assert_eq!(buffer.retention, Duration::from_millis(604_800_000));
        let shutdown = ShutdownConfig::default();
        assert_eq!(shutdown.drain_timeout, Duration::from_millis(5000));
        assert_eq!(shutdown.reconnect_after_ms(), 1000);
        let log = LogConfig::default();
        assert_eq!((log.format, log.level.as_str()), (LogFormat::Text, "info"));
    }

    #[test]
    fn reference_parses_and_shows_the_defaults() {
        let config = parse(reference(), base()).expect("reference config parses");
        assert_eq!(config.limits, LimitsConfig::default());
        assert_eq!(config.buffer, BufferConfig::default());
        assert_eq!(config.shutdown, ShutdownConfig::default());
        assert_eq!(config.log, LogConfig::default());
        let minimal = parse(MINIMAL, base()).unwrap();
        assert_eq!(config.edge, minimal.edge);
        assert_eq!(
            config.trust.revocation_lists,
            vec![RevocationListConfig {
                crl: PathBuf::from("/etc/molt/org.crl"),
                issuer: PathBuf::from("/etc/molt/org.pem"),
            }]
        );
    }

    #[test]
    fn reference_documents_every_key() {
        let reference = reference();
        for (table, keys) in ALL_TABLES.iter().filter(|(table, _)| !table.is_empty()) {
            for key in *keys {
                let assignment = format!("\n{key} = ");
                let header = format!("[{table}.{key}]");
                // The PKCS#11 table is the alternative to `private_key`: shown commented out.
                let commented = matches!(*table, "identity.pkcs11" | "control_plane" | "federation")
                    && reference.contains(&format!("\n# {key} = "));
                assert!(
                    commented
                        || reference.contains(&assignment)
                        || reference.contains(&format!("[[{table}.{key}]]"))
                        || reference.contains(&header),
                    "{table}.{key} is not in the reference"
                );
            }
        }
    }

    #[test]
    fn identity_key_can_live_in_a_pkcs11_token() {
        let text = "[identity]\ncertificate_chain = \"edge.pem\"\nkey_source = \"pkcs11\"\n\
                    [identity.pkcs11]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"edge\"\n\
                    key_label = \"edge-tls\"\npin_file = \"hsm.pin\"\n[trust]\nanchors = \"root.pem\"\n";
        let config = parse(text, base()).unwrap();
        assert_eq!(
            config.identity.key,
            KeySource::Pkcs11(Pkcs11KeyConfig {
                module: PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
                token_label: "edge".into(),
                key_label: "edge-tls".into(),
                pin: molt_hsm::PinSource::File(base().join("hsm.pin")),
            })
        );
        let text = text.replace("pin_file = \"hsm.pin\"", "pin_env = \"EDGE_PIN\"");
        let config = parse(&text, base()).unwrap();
        let KeySource::Pkcs11(pkcs11) = config.identity.key else { panic!("pkcs11 key expected") };
        assert_eq!(pkcs11.pin, molt_hsm::PinSource::Env("EDGE_PIN".into()));
        let config = parse(MINIMAL, base()).unwrap();
        assert!(matches!(config.identity.key, KeySource::File(_)));
    }

    #[test]
    fn pkcs11_identity_mistakes_are_reported_with_key_and_line() {
        let cases: &[(&str, &[(&str, usize)])] = &[
            // No table for a pkcs11 key.
            ("[identity]\ncertificate_chain = \"e.pem\"\nkey_source = \"pkcs11\"\n", &[("identity.pkcs11", 1)]),
            // Unknown source.
            (
                "[identity]\ncertificate_chain = \"e.pem\"\nkey_source = \"tpm\"\nprivate_key = \"k\"\n",
                &[("identity.key_source", 3)],
            ),
            // A pkcs11 table with a file key; a private key with a pkcs11 key.
            (
                "[identity]\ncertificate_chain = \"e.pem\"\nprivate_key = \"k\"\n[identity.pkcs11]\nmodule = \"m\"\n\
                 token_label = \"t\"\nkey_label = \"k\"\npin_env = \"P\"\n",
                &[("identity.pkcs11", 4)],
            ),
            (
                "[identity]\ncertificate_chain = \"e.pem\"\nkey_source = \"pkcs11\"\nprivate_key = \"k\"\n\
                 [identity.pkcs11]\nmodule = \"m\"\ntoken_label = \"t\"\nkey_label = \"k\"\npin_env = \"P\"\n",
                &[("identity.private_key", 4)],
            ),
            // Missing keys, both PIN sources, an empty label, an unknown key.
            (
                "[identity]\ncertificate_chain = \"e.pem\"\nkey_source = \"pkcs11\"\n[identity.pkcs11]\n\
                 token_label = \"\"\npin = \"1234\"\n",
                &[
                    ("identity.pkcs11.module", 4),
                    ("identity.pkcs11.key_label", 4),
                    ("identity.pkcs11.pin_env", 4),
                    ("identity.pkcs11.token_label", 5),
                    ("identity.pkcs11.pin", 6),
                ],
            ),
            (
                "[identity]\ncertificate_chain = \"e.pem\"\nkey_source = \"pkcs11\"\n[identity.pkcs11]\nmodule = \"m\"\n\
                 token_label = \"t\"\nkey_label = \"k\"\npin_env = \"P\"\npin_file = \"f\"\n",
                &[("identity.pkcs11.pin_file", 9)],
            ),
        ];
        for (identity, expected) in cases {
            let text = format!("{identity}[trust]\nanchors = \"root.pem\"\n");
            let error = parse(&text, base()).unwrap_err();
            let found: Vec<(String, usize)> = error
                .problems()
                .iter()
                .map(|problem| (problem.key.clone().unwrap_or_default(), problem.line.unwrap_or(0)))
                .collect();
            for (key, line) in *expected {
                assert!(
                    found.contains(&((*key).to_owned(), *line)),
                    "{key} at line {line} not in {found:?} for\n{text}"
                );
            }
            assert_eq!(found.len(), expected.len(), "{found:?} for\n{text}");
        }
    }

    #[test]
    fn full_file_sets_every_value() {
        let text = r#"
[edge]
listen_addr = "[::]:5000"
admin_addr = "10.0.0.1:9999"
data_dir = "/var/lib/molt"
region = "eu-west-1"
[identity]
certificate_chain = "certs/edge.pem"
private_key = "/secrets/edge.key"
[trust]
anchors = "root.pem"
[[trust.revocation_lists]]
crl = "a.crl"
issuer = "a.pem"
[[trust.revocation_lists]]
crl = "b.crl"
issuer = "b.pem"
[limits]
clock_skew_ms = 1000
messages_per_minute = 10
messages_per_hour = 10
bytes_per_minute = 0x200000
connections_per_agent = 1
connections_per_ip = 2
bad_messages_per_connection_max = 0
idle_timeout_ms = 10_000
keep_alive_ms = 9_999
outbound_queue_depth_max = 8
replay_window_capacity = 16
[buffer]
queue_depth_per_agent_max = 5
messages_max = 5
bytes_max = 2000000
retention_ms = 1
[shutdown]
drain_timeout_ms = 0
reconnect_after_ms = 3600000
[log]
format = "json"
level = "warn,molt_edge=debug"
"#;
        let config = parse(text, base()).expect("full config parses");
        assert_eq!(config.edge.listen_addr, "[::]:5000".parse().unwrap());
        assert_eq!(config.edge.data_dir, Path::new("/var/lib/molt"));
        assert_eq!(config.edge.region.as_str(), "eu-west-1");
        assert_eq!(config.identity.certificate_chain, Path::new("/etc/molt/certs/edge.pem"));
        assert_eq!(config.identity.key, KeySource::File(Path::new("/secrets/edge.key").into()));
        assert_eq!(config.trust.revocation_lists.len(), 2);
        assert_eq!(config.trust.revocation_lists[1].issuer, Path::new("/etc/molt/b.pem"));
        assert_eq!(config.limits.bytes_per_minute.get(), 0x20_0000);
        assert_eq!(config.limits.bad_messages_per_connection_max, 0);
        assert_eq!(config.limits.keep_alive, Duration::from_millis(9999));
        assert_eq!(config.limits.replay_window_capacity.get(), 16);
        assert_eq!(config.buffer.retention, Duration::from_millis(1));
        assert_eq!(config.shutdown.drain_timeout, Duration::ZERO);
        assert_eq!(config.shutdown.reconnect_after_ms(), 3_600_000);
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.log.level.as_str(), "warn,molt_edge=debug");
        let _filter = config.log.level.to_env_filter();
    }

    #[test]
    fn syntax_error_has_its_line() {
        let problem = only_problem("[limits]\nmessages_per_minute = 5\nidle_timeout_ms = = 3\n");
        assert_eq!(problem.line, Some(3));
        assert_eq!(problem.key, None);
        assert!(matches!(problem.kind, ProblemKind::Syntax { .. }), "{problem:?}");
    }

    #[test]
    fn several_syntax_errors_are_all_reported() {
        let all = problems("a = \"open\nb = 3\nc = @\n");
        assert_eq!(all.len(), 2, "{all:#?}");
        assert_eq!(all.iter().map(|p| p.line).collect::<Vec<_>>(), [Some(1), Some(3)]);
    }

    #[test]
    fn unknown_key_suggests_the_closest_key() {
        let problem = only_problem(&with_minimal("[limits]\nmessages_per_minut = 5\n"));
        assert_eq!(problem.key.as_deref(), Some("limits.messages_per_minut"));
        assert_eq!(problem.line, Some(8));
        assert_eq!(problem.kind, ProblemKind::UnknownKey { suggestion: Some("messages_per_minute".to_owned()) });
        assert_eq!(
            problem.to_string(),
            "line 8: limits.messages_per_minut: unknown key (did you mean `messages_per_minute`?)"
        );
    }

    #[test]
    fn unknown_key_without_its_unit_suggests_the_unit() {
        let problem = only_problem(&with_minimal("[limits]\nidle_timeout = 5\n"));
        assert_eq!(problem.kind, ProblemKind::UnknownKey { suggestion: Some("idle_timeout_ms".to_owned()) });
    }

    #[test]
    fn key_in_the_wrong_section_suggests_its_section() {
        let problem = only_problem(&with_minimal("[limits]\nretention_ms = 5\n"));
        assert_eq!(problem.kind, ProblemKind::UnknownKey { suggestion: Some("buffer.retention_ms".to_owned()) });
    }

    #[test]
    fn unknown_section_and_unrelated_key() {
        let all = problems(&with_minimal("[limit]\nx = 1\n[log]\ncolour = true\n"));
        assert_eq!(all.len(), 2, "{all:#?}");
        assert_eq!(all[0].key.as_deref(), Some("limit"));
        assert_eq!(all[0].kind, ProblemKind::UnknownKey { suggestion: Some("limits".to_owned()) });
        assert_eq!(all[1].key.as_deref(), Some("log.colour"));
        assert_eq!(all[1].kind, ProblemKind::UnknownKey { suggestion: None });
    }

    #[test]
    fn control_plane_section_is_optional_and_gets_its_defaults() {
        assert_eq!(parse(MINIMAL, base()).unwrap().control_plane, None);
        let text = with_minimal("[control_plane]\ngrpc_addr = \"10.0.0.1:7443\"\ntrust_anchor = \"cp.pem\"\n");
        let link = parse(&text, base()).unwrap().control_plane.expect("a link");
        assert_eq!(link.grpc_addr, "10.0.0.1:7443".parse().unwrap());
        assert_eq!(link.trust_anchor, Path::new("/etc/molt/cp.pem"));
        assert_eq!(link.bundle_cache, Path::new("/etc/molt").join(DEFAULT_BUNDLE_CACHE));
        assert_eq!(link.server_name, DEFAULT_CONTROL_PLANE_SERVER_NAME);
        assert_eq!(link.advertise_addr, None);
        assert_eq!(link.presence_interval, DEFAULT_PRESENCE_INTERVAL);
        assert_eq!(
            (link.reconnect_backoff_min, link.reconnect_backoff_max),
            (Duration::from_secs(1), Duration::from_secs(30))
        );
        assert_eq!(link.renew_at_remaining_percent, 33);
        assert_eq!(link.renew_check_interval, DEFAULT_RENEW_CHECK_INTERVAL);
    }

    #[test]
    fn federation_section_gets_its_defaults_and_needs_the_control_plane() {
        assert_eq!(parse(MINIMAL, base()).unwrap().federation, None);
        let link = "[control_plane]\ngrpc_addr = \"10.0.0.1:7443\"\ntrust_anchor = \"cp.pem\"\n";
        let text = with_minimal(&format!("{link}[federation]\nlisten_addr = \"0.0.0.0:4434\"\n"));
        let federation = parse(&text, base()).unwrap().federation.expect("federation");
        assert_eq!(federation.listen_addr, "0.0.0.0:4434".parse().unwrap());
        assert_eq!(federation.advertise_addr, None);
        assert_eq!(federation.presence_fresh, DEFAULT_PRESENCE_FRESH);
        assert_eq!(federation.handoff_interval, DEFAULT_HANDOFF_INTERVAL);
        assert_eq!(federation.link_queue_depth, DEFAULT_LINK_QUEUE_DEPTH);

        let alone = with_minimal("[federation]\nlisten_addr = \"0.0.0.0:4434\"\n");
        let keys: Vec<String> = problems(&alone).into_iter().filter_map(|problem| problem.key).collect();
        assert_eq!(keys, ["federation"]);

        let bad = with_minimal(&format!(
            "{link}[federation]\nadvertise_addr = \"edge.example:1\"\npresence_fresh_ms = 99\n\
             handoff_interval_ms = 60001\nlink_queue_depth = 65537\nlisten = 1\n"
        ));
        let keys: Vec<String> = problems(&bad).into_iter().filter_map(|problem| problem.key).collect();
        for key in [
            "federation.listen_addr",
            "federation.advertise_addr",
            "federation.presence_fresh_ms",
            "federation.handoff_interval_ms",
            "federation.link_queue_depth",
            "federation.listen",
        ] {
            assert!(keys.iter().any(|found| found == key), "{key} not reported in {keys:?}");
        }
    }

    #[test]
    fn control_plane_problems_are_all_reported_with_their_keys() {
        let text = with_minimal(
            "[control_plane]\ngrpc_addr = \"cp.example:7443\"\npresence_interval_ms = 99\n\
             reconnect_backoff_min_ms = 5000\nreconnect_backoff_max_ms = 1000\nrenew_at_remaining_percent = 91\n\
             renew_check_interval_ms = 3600001\nbundle_cahce = \"x\"\n",
        );
        let all = problems(&text);
        let keys: Vec<&str> = all.iter().filter_map(|problem| problem.key.as_deref()).collect();
        assert_eq!(
            keys,
            [
                "control_plane.trust_anchor",
                "control_plane.grpc_addr",
                "control_plane.presence_interval_ms",
                "control_plane.reconnect_backoff_min_ms",
                "control_plane.renew_at_remaining_percent",
                "control_plane.renew_check_interval_ms",
                "control_plane.bundle_cahce",
            ],
            "{all:#?}"
        );
        assert_eq!(all[0].kind, ProblemKind::MissingKey);
        assert_eq!(all[6].kind, ProblemKind::UnknownKey { suggestion: Some("bundle_cache".into()) });
        // The bounds hold at their edges.
        let edges = with_minimal(&format!(
            "[control_plane]\ngrpc_addr = \"10.0.0.1:1\"\ntrust_anchor = \"cp.pem\"\npresence_interval_ms = {}\n\
             renew_at_remaining_percent = {}\nreconnect_backoff_min_ms = {}\nreconnect_backoff_max_ms = {}\n",
            millis_of(PRESENCE_INTERVAL_MIN),
            RENEW_AT_REMAINING_PERCENT_MAX,
            millis_of(RECONNECT_BACKOFF_FLOOR),
            millis_of(RECONNECT_BACKOFF_CEILING),
        ));
        let link = parse(&edges, base()).unwrap().control_plane.unwrap();
        assert_eq!(link.renew_at_remaining_percent, RENEW_AT_REMAINING_PERCENT_MAX);
    }

    #[test]
    fn unknown_key_in_a_revocation_list() {
        let text = with_minimal(
            "[[trust.revocation_lists]]\ncrl = \"a.crl\"\nissuer = \"a.pem\"\n\
             [[trust.revocation_lists]]\ncrll = \"b.crl\"\nissuer = \"b.pem\"\n",
        );
        let all = problems(&text);
        assert_eq!(all.len(), 2, "{all:#?}");
        assert_eq!(all[0].key.as_deref(), Some("trust.revocation_lists[1].crl"));
        assert_eq!(all[0].kind, ProblemKind::MissingKey);
        assert_eq!(all[0].line, Some(10), "missing keys point at their table");
        assert_eq!(all[1].key.as_deref(), Some("trust.revocation_lists[1].crll"));
        assert_eq!(all[1].kind, ProblemKind::UnknownKey { suggestion: Some("crl".to_owned()) });
        assert_eq!(all[1].line, Some(11));
    }

    #[test]
    fn quoted_unknown_keys_keep_their_quotes() {
        let problem = only_problem(&with_minimal("[log]\n\"a.b\" = 1\n"));
        assert_eq!(problem.key.as_deref(), Some("log.\"a.b\""));
    }

    #[test]
    fn wrong_types_name_expected_and_found() {
        let all = problems(&with_minimal(
            "[limits]\nmessages_per_minute = \"5\"\nclock_skew_ms = 1.5\n[edge]\nregion = 3\n[buffer]\n",
        ));
        let kinds: Vec<_> = all.iter().map(|p| (p.key.as_deref().unwrap(), p.kind.clone())).collect();
        assert_eq!(
            kinds,
            [
                ("limits.messages_per_minute", ProblemKind::WrongType { expected: "integer", found: "string" }),
                ("limits.clock_skew_ms", ProblemKind::WrongType { expected: "integer", found: "float" }),
                ("edge.region", ProblemKind::WrongType { expected: "string", found: "integer" }),
            ]
        );
    }

    #[test]
    fn section_of_the_wrong_type() {
        let problem = only_problem(&format!("limits = 5\n{MINIMAL}"));
        assert_eq!(problem.key.as_deref(), Some("limits"));
        assert_eq!(problem.kind, ProblemKind::WrongType { expected: "table", found: "integer" });
        let problem = problem_of_revocation_lists("revocation_lists = \"x\"");
        assert_eq!(problem.kind, ProblemKind::WrongType { expected: "array of tables", found: "string" });
        let problem = problem_of_revocation_lists("revocation_lists = [{ crl = \"a\", issuer = \"b\" }, 7]");
        assert_eq!(problem.key.as_deref(), Some("trust.revocation_lists[1]"));
        assert_eq!(problem.kind, ProblemKind::WrongType { expected: "table", found: "integer" });
    }

    fn problem_of_revocation_lists(line: &str) -> ConfigProblem {
        only_problem(&format!(
            "[identity]\ncertificate_chain = \"a\"\nprivate_key = \"b\"\n[trust]\nanchors = \"c\"\n{line}\n"
        ))
    }

    #[test]
    fn missing_required_keys_and_sections() {
        let all = problems("[identity]\nprivate_key = \"edge.key\"\n");
        let keys: Vec<_> = all.iter().map(|p| (p.key.as_deref().unwrap(), p.line)).collect();
        assert_eq!(keys, [("identity.certificate_chain", Some(1)), ("trust.anchors", None)]);
        assert!(all.iter().all(|p| p.kind == ProblemKind::MissingKey));
        assert_eq!(problems("").len(), 3);
    }

    #[test]
    fn invalid_addresses_regions_and_paths() {
        let all = problems(&with_minimal(
            "[edge]\nlisten_addr = \"localhost:4433\"\nadmin_addr = \"1.2.3.4\"\nregion = \"EU\"\ndata_dir = \"\"\n",
        ));
        let keys: Vec<_> = all.iter().map(|p| p.key.as_deref().unwrap()).collect();
        assert_eq!(keys, ["edge.listen_addr", "edge.admin_addr", "edge.region", "edge.data_dir"]);
        assert!(invalid_reason(&all[0]).contains("invalid socket address \"localhost:4433\""));
        assert!(invalid_reason(&all[2]).contains("lower-case"));
        assert_eq!(invalid_reason(&all[3]), "path must not be empty");
    }

    #[test]
    fn zero_where_not_allowed() {
        for key in [
            "messages_per_minute",
            "messages_per_hour",
            "bytes_per_minute",
            "connections_per_agent",
            "connections_per_ip",
            "idle_timeout_ms",
            "keep_alive_ms",
            "outbound_queue_depth_max",
            "replay_window_capacity",
            "clock_skew_ms",
        ] {
            let problem = only_problem(&with_minimal(&format!("[limits]\n{key} = 0\n")));
            assert_eq!(problem.key, Some(format!("limits.{key}")));
            assert!(invalid_reason(&problem).starts_with("0 is too small"), "{problem}");
        }
        for key in ["queue_depth_per_agent_max", "messages_max", "bytes_max", "retention_ms"] {
            let problem = only_problem(&with_minimal(&format!("[buffer]\n{key} = 0\n")));
            assert_eq!(problem.key, Some(format!("buffer.{key}")));
        }
        let zeros = with_minimal(
            "[shutdown]\ndrain_timeout_ms = 0\nreconnect_after_ms = 0\n[limits]\nbad_messages_per_connection_max = 0\n",
        );
        assert!(parse(&zeros, base()).is_ok(), "zero is meaningful for these keys");
    }

    #[test]
    fn negative_and_too_large_values() {
        let all = problems(&with_minimal(
            "[limits]\nconnections_per_ip = -1\nmessages_per_hour = 4294967296\n[buffer]\nretention_ms = 604800001\n",
        ));
        assert_eq!(invalid_reason(&all[0]), "-1 is negative: must be at least 1");
        assert_eq!(invalid_reason(&all[1]), "4294967296 is too large: must be at most 4294967295");
        assert_eq!(all[2].key.as_deref(), Some("buffer.retention_ms"));
        assert_eq!(invalid_reason(&all[2]), "604800001 is too large: must be at most 604800000");
        let problem = only_problem(&with_minimal("[limits]\nmessages_per_hour = 99999999999999999999\n"));
        assert!(invalid_reason(&problem).contains("does not fit in 64 bits"));
    }

    #[test]
    fn relations_between_limits() {
        let problem = only_problem(&with_minimal("[limits]\nmessages_per_minute = 60000\n"));
        assert_eq!(problem.key.as_deref(), Some("limits.messages_per_minute"));
        assert_eq!(
            invalid_reason(&problem),
            "messages_per_minute (60000) must not exceed limits.messages_per_hour (50000)"
        );
        // Only the hour is set: the line points at it.
        let problem = only_problem(&with_minimal("[limits]\nmessages_per_hour = 10\n"));
        assert_eq!((problem.key.as_deref(), problem.line), (Some("limits.messages_per_minute"), Some(8)));

        let problem = only_problem(&with_minimal("[limits]\nidle_timeout_ms = 30000\n"));
        assert_eq!(problem.key.as_deref(), Some("limits.keep_alive_ms"));
        let problem = only_problem(&with_minimal("[buffer]\nmessages_max = 10\n"));
        assert_eq!(problem.key.as_deref(), Some("buffer.queue_depth_per_agent_max"));
        let problem = only_problem(&with_minimal("[limits]\nbytes_per_minute = 1000\n"));
        assert!(invalid_reason(&problem).contains("must be at least 1048576"));
        let problem = only_problem(&with_minimal("[buffer]\nbytes_max = 1000\n"));
        assert_eq!(problem.key.as_deref(), Some("buffer.bytes_max"));
    }

    #[test]
    fn invalid_log_settings() {
        let all = problems(&with_minimal("[log]\nformat = \"xml\"\nlevel = \"info,[[\"\n"));
        assert_eq!(invalid_reason(&all[0]), "log format must be \"text\" or \"json\", found \"xml\"");
        assert_eq!(all[1].key.as_deref(), Some("log.level"));
        assert!(invalid_reason(&all[1]).starts_with("invalid log filter directive"));
        let problem = only_problem(&with_minimal("[log]\nlevel = \" \"\n"));
        assert_eq!(invalid_reason(&problem), "log filter must not be empty");
    }

    #[test]
    fn every_problem_is_reported_at_once_in_file_order() {
        let text = r#"[edge]
listen_addr = "nowhere"
colour = "blue"
[identity]
private_key = 7
[limits]
messages_per_minute = 0
keep_alive_ms = 90000
[buffer]
retention_ms = 999999999999
[log]
format = "yaml"
"#;
        let error = parse(text, base()).unwrap_err();
        let found: Vec<_> = error.problems().iter().map(|p| (p.line, p.key.clone().unwrap_or_default())).collect();
        let expected = [
            (Some(2), "edge.listen_addr"),
            (Some(3), "edge.colour"),
            (Some(4), "identity.certificate_chain"),
            (Some(5), "identity.private_key"),
            (Some(7), "limits.messages_per_minute"),
            (Some(8), "limits.keep_alive_ms"),
            (Some(10), "buffer.retention_ms"),
            (Some(12), "log.format"),
            (None, "trust.anchors"),
        ];
        let expected: Vec<_> = expected.iter().map(|(line, key)| (*line, key.to_string())).collect();
        assert_eq!(found, expected);

        let display = error.to_string();
        let lines: Vec<_> = display.lines().collect();
        assert_eq!(lines.len(), 1 + expected.len(), "{display}");
        assert_eq!(lines[0], "invalid edge config (9 problems):");
        assert_eq!(
            lines[1],
            "  line 2: edge.listen_addr: invalid socket address \"nowhere\": expected an IP address and port, e.g. \"0.0.0.0:4433\""
        );
        assert_eq!(lines[9], "  trust.anchors: missing required key");
    }

    #[test]
    fn load_resolves_relative_paths_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, with_minimal("[edge]\ndata_dir = \"../state\"\n")).unwrap();
        let config = load(&path).expect("config loads");
        assert_eq!(config.edge.data_dir, dir.path().join("../state"));
        assert_eq!(config.identity.key, KeySource::File(dir.path().join("edge.key")));
        assert!(config.trust.anchors.is_absolute());
    }

    #[test]
    fn absolute_paths_are_kept() {
        let config = parse(&with_minimal("[edge]\ndata_dir = \"/srv/molt\"\n"), Path::new("rel")).unwrap();
        assert_eq!(config.edge.data_dir, Path::new("/srv/molt"));
        assert_eq!(config.trust.anchors, Path::new("rel/root.pem"));
    }

    #[test]
    fn load_names_the_file_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        let error = load(&path).unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
        assert!(error.to_string().contains("edge.toml"));

        std::fs::write(&path, "[log]\nformat = 1\n").unwrap();
        let error = load(&path).unwrap_err();
        let display = error.to_string();
        assert!(
            display.contains(&format!("{}:2: log.format: expected string, found integer", path.display())),
            "{display}"
        );
    }

    #[test]
    fn region_parsing() {
        assert_eq!("us-east-2".parse::<Region>().unwrap().to_string(), "us-east-2");
        assert_eq!("".parse::<Region>(), Err(RegionParseError::Empty));
        assert_eq!("a".repeat(64).parse::<Region>(), Err(RegionParseError::TooLong(64)));
        assert_eq!("eu_1".parse::<Region>(), Err(RegionParseError::InvalidCharacter('_')));
    }

    #[test]
    fn edit_distance_counts_characters() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("é", "e"), 1);
    }

    mod prop {
        use proptest::prelude::*;

        use super::*;

        /// The reference with one character inserted and one range removed.
        fn mutated_reference() -> impl Strategy<Value = String> {
            let length = reference().len();
            (0..=length, any::<char>(), 0..=length, 0..8usize).prop_map(|(at, c, cut, cut_len)| {
                let mut text = reference().to_owned();
                let at = floor_char_boundary(&text, at);
                text.insert(at, c);
                let start = floor_char_boundary(&text, cut);
                let end = floor_char_boundary(&text, (start + cut_len).min(text.len()));
                text.replace_range(start..end, "");
                text
            })
        }

        fn floor_char_boundary(text: &str, mut index: usize) -> usize {
            index = index.min(text.len());
            while !text.is_char_boundary(index) {
                index -= 1;
            }
            index
        }

        fn toml_like() -> impl Strategy<Value = String> {
            let line = prop_oneof![
                "\\[{1,2}[a-z_.\\[\\]0-9]{0,30}\\]{1,2}",
                "[a-z_\"]{1,30} = (\"[^\"\n]{0,12}\"|-?[0-9_]{1,22}|0x[0-9a-f]{1,17}|[0-9.e+-]{1,8}|true|\\[\\]|\\{ ?\\}|\\[\\{ crl = 1 \\}\\])",
            ];
            proptest::collection::vec(line, 0..16).prop_map(|lines| lines.join("\n"))
        }

        proptest! {
            #[test]
            fn arbitrary_text_never_panics(text in any::<String>()) {
                let _ = parse(&text, Path::new("base"));
            }

            #[test]
            fn toml_like_text_never_panics(text in toml_like()) {
                let _ = parse(&text, Path::new("base"));
            }

            #[test]
            fn mutated_reference_never_panics_and_reports_lines(text in mutated_reference()) {
                if let Err(error) = parse(&text, Path::new("base")) {
                    let lines = text.lines().count().max(1);
                    for problem in error.problems() {
                        prop_assert!(problem.line.is_none_or(|line| line >= 1 && line <= lines + 1));
                    }
                    prop_assert!(!error.to_string().is_empty());
                }
            }
        }
    }
}

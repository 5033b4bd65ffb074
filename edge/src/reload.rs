//! Reloading the config while the edge runs (SIGHUP, `systemctl reload molt-edge`).
//!
//! The model: the [`Reloader`] holds the running config and handles on what can change
//! in place. A reload reads and validates the whole file first; a file with any problem
//! is refused, every problem is logged with its key and line, and nothing changes. A
//! valid file is compared with the running config key by key:
//!
//! * applied at once: `log.level`; the per-agent rate limits `limits.messages_per_minute`,
//!   `limits.messages_per_hour` and `limits.bytes_per_minute` (every agent starts again
//!   with a full allowance under the new limits); the connection limits
//!   `limits.connections_per_agent` and `limits.connections_per_ip` (connections already
//!   open are kept); the buffer quotas `buffer.queue_depth_per_agent_max`,
//!   `buffer.messages_max` and `buffer.bytes_max` (messages already buffered stay, even
//!   above a lowered quota). Established connections are never dropped by a reload.
//! * left as they are and logged as needing a restart: everything else (listen and admin
//!   addresses, data directory, region, identity, trust, control plane link, edge links,
//!   `buffer.retention_ms`, shutdown timing, log format and the other limits). The running config keeps
//!   its old values for them, so the next reload reports them again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use crate::config::{self, BufferConfig, ConfigError, EdgeConfig, LimitsConfig, LogFilter};
use crate::ratelimit::{AgentSlots, IpSlots, MessageLimits};
use crate::relay::Relay;
use crate::store::StoreLimits;

/// Changes the log filter of the running subscriber; an error names why it could not.
pub type LogLevelSetter = dyn Fn(&LogFilter) -> Result<(), String> + Send + Sync;

/// What can change while the edge runs, and the config it runs with.
#[derive(Debug)]
pub struct Reloader {
    /// Weak: the relay owns the offline store, whose writer thread stops only when every
    /// handle is gone, and a reload must never keep a stopping edge alive.
    relay: Weak<Relay>,
    agent_slots: Arc<AgentSlots>,
    ip_slots: Arc<IpSlots>,
    running: Mutex<EdgeConfig>,
}

/// What a reload did, by dotted key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Keys whose new values are in force.
    pub applied: Vec<&'static str>,
    /// Keys that changed in the file but need a restart; their old values stay in force.
    pub needs_restart: Vec<&'static str>,
}

impl Reloader {
    pub fn new(
        relay: &Arc<Relay>,
        agent_slots: Arc<AgentSlots>,
        ip_slots: Arc<IpSlots>,
        running: EdgeConfig,
    ) -> Reloader {
        Reloader { relay: Arc::downgrade(relay), agent_slots, ip_slots, running: Mutex::new(running) }
    }

    /// The config in force.
    pub fn running(&self) -> EdgeConfig {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Loads `path` and applies it; an invalid file changes nothing.
    pub fn reload_file(&self, path: &Path, set_log_level: &LogLevelSetter) -> Result<ReloadReport, ConfigError> {
        let new = config::load(path)?;
        Ok(self.apply(&new, set_log_level))
    }

    /// Applies what can change in place and reports the rest.
    pub fn apply(&self, new: &EdgeConfig, set_log_level: &LogLevelSetter) -> ReloadReport {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = ReloadReport::default();
        let old_limits = message_limits(&running.limits);
        let new_limits = message_limits(&new.limits);
        let relay = self.relay.upgrade();
        if let (true, Some(relay)) = (old_limits != new_limits, &relay) {
            relay.limiter().set_limits(new_limits);
            let limits = &mut running.limits;
            for (key, changed) in [
                ("limits.messages_per_minute", limits.messages_per_minute != new.limits.messages_per_minute),
                ("limits.messages_per_hour", limits.messages_per_hour != new.limits.messages_per_hour),
                ("limits.bytes_per_minute", limits.bytes_per_minute != new.limits.bytes_per_minute),
            ] {
                if changed {
                    report.applied.push(key);
                }
            }
            limits.messages_per_minute = new.limits.messages_per_minute;
            limits.messages_per_hour = new.limits.messages_per_hour;
            limits.bytes_per_minute = new.limits.bytes_per_minute;
        }
        if let (true, Some(relay)) = (buffer_quotas(&running.buffer) != buffer_quotas(&new.buffer), &relay) {
            let quotas = buffer_quotas(&new.buffer);
            relay.store().set_limits(quotas);
            metrics::gauge!(crate::metrics::BUFFER_CAPACITY_MESSAGES).set(quotas.messages_max as f64);
            metrics::gauge!(crate::metrics::BUFFER_CAPACITY_BYTES).set(quotas.bytes_max as f64);
            let buffer = &mut running.buffer;
            for (key, changed) in [
                (
                    "buffer.queue_depth_per_agent_max",
                    buffer.queue_depth_per_agent_max != new.buffer.queue_depth_per_agent_max,
                ),
                ("buffer.messages_max", buffer.messages_max != new.buffer.messages_max),
                ("buffer.bytes_max", buffer.bytes_max != new.buffer.bytes_max),
            ] {
                if changed {
                    report.applied.push(key);
                }
            }
            buffer.queue_depth_per_agent_max = new.buffer.queue_depth_per_agent_max;
            buffer.messages_max = new.buffer.messages_max;
            buffer.bytes_max = new.buffer.bytes_max;
        }
        if running.limits.connections_per_agent != new.limits.connections_per_agent {
            self.agent_slots.set_max(new.limits.connections_per_agent.get());
            running.limits.connections_per_agent = new.limits.connections_per_agent;
            report.applied.push("limits.connections_per_agent");
        }
        if running.limits.connections_per_ip != new.limits.connections_per_ip {
            self.ip_slots.set_max(new.limits.connections_per_ip.get());
            running.limits.connections_per_ip = new.limits.connections_per_ip;
            report.applied.push("limits.connections_per_ip");
        }
        if running.log.level != new.log.level {
            match set_log_level(&new.log.level) {
                Ok(()) => {
                    running.log.level = new.log.level.clone();
                    report.applied.push("log.level");
                }
                Err(error) => tracing::warn!(%error, "could not change the log level"),
            }
        }
        report.needs_restart = restart_only_changes(&running, new);
        report
    }
}

/// Keys that differ between the running and the new config and cannot change in place.
/// Called after the live keys were applied, so those compare equal.
fn restart_only_changes(running: &EdgeConfig, new: &EdgeConfig) -> Vec<&'static str> {
    let limits_other = |limits: &LimitsConfig| LimitsConfig {
        messages_per_minute: running.limits.messages_per_minute,
        messages_per_hour: running.limits.messages_per_hour,
        bytes_per_minute: running.limits.bytes_per_minute,
        connections_per_agent: running.limits.connections_per_agent,
        connections_per_ip: running.limits.connections_per_ip,
        ..limits.clone()
    };
    [
        ("edge.listen_addr", running.edge.listen_addr != new.edge.listen_addr),
        ("edge.admin_addr", running.edge.admin_addr != new.edge.admin_addr),
        ("edge.data_dir", running.edge.data_dir != new.edge.data_dir),
        ("edge.region", running.edge.region != new.edge.region),
        ("identity", running.identity != new.identity),
        ("trust", running.trust != new.trust),
        ("limits", limits_other(&running.limits) != limits_other(&new.limits)),
        ("buffer.retention_ms", running.buffer.retention != new.buffer.retention),
        ("shutdown", running.shutdown != new.shutdown),
        ("log.format", running.log.format != new.log.format),
        ("control_plane", running.control_plane != new.control_plane),
        ("federation", running.federation != new.federation),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

fn buffer_quotas(buffer: &BufferConfig) -> StoreLimits {
    StoreLimits {
        queue_depth_per_agent_max: buffer.queue_depth_per_agent_max.get(),
        messages_max: buffer.messages_max.get(),
        bytes_max: buffer.bytes_max.get(),
    }
}

fn message_limits(limits: &LimitsConfig) -> MessageLimits {
    MessageLimits {
        messages_per_minute: limits.messages_per_minute,
        messages_per_hour: limits.messages_per_hour,
        bytes_per_minute: std::num::NonZeroU32::new(u32::try_from(limits.bytes_per_minute.get()).unwrap_or(u32::MAX))
            .unwrap_or(std::num::NonZeroU32::MAX),
    }
}

/// Reloads `path` on every signal `hangups` delivers, logging what happened, until the
/// stream ends. Register the signal before the edge starts, so that a SIGHUP never finds
/// the default action (terminate) in place.
pub async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    path: PathBuf,
    reloader: Arc<Reloader>,
    set_log_level: Arc<LogLevelSetter>,
) {
    while hangups.recv().await.is_some() {
        let path = path.clone();
        let reloader = Arc::clone(&reloader);
        let set_log_level = Arc::clone(&set_log_level);
        let reloaded = tokio::task::spawn_blocking(move || reloader.reload_file(&path, set_log_level.as_ref())).await;
        match reloaded {
            Ok(Ok(report)) => log_report(&report),
            Ok(Err(error)) => log_refusal(&error),
            Err(error) => tracing::error!(%error, "config reload failed"),
        }
    }
}

fn log_report(report: &ReloadReport) {
    for key in &report.needs_restart {
        tracing::warn!(key, "config reload: this change needs a restart; the running value is kept");
    }
    tracing::info!(
        applied = ?report.applied,
        needs_restart = ?report.needs_restart,
        "config reloaded"
    );
}

fn log_refusal(error: &ConfigError) {
    for problem in error.problems() {
        tracing::error!(key = problem.key.as_deref().unwrap_or(""), line = problem.line, problem = %problem.kind, "config reload: problem");
    }
    tracing::error!(%error, "config reload refused; the running config is kept");
}

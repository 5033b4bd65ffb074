//! What the control-plane commands (`org`, `cert`, `agent`, `admin-key`) share: the API
//! flags, the client built from them, agent keys, and output (human text or `--json`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use molt_protocol::UnixMillis;
use molt_sdk::api::{AgentCredentials, ApiClient, DEFAULT_API_URL};
use molt_sdk::dev::{AgentFiles, AgentKeys};
use serde::Serialize;

/// Where the control plane is, and how to talk to it. Global: accepted after any
/// subcommand.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Base URL of the control plane's HTTP API.
    #[arg(long = "api", value_name = "URL", env = "MOLT_API", default_value = DEFAULT_API_URL, global = true)]
    pub api_url: String,
    /// Admin key (`molt_admin_…`) for admin commands: the bootstrap credential the
    /// control plane printed on its first start, or one made by `molt admin-key create`.
    #[arg(long, value_name = "TOKEN", env = "MOLT_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print the server's JSON answer on one line instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ApiArgs {
    /// A client with the admin token, if one was given (admin calls fail without it).
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        let client = ApiClient::new(&self.api_url).context("while reading --api")?;
        Ok(match &self.token {
            Some(token) => client.with_admin_token(token.trim()),
            None => client,
        })
    }

    /// Prints `value` as one JSON line with `--json`, else the text `human` makes.
    pub fn print<T: Serialize>(&self, value: &T, human: impl FnOnce(&T) -> String) {
        if self.json {
            // Invariant: answers were parsed from JSON and serialise back.
            println!("{}", serde_json::to_string(value).expect("API answers serialise to JSON"));
        } else {
            let text = human(value);
            println!("{}", text.trim_end());
        }
    }
}

/// The agent whose key signs a request.
#[derive(Debug, Args)]
pub struct AgentDirArgs {
    /// Agent directory made by `molt keygen` (agent.key, encryption.key, agent.id).
    #[arg(long, value_name = "DIR")]
    pub agent_dir: PathBuf,
}

impl AgentDirArgs {
    pub fn keys(&self) -> anyhow::Result<AgentKeys> {
        load_keys(&self.agent_dir)
    }
}

pub fn load_keys(dir: &Path) -> anyhow::Result<AgentKeys> {
    AgentFiles::load_keys(dir).with_context(|| format!("while reading the agent keys in {}", dir.display()))
}

pub fn credentials(keys: &AgentKeys) -> AgentCredentials {
    AgentCredentials { agent_id: keys.agent_id, signing_key: keys.signing_key.clone() }
}

pub fn now() -> UnixMillis {
    UnixMillis::now_from_system()
}

/// RFC 3339 in UTC, or the raw milliseconds if out of range.
pub fn format_time(at_ms: u64) -> String {
    i64::try_from(at_ms / 1000)
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .and_then(|time| time.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{at_ms} ms after the epoch"))
}

//! `molt agent rotate-key`, `keys`, `guardians` and `recovery`: an agent's key after its
//! inception key. The agent directory keeps its id (`agent.id`) for good; a new key is
//! staged as `agent.key.next` before the control plane is asked, and swapped in (the old
//! one kept as `agent.key.previous`) only once it is certified, so an interrupted command
//! is resumed by running it again.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use molt_protocol::AgentId;
use molt_protocol::keys::{KeyBinding, PublicKey};
use molt_sdk::api::{AgentCredentials, ApiClient, IssuedCertificate, Recovery};
use molt_sdk::dev::AgentFiles;
use rand::rngs::OsRng;

use crate::control::{AgentDirArgs, ApiArgs, credentials, format_time, now};

/// `molt agent guardians …`.
#[derive(Debug, Subcommand)]
pub enum GuardiansCommand {
    /// Name the agent's guardians, replacing any (signed by its current key).
    Set {
        #[command(flatten)]
        agent: AgentDirArgs,
        /// How many guardians must approve a recovery.
        #[arg(long, value_name = "M")]
        threshold: u32,
        /// The guardians' agent ids (1 to 16, other registered agents).
        #[arg(value_name = "GUARDIAN_ID", required = true)]
        guardians: Vec<AgentId>,
    },
    /// Show an agent's guardians.
    Show {
        /// The agent id (`agent-…`).
        agent_id: AgentId,
    },
    /// Remove the agent's guardians (signed by its current key).
    Clear {
        #[command(flatten)]
        agent: AgentDirArgs,
    },
}

/// `molt agent recovery …`.
#[derive(Debug, Subcommand)]
pub enum RecoveryCommand {
    /// The owner, having lost the key: prepare DIR (agent.id, a new staged key) and print
    /// the new public key to give to the guardians.
    Prepare {
        /// Directory to recover into; it may be new or hold the lost agent's files.
        #[arg(long, value_name = "DIR")]
        agent_dir: std::path::PathBuf,
        /// The agent to recover.
        #[arg(long = "agent", value_name = "AGENT_ID")]
        agent_id: AgentId,
    },
    /// A guardian: open a recovery of AGENT_ID to the owner's new key (counts as approval).
    Open {
        /// The guardian's own agent directory.
        #[command(flatten)]
        guardian: AgentDirArgs,
        #[arg(long = "agent", value_name = "AGENT_ID")]
        agent_id: AgentId,
        /// The owner's new public key (64 hex digits), from `molt agent recovery prepare`.
        #[arg(long, value_name = "HEX", value_parser = parse_public_key)]
        new_key: PublicKey,
    },
    /// Another guardian: approve the recovery of AGENT_ID to exactly this key.
    Approve {
        #[command(flatten)]
        guardian: AgentDirArgs,
        #[arg(long = "agent", value_name = "AGENT_ID")]
        agent_id: AgentId,
        #[arg(long, value_name = "RECOVERY_ID")]
        recovery: String,
        #[arg(long, value_name = "HEX", value_parser = parse_public_key)]
        new_key: PublicKey,
    },
    /// Show a recovery: approvals, state, when its time lock ends.
    Show {
        #[arg(long = "agent", value_name = "AGENT_ID")]
        agent_id: AgentId,
        #[arg(long, value_name = "RECOVERY_ID")]
        recovery: String,
    },
    /// The holder of the agent's current key: cancel a recovery nobody should have opened.
    Cancel {
        #[command(flatten)]
        agent: AgentDirArgs,
        #[arg(long, value_name = "RECOVERY_ID")]
        recovery: String,
    },
    /// The owner, after the time lock: complete the recovery with the staged key and
    /// install the new certificate.
    Complete {
        #[command(flatten)]
        agent: AgentDirArgs,
        #[arg(long, value_name = "RECOVERY_ID")]
        recovery: String,
    },
}

fn parse_public_key(text: &str) -> Result<PublicKey, String> {
    hex::decode(text.trim())
        .ok()
        .and_then(|bytes| PublicKey::from_slice(&bytes).ok())
        .ok_or_else(|| "expected an Ed25519 public key as 64 hexadecimal digits".to_owned())
}

/// `molt agent rotate-key`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub agent: AgentDirArgs,
    /// How long the old key keeps signing and its certificate stays valid, in seconds
    /// (the server's default is 86400; at most 604800; 0 revokes it at once).
    #[arg(long, value_name = "SECONDS")]
    pub overlap: Option<u64>,
}

pub async fn rotate(api: &ApiArgs, client: &ApiClient, args: RotateArgs) -> anyhow::Result<()> {
    let dir = &args.agent.agent_dir;
    let keys = args.agent.keys()?;
    let (next, generated) = AgentFiles::stage_next_key(dir, &mut OsRng).context("while staging the new key")?;
    if !generated {
        // An earlier run staged this key. If the server already made it current, either the
        // local swap was interrupted (finish it) or the certificate never reached the disk.
        let history = client.key_history(keys.agent_id).await?;
        if history.current_public_key == hex::encode(next.public_key().as_bytes()) {
            if AgentFiles::finish_key_change(dir, now())? {
                println!("finished the interrupted rotation of {}", keys.agent_id);
                return Ok(());
            }
            bail!(
                "the control plane already certified the staged key in {}, but its certificate was not saved; \
                 ask an admin to issue a certificate for it",
                dir.display()
            );
        }
        eprintln!("resuming with the key staged by an earlier run");
    }
    let binding = KeyBinding::sign(keys.agent_id, keys.encryption_secret.public_key(), now(), &next)
        .context("while signing the key binding")?;
    let overlap = args.overlap.map(Duration::from_secs);
    let rotation = match client.rotate_key(&credentials(&keys), &next, overlap, Some(&binding), now()).await {
        Ok(rotation) => rotation,
        Err(error) => {
            if error.problem().is_some() {
                // Refused: nothing changed at the server, so the staged key is dropped.
                AgentFiles::discard_next_key(dir)?;
            }
            return Err(error.into());
        }
    };
    install(dir, &rotation.certificate)?;
    api.print(&rotation, |rotation| {
        format!(
            "rotated the key of {} (epoch {}); certificate {} until {}; the old key works until {}",
            rotation.agent_id,
            rotation.epoch,
            rotation.certificate.serial,
            format_time(rotation.certificate.not_after_ms),
            format_time(rotation.previous_key_until_ms)
        )
    });
    Ok(())
}

fn install(dir: &Path, certificate: &IssuedCertificate) -> anyhow::Result<()> {
    AgentFiles::commit_next_key(dir, &certificate.chain_pem, now())
        .with_context(|| format!("while installing the new key and certificate in {}", dir.display()))?;
    Ok(())
}

pub async fn keys(api: &ApiArgs, client: &ApiClient, agent_id: AgentId) -> anyhow::Result<()> {
    let history = client.key_history(agent_id).await?;
    api.print(&history, |history| {
        let mut text = format!("{}: key {} (epoch {})\n", history.agent_id, history.current_public_key, history.epoch);
        if let (Some(previous), Some(until)) = (&history.previous_public_key, history.previous_key_until_ms) {
            text.push_str(&format!("previous key {previous} works until {}\n", format_time(until)));
        }
        for event in &history.events {
            text.push_str(&format!(
                "{}  {} #{}: {} -> {} (certificate {})\n",
                format_time(event.at_ms),
                event.kind,
                event.epoch,
                event.old_public_key,
                event.new_public_key,
                event.serial
            ));
        }
        text
    });
    Ok(())
}

pub async fn guardians(api: &ApiArgs, client: &ApiClient, command: GuardiansCommand) -> anyhow::Result<()> {
    let show = |set: &molt_sdk::api::Guardians| {
        format!(
            "{}: {} of {} guardians: {}",
            set.agent_id,
            set.threshold,
            set.guardians.len(),
            set.guardians.join(", ")
        )
    };
    match command {
        GuardiansCommand::Set { agent, threshold, guardians } => {
            let keys = agent.keys()?;
            let set = client.set_guardians(&credentials(&keys), threshold, &guardians).await?;
            api.print(&set, show);
        }
        GuardiansCommand::Show { agent_id } => {
            let set = client.guardians(agent_id).await?;
            api.print(&set, show);
        }
        GuardiansCommand::Clear { agent } => {
            let keys = agent.keys()?;
            client.clear_guardians(&credentials(&keys)).await?;
            println!("removed the guardians of {}", keys.agent_id);
        }
    }
    Ok(())
}

pub async fn recovery(api: &ApiArgs, client: &ApiClient, command: RecoveryCommand) -> anyhow::Result<()> {
    match command {
        RecoveryCommand::Prepare { agent_dir, agent_id } => {
            let key = AgentFiles::prepare_recovery(&agent_dir, agent_id, &mut OsRng)
                .with_context(|| format!("while preparing {}", agent_dir.display()))?;
            let public = hex::encode(key.public_key().as_bytes());
            if api.json {
                println!("{}", serde_json::json!({"agent_id": agent_id.to_string(), "new_public_key": public}));
            } else {
                println!(
                    "new key staged in {}. Give your guardians this public key:\n\n    {public}\n\n\
                     one of them opens the recovery with `molt agent recovery open --agent {agent_id} --new-key {public}`",
                    agent_dir.display()
                );
            }
        }
        RecoveryCommand::Open { guardian, agent_id, new_key } => {
            let keys = guardian.keys()?;
            let opened = client.open_recovery(&credentials(&keys), agent_id, &new_key).await?;
            api.print(&opened, describe);
        }
        RecoveryCommand::Approve { guardian, agent_id, recovery, new_key } => {
            let keys = guardian.keys()?;
            let approved = client.approve_recovery(&credentials(&keys), agent_id, &recovery, &new_key).await?;
            api.print(&approved, describe);
        }
        RecoveryCommand::Show { agent_id, recovery } => {
            let found = client.recovery(agent_id, &recovery).await?;
            api.print(&found, describe);
        }
        RecoveryCommand::Cancel { agent, recovery } => {
            let keys = agent.keys()?;
            let cancelled = client.cancel_recovery(&credentials(&keys), &recovery).await?;
            api.print(&cancelled, describe);
        }
        RecoveryCommand::Complete { agent, recovery } => {
            let dir = &agent.agent_dir;
            let agent_id = read_agent_id(dir)?;
            let (next, _) = AgentFiles::stage_next_key(dir, &mut OsRng).context("while reading the staged key")?;
            let holder = AgentCredentials { agent_id, signing_key: next };
            let completed = client.complete_recovery(&holder, &recovery).await?;
            install(dir, &completed.certificate)?;
            api.print(&completed, |completed| {
                format!(
                    "recovered {}: the new key is current, certificate {} installed in {}; every older \
                     certificate is revoked. Publish a new key binding with `molt agent update`.",
                    completed.recovery.agent_id,
                    completed.certificate.serial,
                    dir.display()
                )
            });
        }
    }
    Ok(())
}

fn read_agent_id(dir: &Path) -> anyhow::Result<AgentId> {
    let path = dir.join(molt_sdk::dev::AGENT_ID_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("while reading {}", path.display()))?;
    text.trim().parse().with_context(|| format!("while reading {}", path.display()))
}

fn describe(recovery: &Recovery) -> String {
    let mut text = format!(
        "recovery {} of {}: {} ({} of {} guardians approved) to key {}",
        recovery.id,
        recovery.agent_id,
        recovery.state,
        recovery.approvals.len(),
        recovery.threshold,
        recovery.new_public_key
    );
    if let Some(unlocks_at) = recovery.unlocks_at_ms {
        if recovery.state == "time_locked" {
            text.push_str(&format!("; completes after {}", format_time(unlocks_at)));
        }
    }
    text
}

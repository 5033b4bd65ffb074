//! `molt agent`: the registry, through the control plane's API. Changes are signed by the
//! agent's own key; reads and search are public; revocation is an admin command.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use molt_protocol::AgentId;
use molt_sdk::api::{Agent, AgentProfile, Capability, Health, SearchQuery, Visibility};
use molt_sdk::dev::AgentKeys;

use crate::control::{AgentDirArgs, ApiArgs, credentials, format_time, now};

/// Largest profile or card file read.
const INPUT_FILE_BYTES_MAX: u64 = 64 * 1024;

#[derive(Debug, Args)]
#[command(
    about = "Register agents, keep them alive, find them, import and export A2A cards",
    long_about = "Register agents in the control plane's registry, keep them alive, find them, and import and \
export A2A-style agent cards.

register, update, heartbeat and import-card are signed with the agent's key from \
--agent-dir (made by `molt keygen`); show, search and export-card are public; revoke \
needs an admin key with the scope `ca:write`. A registration lapses 24 hours after the \
last heartbeat.

Capabilities are given as NAME[@VERSION][#TAG,TAG…], e.g. translate.text@1.2#nlp,text.

Examples:
  molt agent register --agent-dir alice --name 'Alice Translator' --capability translate.text@1.2#nlp
  molt agent heartbeat --agent-dir alice
  molt agent search translator --capability translate.text
  molt agent show agent-…
  molt agent export-card agent-… > card.json
  molt agent import-card --agent-dir alice card.json
  molt agent revoke agent-…
  molt agent rotate-key --agent-dir alice --overlap 3600
  molt agent guardians set --agent-dir alice --threshold 2 agent-… agent-… agent-…
  molt agent recovery prepare --agent-dir alice-new --agent agent-…
  molt agent recovery open --agent-dir guardian1 --agent agent-… --new-key HEX
  molt agent recovery complete --agent-dir alice-new --recovery rec_…"
)]
pub struct AgentArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: AgentCommand,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Register the agent with a profile (signed by its key).
    Register {
        #[command(flatten)]
        agent: AgentDirArgs,
        #[command(flatten)]
        profile: ProfileArgs,
    },
    /// Replace the agent's whole profile (signed by its key).
    Update {
        #[command(flatten)]
        agent: AgentDirArgs,
        #[command(flatten)]
        profile: ProfileArgs,
    },
    /// Renew the agent's registration and mark it online (signed by its key).
    Heartbeat {
        #[command(flatten)]
        agent: AgentDirArgs,
    },
    /// Show a public or unlisted agent.
    Show {
        /// The agent id (`agent-…`).
        agent_id: String,
    },
    /// Search public agents, best first (relevance × liveness × trust).
    Search {
        /// Free text: names (typo-tolerant), descriptions, capabilities.
        query: Option<String>,
        /// Only agents with this capability.
        #[arg(long, value_name = "NAME")]
        capability: Option<String>,
        /// Only agents with a capability carrying this tag.
        #[arg(long, value_name = "TAG")]
        tag: Option<String>,
        /// Results per page (1 to 100, default 20).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// The cursor a previous page printed.
        #[arg(long, value_name = "CURSOR")]
        cursor: Option<String>,
    },
    /// Revoke an agent (admin, scope ca:write): it leaves the registry and its signed
    /// requests are refused. Idempotent.
    Revoke {
        /// The agent id (`agent-…`).
        agent_id: String,
    },
    /// Print an agent's A2A-style card (JSON).
    ExportCard {
        /// The agent id (`agent-…`).
        agent_id: String,
        /// Write the card to FILE instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Register or update the agent from an A2A-style card (signed by its key). The card's
    /// `molt` member ({id, public_key}) is filled in from --agent-dir if missing.
    ImportCard {
        #[command(flatten)]
        agent: AgentDirArgs,
        /// The card (JSON); `-` reads standard input.
        #[arg(value_name = "CARD_JSON")]
        card: PathBuf,
    },
    /// Rotate the agent's key: a new key is certified for the same id (signed by the
    /// current key); the old one keeps working for the overlap.
    RotateKey(crate::agent_keys::RotateArgs),
    /// Show an agent's current key, the key it rotated away from, and every key change.
    Keys {
        /// The agent id (`agent-…`).
        agent_id: AgentId,
    },
    /// Name, show or remove the guardians that can recover the agent's key.
    #[command(subcommand)]
    Guardians(crate::agent_keys::GuardiansCommand),
    /// Recover a lost key through guardians: prepare, open, approve, show, cancel, complete.
    #[command(subcommand)]
    Recovery(crate::agent_keys::RecoveryCommand),
}

/// A profile from flags or from a JSON file.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// The whole profile as JSON ({name, description, capabilities: [{name, version,
    /// tags}], visibility, home_edge, key_binding}) instead of the flags below.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["name", "description", "capabilities", "visibility", "home_edge"])]
    pub profile: Option<PathBuf>,
    /// Display name, 1 to 100 characters.
    #[arg(long, required_unless_present = "profile")]
    pub name: Option<String>,
    /// What the agent does, up to 2000 characters.
    #[arg(long)]
    pub description: Option<String>,
    /// A capability, NAME[@VERSION][#TAG,TAG…]; repeat for several (up to 32).
    #[arg(long = "capability", value_name = "CAPABILITY")]
    pub capabilities: Vec<String>,
    /// Who can see the agent: public (searchable), unlisted (by id) or private.
    #[arg(long, value_enum)]
    pub visibility: Option<VisibilityArg>,
    /// The edge the agent usually connects to (`edge-…`).
    #[arg(long, value_name = "EDGE_ID")]
    pub home_edge: Option<String>,
    /// Do not publish the agent's encryption key (by default a binding signed now is
    /// published, so peers can encrypt to the agent).
    #[arg(long)]
    pub no_key_binding: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum VisibilityArg {
    Public,
    Unlisted,
    Private,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let api = &args.api;
    let client = api.client()?;
    match args.command {
        AgentCommand::Register { agent, profile } => {
            let keys = agent.keys()?;
            let profile = profile.build(&keys)?;
            let registered = client.register_agent(&credentials(&keys), &profile).await?;
            api.print(&registered, |agent| format!("registered {}", describe(agent)));
        }
        AgentCommand::Update { agent, profile } => {
            let keys = agent.keys()?;
            let profile = profile.build(&keys)?;
            let updated = client.update_agent(&credentials(&keys), &profile).await?;
            api.print(&updated, |agent| format!("updated {}", describe(agent)));
        }
        AgentCommand::Heartbeat { agent } => {
            let keys = agent.keys()?;
            let beat = client.heartbeat(&credentials(&keys)).await?;
            api.print(&beat, |beat| {
                format!(
                    "{}: {}, registered until {}",
                    keys.agent_id,
                    health_name(beat.health),
                    format_time(beat.expires_at_ms)
                )
            });
        }
        AgentCommand::Show { agent_id } => {
            let agent = client.agent(&agent_id).await?;
            api.print(&agent, describe);
        }
        AgentCommand::Search { query, capability, tag, limit, cursor } => {
            let query = SearchQuery { text: query, capability, tag, limit, cursor };
            let results = client.search_agents(&query).await?;
            api.print(&results, |results| {
                let mut text = String::new();
                for hit in &results.items {
                    let agent = &hit.agent;
                    text.push_str(&format!(
                        "{:.3}  {}  {}  [{}]  {}\n",
                        hit.score,
                        agent.id,
                        agent.name,
                        health(agent),
                        capability_list(&agent.capabilities)
                    ));
                }
                if results.items.is_empty() {
                    text.push_str("no agents found\n");
                }
                if let Some(cursor) = &results.next_cursor {
                    text.push_str(&format!("more: add --cursor {cursor}\n"));
                }
                text
            });
        }
        AgentCommand::Revoke { agent_id } => {
            let id: AgentId = agent_id.parse().with_context(|| format!("while reading the agent id {agent_id:?}"))?;
            let revocation = client.revoke_agent(id).await?;
            api.print(&revocation, |revocation| {
                format!("revoked {} at {}", revocation.id, format_time(revocation.revoked_at_ms))
            });
        }
        AgentCommand::ExportCard { agent_id, out } => {
            let card = client.agent_card(&agent_id).await?;
            // Invariant: the card was parsed from JSON and serialises back.
            let mut json = serde_json::to_string_pretty(&card).expect("a card serialises to JSON");
            json.push('\n');
            match out {
                Some(path) => {
                    std::fs::write(&path, json).with_context(|| format!("while writing {}", path.display()))?
                }
                None => print!("{json}"),
            }
        }
        AgentCommand::ImportCard { agent, card } => {
            let keys = agent.keys()?;
            let mut card: serde_json::Value = serde_json::from_slice(&read_input(&card)?)
                .with_context(|| format!("while reading the card {}", card.display()))?;
            fill_molt_member(&mut card, &keys)?;
            let (imported, created) = client.import_agent_card(&credentials(&keys), &card).await?;
            let verb = if created { "registered" } else { "updated" };
            api.print(&imported, |agent| format!("{verb} from the card: {}", describe(agent)));
        }
        AgentCommand::RotateKey(args) => crate::agent_keys::rotate(api, &client, args).await?,
        AgentCommand::Keys { agent_id } => crate::agent_keys::keys(api, &client, agent_id).await?,
        AgentCommand::Guardians(command) => crate::agent_keys::guardians(api, &client, command).await?,
        AgentCommand::Recovery(command) => crate::agent_keys::recovery(api, &client, command).await?,
    }
    Ok(())
}

impl ProfileArgs {
    fn build(self, keys: &AgentKeys) -> anyhow::Result<AgentProfile> {
        let mut profile = match &self.profile {
            Some(path) => serde_json::from_slice(&read_input(path)?)
                .with_context(|| format!("while reading the profile {}", path.display()))?,
            None => AgentProfile {
                // Invariant: clap requires --name unless --profile is given.
                name: self.name.clone().expect("--name is required without --profile"),
                description: self.description.clone().unwrap_or_default(),
                capabilities: self.capabilities.iter().map(|text| parse_capability(text)).collect::<Result<_, _>>()?,
                key_binding: None,
                visibility: match self.visibility.unwrap_or(VisibilityArg::Public) {
                    VisibilityArg::Public => Visibility::Public,
                    VisibilityArg::Unlisted => Visibility::Unlisted,
                    VisibilityArg::Private => Visibility::Private,
                },
                home_edge: self.home_edge.clone(),
            },
        };
        if self.no_key_binding {
            profile.key_binding = None;
        } else if profile.key_binding.is_none() {
            profile.key_binding = Some(hex::encode(keys.key_binding(now()).encode()));
        }
        Ok(profile)
    }
}

/// `NAME[@VERSION][#TAG,TAG…]`.
fn parse_capability(text: &str) -> anyhow::Result<Capability> {
    let (rest, tags) = match text.split_once('#') {
        Some((rest, tags)) => (rest, tags.split(',').filter(|tag| !tag.is_empty()).map(str::to_owned).collect()),
        None => (text, Vec::new()),
    };
    let (name, version) = rest.split_once('@').unwrap_or((rest, ""));
    if name.is_empty() {
        bail!("--capability {text:?}: expected NAME[@VERSION][#TAG,TAG…]");
    }
    Ok(Capability { name: name.to_owned(), version: version.to_owned(), tags })
}

/// Adds `molt: {id, public_key}` for this agent when the card has no `molt` member; a card
/// that names another agent is sent as it is, for the server to refuse.
fn fill_molt_member(card: &mut serde_json::Value, keys: &AgentKeys) -> anyhow::Result<()> {
    let Some(members) = card.as_object_mut() else {
        bail!("the card is not a JSON object");
    };
    members.entry("molt").or_insert_with(|| {
        serde_json::json!({
            "id": keys.agent_id.to_string(),
            "public_key": hex::encode(keys.signing_key.public_key().as_bytes()),
        })
    });
    Ok(())
}

fn read_input(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .take(INPUT_FILE_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .context("while reading standard input")?;
    } else {
        let file = std::fs::File::open(path).with_context(|| format!("while opening {}", path.display()))?;
        file.take(INPUT_FILE_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("while reading {}", path.display()))?;
    }
    if bytes.len() as u64 > INPUT_FILE_BYTES_MAX {
        bail!("{} is larger than {INPUT_FILE_BYTES_MAX} bytes", path.display());
    }
    Ok(bytes)
}

fn describe(agent: &Agent) -> String {
    let mut text = format!("{}  {}  [{}, {}]\n", agent.id, agent.name, health(agent), visibility(agent.visibility));
    if !agent.description.is_empty() {
        text.push_str(&format!("  {}\n", agent.description));
    }
    if !agent.capabilities.is_empty() {
        text.push_str(&format!("  capabilities: {}\n", capability_list(&agent.capabilities)));
    }
    if let Some(edge) = &agent.home_edge {
        text.push_str(&format!("  home edge: {edge}\n"));
    }
    text.push_str(&format!(
        "  revision {}, registered {}, last heartbeat {}, expires {}\n",
        agent.revision,
        format_time(agent.registered_at_ms),
        format_time(agent.last_heartbeat_ms),
        format_time(agent.expires_at_ms)
    ));
    text
}

fn capability_list(capabilities: &[Capability]) -> String {
    let items: Vec<String> = capabilities
        .iter()
        .map(|capability| {
            let mut item = capability.name.clone();
            if !capability.version.is_empty() {
                item.push('@');
                item.push_str(&capability.version);
            }
            if !capability.tags.is_empty() {
                item.push('#');
                item.push_str(&capability.tags.join(","));
            }
            item
        })
        .collect();
    items.join(" ")
}

fn health(agent: &Agent) -> String {
    health_name(agent.health)
}

fn health_name(health: Health) -> String {
    format!("{health:?}").to_lowercase()
}

fn visibility(visibility: Visibility) -> &'static str {
    match visibility {
        Visibility::Public => "public",
        Visibility::Unlisted => "unlisted",
        Visibility::Private => "private",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_parse_name_version_and_tags() {
        let parsed = parse_capability("translate.text@1.2#nlp,text").unwrap();
        assert_eq!(
            parsed,
            Capability {
                name: "translate.text".into(),
                version: "1.2".into(),
                tags: vec!["nlp".into(), "text".into()]
            }
        );
        assert_eq!(parse_capability("a:b").unwrap(), Capability { name: "a:b".into(), ..Capability::default() });
        assert!(parse_capability("@1").is_err());
    }
}

//! `molt keygen`: a new agent's keys.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use molt_sdk::dev::{AGENT_ID_FILE, AGENT_KEY_FILE, AgentFiles, ENCRYPTION_KEY_FILE};

#[derive(Debug, Args)]
#[command(
    about = "Generate a new agent's keys and print its agent id",
    long_about = "Generate a new agent's keys and print its agent id.

Writes into DIR (created if missing):
  agent.key       Ed25519 signing key, PKCS#8 PEM, mode 0600
  encryption.key  X25519 encryption key, 64 hex digits, mode 0600
  agent.id        the agent id, derived from the signing key; it never changes

Refuses to overwrite existing keys. Next, have a CA certify the key:
`molt dev-ca issue-agent --ca CA_DIR --agent-dir DIR`.

Example:
  molt keygen --dir alice"
)]
pub struct KeygenArgs {
    /// Agent directory to write the keys into.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
}

pub fn run(args: &KeygenArgs) -> anyhow::Result<()> {
    let files = AgentFiles::generate(&args.dir, &mut rand::rngs::OsRng)
        .with_context(|| format!("while generating agent keys in {}", args.dir.display()))?;
    println!("{}", files.agent_id);
    eprintln!(
        "wrote {AGENT_KEY_FILE}, {ENCRYPTION_KEY_FILE} and {AGENT_ID_FILE} in {}; next: molt dev-ca issue-agent --ca CA_DIR --agent-dir {}",
        args.dir.display(),
        args.dir.display()
    );
    Ok(())
}

//! `molt card`: an agent's card, the JSON document its peers load.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use molt_sdk::dev::{AgentCard, CARD_FILE};

#[derive(Debug, Subcommand)]
#[command(about = "Show agent cards (what peers need to reach an agent)")]
pub enum CardCommand {
    Show(ShowArgs),
}

#[derive(Debug, Args)]
#[command(
    about = "Print an agent's card as JSON",
    long_about = "Print an agent's card as JSON: its agent id, its certificate chain (PEM) and the \
signed binding of its encryption key (hex). Peers pass the card to `molt send --to` and \
`molt listen --peer`; they verify it against the CA root before use.

The card is card.json in the agent directory, written by `molt dev-ca issue-agent`.

Example:
  molt card show --agent-dir alice > alice.card.json"
)]
pub struct ShowArgs {
    /// Agent directory with a certificate issued by `molt dev-ca issue-agent`.
    #[arg(long, value_name = "DIR")]
    pub agent_dir: PathBuf,
}

pub fn run(command: CardCommand) -> anyhow::Result<()> {
    match command {
        CardCommand::Show(args) => show(&args),
    }
}

fn show(args: &ShowArgs) -> anyhow::Result<()> {
    let path = args.agent_dir.join(CARD_FILE);
    if !path.exists() {
        anyhow::bail!(
            "no {CARD_FILE} in {}: issue a certificate first with `molt dev-ca issue-agent --ca CA_DIR --agent-dir {}`",
            args.agent_dir.display(),
            args.agent_dir.display()
        );
    }
    let card = AgentCard::load(&path).context("while reading the agent's card")?;
    println!("{}", card.to_json_pretty());
    Ok(())
}

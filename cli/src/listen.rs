//! `molt listen`: print the messages an agent receives, one JSON line each.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use molt_protocol::UnixMillis;
use molt_sdk::client::Event;
use molt_sdk::{Client, IncomingMessage};

use crate::session::{ConnectArgs, Session};

#[derive(Debug, Args)]
#[command(
    about = "Receive messages and print one JSON line per message",
    long_about = "Connect to an edge as this agent and print every verified message it receives, \
one JSON line each:
  {\"message_id\":\"…\",\"sender\":\"agent-…\",\"timestamp_ms\":1700000000000,\"text\":\"hello\"}
Messages queued at the edge while the agent was offline arrive first. Only senders whose \
cards are given with --peer (and the agent itself) can be verified; other messages are \
reported on stderr and dropped. Text that is not UTF-8 is printed with replacement characters.

Without --edge, the edge is the nearest in the control plane's edge map (--api or MOLT_API), \
and the agent fails over to the next one if it dies. \
Prints `listening as agent-… via HOST:PORT` on stderr once connected. Runs until --count \
messages arrived, --timeout-secs passed (an error if --count was not reached), or Ctrl-C.

Example:
  molt listen --agent-dir bob --edge localhost:4433 --ca-root ca/root.pem --peer alice/card.json
  molt listen --agent-dir bob --edge 127.0.0.1:4433 --ca-root ca/root.pem --peer alice/card.json carol/card.json --count 1 --timeout-secs 30
  molt listen --agent-dir bob --api http://127.0.0.1:8080 --ca-root ca/root.pem --peer alice/card.json"
)]
pub struct ListenArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Cards (JSON) of the agents to accept messages from.
    #[arg(long = "peer", value_name = "CARD_JSON", num_args = 1..)]
    pub peers: Vec<PathBuf>,
    /// Exit after this many messages.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Exit after this many seconds (with an error if --count messages did not arrive).
    #[arg(long, value_name = "N")]
    pub timeout_secs: Option<u64>,
}

pub async fn run(args: ListenArgs) -> anyhow::Result<()> {
    let session = Session::load(&args.connect)?;
    let now = UnixMillis::now_from_system();
    for peer in &args.peers {
        session.add_peer(peer, now)?;
    }
    session.add_self();
    let agent_id = session.identity.agent_id;
    let mut client = session.connect(&args.connect, |_| {}).await?;
    let via = match (&args.connect.edge, client.edge()) {
        (Some(edge), _) => edge.clone(),
        (None, Some(addr)) => addr.to_string(),
        (None, None) => "an edge".to_owned(),
    };
    eprintln!("listening as {agent_id} via {via}");

    let mut received = 0;
    let listening = receive(&mut client, args.count, &mut received);
    let result = tokio::select! {
        result = listening => result,
        () = sleep_or_forever(args.timeout_secs) => match args.count {
            Some(count) => Err(anyhow::anyhow!(
                "timed out after {} s having received {received} of {count} messages",
                args.timeout_secs.unwrap_or_default()
            )),
            None => Ok(()),
        },
        signal = tokio::signal::ctrl_c() => signal.context("while waiting for Ctrl-C"),
    };
    client.close().await;
    result
}

/// Prints messages until `count` have arrived (forever without one).
async fn receive(client: &mut Client, count: Option<u64>, received: &mut u64) -> anyhow::Result<()> {
    while count.is_none_or(|count| *received < count) {
        match client.next_event().await {
            Some(Event::Message(message)) => {
                print_message(&message)?;
                *received += 1;
            }
            Some(Event::Unverified { message_id, sender, reason }) => {
                eprintln!("warning: dropped message {message_id} from {sender}: {reason}");
            }
            Some(Event::Disconnected { reason }) => tracing::info!(%reason, "disconnected from the edge; reconnecting"),
            Some(Event::GoAway { reconnect_after }) => tracing::info!(?reconnect_after, "edge is going away"),
            Some(other) => tracing::debug!(event = ?other, "event"),
            None => anyhow::bail!("the connection to the edge stopped"),
        }
    }
    Ok(())
}

fn print_message(message: &IncomingMessage) -> anyhow::Result<()> {
    let line = serde_json::json!({
        "message_id": message.message_id.to_string(),
        "sender": message.sender,
        "timestamp_ms": message.timestamp.0,
        "text": String::from_utf8_lossy(&message.plaintext),
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").and_then(|()| stdout.flush()).context("while writing to standard output")
}

async fn sleep_or_forever(secs: Option<u64>) {
    match secs {
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => std::future::pending().await,
    }
}

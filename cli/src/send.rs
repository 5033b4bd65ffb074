//! `molt send`: one message to one agent through an edge.

use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use molt_protocol::envelope::{MAX_PLAINTEXT_BYTES, Ttl};
use molt_protocol::frame::Disposition;
use molt_protocol::{AgentId, MessageId, UnixMillis};
use molt_sdk::client::Event;
use molt_sdk::{Client, SendReport};

use crate::session::{ConnectArgs, Session};

#[derive(Debug, Args)]
#[command(
    about = "Send one end-to-end encrypted, signed message to an agent",
    long_about = "Send one message to the agent whose card is given, through an edge: the one given \
with --edge, or the nearest in the control plane's edge map (--api or MOLT_API).

The message is encrypted to the recipient's key from its card (after the card is verified \
against --ca-root) and signed with this agent's key. Prints one JSON line once the edge has \
taken it:
  {\"message_id\":\"…\",\"recipient\":\"agent-…\",\"disposition\":\"forwarded\"}
`forwarded` means handed to the recipient's live connection, `stored` means queued durably \
at the edge until the recipient connects. With --wait-receipt, waits for the recipient's \
signed receipt and prints a second line:
  {\"message_id\":\"…\",\"receipt_from\":\"agent-…\"}

Example:
  molt send --agent-dir alice --edge localhost:4433 --ca-root ca/root.pem --to bob/card.json 'hello bob'
  echo hello | molt send --agent-dir alice --edge 127.0.0.1:4433 --ca-root ca/root.pem --to bob/card.json --wait-receipt -
  molt send --agent-dir alice --api http://127.0.0.1:8080 --ca-root ca/root.pem --to bob/card.json 'via the nearest edge'"
)]
pub struct SendArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The recipient's card (JSON), e.g. from `molt card show`.
    #[arg(long, value_name = "CARD_JSON")]
    pub to: PathBuf,
    /// Seconds the edge may keep the message for an offline recipient (1 to 604800)
    /// [default: 86400].
    #[arg(long, value_name = "N")]
    pub ttl_secs: Option<u32>,
    /// Wait for the recipient's receipt before exiting.
    #[arg(long)]
    pub wait_receipt: bool,
    /// Seconds to wait for the receipt with --wait-receipt.
    #[arg(long, value_name = "N", default_value_t = 30)]
    pub receipt_timeout_secs: u64,
    /// The message text; `-` reads it from standard input.
    #[arg(value_name = "MESSAGE")]
    pub message: String,
}

pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    let plaintext = message_bytes(&args.message)?;
    let ttl = args
        .ttl_secs
        .map(|secs| Ttl::from_secs(secs).with_context(|| format!("while reading --ttl-secs {secs}")))
        .transpose()?;
    let session = Session::load(&args.connect)?;
    let recipient = session.add_peer(&args.to, UnixMillis::now_from_system())?;
    let mut client = session
        .connect(&args.connect, |config| {
            if let Some(ttl) = ttl {
                config.default_ttl = ttl;
            }
        })
        .await?;
    let result = send_and_report(&mut client, recipient, &plaintext, &args).await;
    client.close().await;
    result
}

async fn send_and_report(
    client: &mut Client,
    recipient: AgentId,
    plaintext: &[u8],
    args: &SendArgs,
) -> anyhow::Result<()> {
    let SendReport { message_id, disposition } =
        client.send(recipient, plaintext).await.with_context(|| format!("while sending to {recipient}"))?;
    let disposition = match disposition {
        Disposition::Forwarded => "forwarded",
        Disposition::Stored => "stored",
    };
    println!(
        "{}",
        serde_json::json!({
            "message_id": message_id.to_string(),
            "recipient": recipient,
            "disposition": disposition,
        })
    );
    if args.wait_receipt {
        let timeout = Duration::from_secs(args.receipt_timeout_secs);
        let from = tokio::time::timeout(timeout, wait_for_receipt(client, message_id))
            .await
            .with_context(|| format!("while waiting for the receipt of {message_id}: none within {timeout:?}"))??;
        println!("{}", serde_json::json!({ "message_id": message_id.to_string(), "receipt_from": from }));
    }
    Ok(())
}

async fn wait_for_receipt(client: &mut Client, message_id: MessageId) -> anyhow::Result<AgentId> {
    loop {
        match client.next_event().await {
            Some(Event::Receipt { message_id: receipted, from }) if receipted == message_id => return Ok(from),
            Some(Event::Disconnected { reason }) => tracing::info!(%reason, "disconnected from the edge; reconnecting"),
            Some(other) => tracing::debug!(event = ?other, "ignored while waiting for a receipt"),
            None => anyhow::bail!("while waiting for the receipt of {message_id}: the client stopped"),
        }
    }
}

fn message_bytes(message: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = if message == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .take(MAX_PLAINTEXT_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .context("while reading the message from standard input")?;
        bytes
    } else {
        message.as_bytes().to_vec()
    };
    if bytes.len() > MAX_PLAINTEXT_BYTES {
        anyhow::bail!("the message is longer than {MAX_PLAINTEXT_BYTES} bytes");
    }
    Ok(bytes)
}

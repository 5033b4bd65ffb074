//! `molt edge`: the edge fleet as the control plane sees it, through the admin API.

use clap::{Args, Subcommand};
use molt_sdk::api::{EdgeStatus, Page};

use crate::control::{ApiArgs, format_time};

#[derive(Debug, Args)]
#[command(
    about = "List edges with their metrics summaries, and set their weights (admin)",
    long_about = "The edges enrolled with the control plane. `list` shows every registered edge: \
region, addresses, version, when it last reported, whether it is in the edge map agents choose \
from, how many agents it reported, and the metrics summary that came with its latest presence \
report (connections, messages, rejections, buffer, edge links). Needs an admin key with the \
scope `read`. `weight` sets how strongly agents prefer an edge (1 to 1000, default 100; \
scope `ca:write`).

Examples:
  molt edge list
  molt edge list --json
  molt edge weight edge-… 250"
)]
pub struct EdgeArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: EdgeCommand,
}

#[derive(Debug, Subcommand)]
pub enum EdgeCommand {
    /// List registered edges with their latest metrics summaries.
    List {
        /// Edges per page (1 to 1000).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// The `next_after` a previous page printed.
        #[arg(long, value_name = "EDGE_ID")]
        after: Option<String>,
    },
    /// Set an edge's weight: 1 to 1000, 100 neutral; higher counts the edge as nearer.
    Weight {
        /// The edge id (`edge-…`).
        edge_id: String,
        /// The weight.
        #[arg(value_parser = clap::value_parser!(u16).range(1..=1000))]
        weight: u16,
    },
}

pub async fn run(args: EdgeArgs) -> anyhow::Result<()> {
    let api = &args.api;
    let client = api.client()?;
    match args.command {
        EdgeCommand::List { limit, after } => {
            let page = client.list_edges(Page { limit, after: after.as_deref() }).await?;
            api.print(&page, |page| {
                let mut text: String = page.items.iter().map(edge_lines).collect();
                if page.items.is_empty() {
                    text.push_str("no edges have registered\n");
                }
                if let Some(next) = &page.next_after {
                    text.push_str(&format!("more: molt edge list --after {next}\n"));
                }
                text
            });
        }
        EdgeCommand::Weight { edge_id, weight } => {
            let entry = client.set_edge_weight(&edge_id, weight).await?;
            api.print(&entry, |entry| format!("{} in {}: weight {}", entry.edge_id, entry.region, entry.weight));
        }
    }
    Ok(())
}

fn edge_lines(edge: &EdgeStatus) -> String {
    let map = if edge.in_edge_map { "in the edge map" } else { "not in the edge map" };
    let mut text = format!(
        "{}  {}  {}  v{}  weight {}  last seen {} ({map})  {} agents\n",
        edge.edge_id,
        edge.region,
        edge.quic_addrs.join(","),
        edge.version,
        edge.weight,
        format_time(edge.last_seen_ms),
        edge.connected_agents
    );
    match &edge.summary {
        Some(summary) => text.push_str(&format!(
            "    up {} s: {} connections; messages {} received, {} delivered, {} rejected, {} rate-limited; \
             buffer {} messages ({} bytes); links {}, {} forwarded, {} received, {} handed over\n",
            summary.uptime_ms / 1000,
            summary.connections,
            summary.messages_received,
            summary.messages_delivered,
            summary.messages_rejected,
            summary.rate_limited,
            summary.buffered_messages,
            summary.buffered_bytes,
            summary.peer_links,
            summary.peer_forwarded,
            summary.peer_received,
            summary.handoffs
        )),
        None => text.push_str("    no metrics summary yet\n"),
    }
    text
}

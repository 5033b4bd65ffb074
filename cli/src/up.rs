//! `molt up`: a local Molt network on embedded defaults, with no other setup: a control
//! plane on SQLite and two linked edges in different regions ([`crate::network`]), until
//! Ctrl-C or SIGTERM.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use molt_sdk::dev::CARD_FILE;

use crate::network::{EdgeLogs, Network, NetworkOptions, Ports};

/// Network directory when `--dir` is not given.
pub const DEFAULT_DIR: &str = ".molt";
/// How often `up` checks that its edges are still running.
const EDGE_WATCH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
#[command(
    about = "Run a local Molt network (a control plane and two linked edges) until Ctrl-C",
    long_about = "Run a local Molt network on embedded defaults, with no other setup: a control plane on \
SQLite (registry, certificate authority, credits) and two edges in different regions, west and \
east, enrolled with it and linked to each other, until Ctrl-C or SIGTERM. The control plane runs \
in this process; each edge is a child process (`molt run-edge`), stopped with it.

On the first run, DIR (default .molt) gets:
  control-plane/   control-plane.toml (its addresses), molt.db (SQLite), admin.token (mode 0600)
  edges/west, edges/east   each edge's key, certificate, edge.toml and offline buffer (data/)
  root.pem         the root certificate agents trust
Later runs reuse all of it: agents, certificates and buffered messages survive restarts. The \
files are yours to edit. An edge whose certificate expired is enrolled again.

Addresses (127.0.0.1): control plane API 8080 (the CLI's default --api) and gRPC 8081; edge \
west QUIC 4433, health 9090, link 4533; edge east QUIC 4434, health 9091, link 4534. \
--port-base N uses N to N+7 instead, for a new DIR.

Once up, it prints where everything listens and the commands that make two agents and pass a \
message between the edges. Logs go to stderr (edge lines labelled west/east); RUST_LOG sets the \
level. `molt demo` runs a scripted tour on a fresh network of its own.

Examples:
  molt up
  molt up --dir /tmp/molt2 --port-base 24000
  RUST_LOG=debug molt up"
)]
pub struct UpArgs {
    /// Network directory; made on the first run, reused later.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// First of 8 consecutive ports for a new network (API, gRPC, then QUIC, health and
    /// link of each edge) [default: the standard ports above].
    #[arg(long, value_name = "N")]
    pub port_base: Option<u16>,
}

pub fn run(args: &UpArgs) -> anyhow::Result<()> {
    init_logging();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("while starting the async runtime")?;
    let options = NetworkOptions {
        dir: args.dir.clone(),
        ports: args.port_base.map_or(Ports::Standard, Ports::Base),
        edge_logs: EdgeLogs::Labelled,
    };
    runtime.block_on(serve(options, shutdown_signal()))
}

/// Starts the network, prints the banner, and stops everything once `stop` resolves.
async fn serve(options: NetworkOptions, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut network = Network::start(&options).await?;
    print!("{}", banner(&network));
    watch_edges(&mut network, stop).await;
    eprintln!("molt up: stopping");
    network.stop().await?;
    eprintln!("molt up: stopped");
    Ok(())
}

/// Waits for `stop`, reporting any edge that exits meanwhile (the rest keep running).
async fn watch_edges(network: &mut Network, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut reported = vec![false; network.edges.len()];
    let mut interval = tokio::time::interval(EDGE_WATCH_INTERVAL);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = interval.tick() => {}
        }
        for (edge, reported) in network.edges.iter_mut().zip(&mut reported) {
            if let Some(status) = edge.exited().filter(|_| !*reported) {
                *reported = true;
                eprintln!(
                    "molt up: the edge {} exited ({status}); its agents fail over to the other edge. \
                     Restart molt up to bring it back.",
                    edge.spec.name
                );
            }
        }
    }
}

/// What the user needs once the network is up: where everything listens, where its files
/// are, and the commands for a first exchange.
fn banner(network: &Network) -> String {
    let layout = &network.layout;
    let control_plane = &network.control_plane;
    let mut lines = vec![
        format!(
            "Molt is up in {}: a control plane and {} linked edges. Ctrl-C stops them.",
            layout.root.display(),
            network.edges.len()
        ),
        String::new(),
        format!("  control plane  {}  (API; edges use gRPC on {})", control_plane.url(), control_plane.grpc_addr),
        format!("                 database {} ({})", layout.database().display(), control_plane.database.describe()),
        format!("                 config {}", control_plane.config_path.display()),
        format!(
            "                 admin token in {} ({})",
            layout.admin_token().display(),
            control_plane.admin_token.describe()
        ),
        format!("  org            {} ({}, {})", network.org.name, network.org.id, network.org_provenance.describe()),
    ];
    for edge in &network.edges {
        lines.push(format!(
            "  edge {:<9} {} in region {} (enrollment {})",
            edge.spec.name,
            edge.edge_id(),
            edge.spec.region,
            edge.enrollment.describe()
        ));
        lines.push(format!("                 config {}", edge.config_path.display()));
        let link = edge.ready.peer_addr.map(|addr| format!(", link {addr}")).unwrap_or_default();
        lines.push(format!(
            "                 QUIC {}, health http://{}/healthz, metrics /metrics{link}",
            edge.ready.quic_addr, edge.ready.admin_addr
        ));
    }
    lines.push(format!("  agents trust   {}", layout.root_pem().display()));
    lines.push(String::new());
    lines.push("Two agents on different edges, from this directory:".to_owned());
    lines.push(String::new());
    for step in first_steps(network) {
        lines.push(format!("  {step}"));
    }
    lines.push(String::new());
    lines.push(format!(
        "Without --edge, --api {} lets the agent pick the nearest edge and fail over to the other.",
        control_plane.url()
    ));
    lines.push("`molt demo` runs a scripted tour (search, messages, offline delivery, failover).".to_owned());
    lines.push(String::new());
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// The commands that certify alice and bob, and send bob (on east) a message from alice
/// (on west).
fn first_steps(network: &Network) -> Vec<String> {
    let layout = &network.layout;
    let control_plane = &network.control_plane;
    let root = layout.root_pem();
    let (alice, bob) = (layout.agent_dir("alice"), layout.agent_dir("bob"));
    let word = |path: &Path| shell_word(&path.display().to_string());
    let edge_addr = |index: usize| network.edges.get(index).map(|edge| edge.ready.quic_addr.to_string());
    let (west, east) = (edge_addr(0).unwrap_or_default(), edge_addr(1).unwrap_or_default());
    let connect =
        |agent: &Path, edge: &str| format!("--agent-dir {} --edge {edge} --ca-root {}", word(agent), word(&root));
    let mut steps = vec![format!(
        "export MOLT_API={} MOLT_ADMIN_TOKEN=$(cat {})",
        control_plane.url(),
        word(&layout.admin_token())
    )];
    for agent in [&alice, &bob] {
        steps.push(format!("molt keygen --dir {}", word(agent)));
        steps.push(format!("molt cert issue-agent --org {} --agent-dir {}", network.org.id, word(agent)));
    }
    steps.push("# bob listens on east (leave it running, e.g. in a second terminal):".to_owned());
    steps.push(format!("molt listen {} --peer {}", connect(&bob, &east), word(&alice.join(CARD_FILE))));
    steps.push("# alice sends from west:".to_owned());
    steps.push(format!("molt send {} --to {} 'hello bob'", connect(&alice, &west), word(&bob.join(CARD_FILE))));
    steps
}

/// `text` as one POSIX shell word: unchanged when that is safe, single-quoted otherwise.
pub fn shell_word(text: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Diagnostics go to stderr, filtered by RUST_LOG (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops molt up");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(shell_word(".molt/agents/alice"), ".molt/agents/alice");
        assert_eq!(shell_word("my net's dir/agents"), r"'my net'\''s dir/agents'");
        assert_eq!(shell_word(""), "''");
    }
}

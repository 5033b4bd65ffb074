//! `molt run-edge` (hidden): one edge of a local network, as a child process of `molt up`
//! or `molt demo`.
//!
//! The parent talks to it through the standard streams. Once the edge listens, it prints
//! one [`Ready`] line of JSON on stdout. It stops gracefully (draining its agents) when
//! its standard input reaches end of file: the parent closes it to stop the edge, and the
//! kernel closes it if the parent dies, so an edge never outlives its network. SIGTERM and
//! Ctrl-C stop it the same way. Logs go to stderr, without colours, for the parent to
//! label or file.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use molt_protocol::EdgeId;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

/// The subcommand's name, as the parent spells it.
pub const SUBCOMMAND: &str = "run-edge";

#[derive(Debug, Args)]
pub struct RunEdgeArgs {
    /// The edge's configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// The line printed once the edge listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub edge_id: EdgeId,
    pub quic_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub peer_addr: Option<SocketAddr>,
}

pub fn run(args: &RunEdgeArgs) -> anyhow::Result<()> {
    let config = molt_edge::config::load(&args.config)
        .with_context(|| format!("while loading the edge configuration {}", args.config.display()))?;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| config.log.level.to_env_filter());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("while starting the async runtime")?;
    runtime.block_on(async {
        let edge = molt_edge::Edge::start(config).await.context("while starting the edge")?;
        let ready = Ready {
            edge_id: edge.edge_id,
            quic_addr: edge.quic_addr(),
            admin_addr: edge.admin_addr(),
            peer_addr: edge.peer_addr(),
        };
        let mut stdout = std::io::stdout().lock();
        // Invariant: the fields serialise.
        writeln!(stdout, "{}", serde_json::to_string(&ready).expect("Ready serialises"))
            .and_then(|()| stdout.flush())
            .context("while telling the parent the edge is ready")?;
        drop(stdout);
        edge.run_until(stop_requested()).await
    })
}

/// Resolves when standard input closes, or on SIGTERM or Ctrl-C.
async fn stop_requested() {
    let stdin_closed = async {
        let mut stdin = tokio::io::stdin();
        let mut buffer = [0u8; 64];
        // Anything the parent writes is ignored; end of file or an error means stop.
        while matches!(stdin.read(&mut buffer).await, Ok(read) if read > 0) {}
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = stdin_closed => {}
        () = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

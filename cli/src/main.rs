//! `molt`: the Molt command line. Thin: parses arguments, builds a runtime where one is
//! needed, and calls `molt_sdk`. Every command lives in its own module.
#![forbid(unsafe_code)]

mod card;
mod dev_ca;
mod keygen;
mod listen;
mod send;
mod session;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Worker threads of the runtime that `send` and `listen` run on.
const RUNTIME_WORKER_THREADS: usize = 2;

#[derive(Debug, Parser)]
#[command(
    name = "molt",
    version,
    about = "Molt command line: agent keys, a development PKI, and sending and listening through an edge",
    long_about = "Molt command line: agent keys, a development PKI, and sending and listening through an edge.

Agents talk through QUIC edge relays with mutual TLS. An agent's id is derived from its first \
(inception) Ed25519 key; messages are encrypted to the recipient (HPKE) and signed by the sender.

Quick start, all on one machine:

  molt dev-ca init --dir ca
  molt keygen --dir alice && molt dev-ca issue-agent --ca ca --agent-dir alice
  molt keygen --dir bob   && molt dev-ca issue-agent --ca ca --agent-dir bob
  molt dev-ca issue-edge --ca ca --out edge        # then start molt-edge with these files
  molt listen --agent-dir bob --edge localhost:4433 --ca-root ca/root.pem --peer alice/card.json &
  molt send --agent-dir alice --edge localhost:4433 --ca-root ca/root.pem --to bob/card.json 'hello bob'

Exit status: 0 on success, 1 on error (one line on stderr starting with `error:`), 2 on a \
command-line usage error. Set RUST_LOG (e.g. RUST_LOG=debug) for diagnostics on stderr."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Keygen(keygen::KeygenArgs),
    #[command(subcommand)]
    DevCa(dev_ca::DevCaCommand),
    #[command(subcommand)]
    Card(card::CardCommand),
    Send(send::SendArgs),
    Listen(listen::ListenArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Keygen(args) => keygen::run(&args),
        Command::DevCa(command) => dev_ca::run(command),
        Command::Card(command) => card::run(command),
        Command::Send(args) => runtime()?.block_on(send::run(args)),
        Command::Listen(args) => runtime()?.block_on(listen::run(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKER_THREADS)
        .enable_all()
        .build()
        .context("while starting the async runtime")
}

/// Diagnostics go to stderr, filtered by RUST_LOG (default: warnings only), so stdout
/// carries only command output.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

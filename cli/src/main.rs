//! `molt`: the Molt command line. Thin: parses arguments, builds a runtime where one is
//! needed, and calls `molt_sdk`. Every command lives in its own module.
#![forbid(unsafe_code)]

mod card;
mod dev_ca;
mod keygen;
mod listen;
mod send;
mod session;
mod up;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Worker threads of the runtime that `send` and `listen` run on (`molt up` sizes its own).
const RUNTIME_WORKER_THREADS: usize = 2;

#[derive(Debug, Parser)]
#[command(
    name = "molt",
    version,
    about = "Molt command line: agent keys, a development PKI, and sending and listening through an edge",
    long_about = "Molt command line: agent keys, a development PKI, and sending and listening through an edge.

Agents talk through QUIC edge relays with mutual TLS. An agent's id is derived from its first \
(inception) Ed25519 key; messages are encrypted to the recipient (HPKE) and signed by the sender.

Quick start, all on one machine: `molt up` runs a local network (a development CA in .molt/ca \
and an edge on 127.0.0.1:4433) and prints the commands to try it; in another terminal:

  molt keygen --dir .molt/agents/alice && molt dev-ca issue-agent --ca .molt/ca --agent-dir .molt/agents/alice
  molt keygen --dir .molt/agents/bob   && molt dev-ca issue-agent --ca .molt/ca --agent-dir .molt/agents/bob
  molt listen --agent-dir .molt/agents/bob --edge 127.0.0.1:4433 --ca-root .molt/ca/root.pem --peer .molt/agents/alice/card.json &
  molt send --agent-dir .molt/agents/alice --edge 127.0.0.1:4433 --ca-root .molt/ca/root.pem --to .molt/agents/bob/card.json 'hello bob'

For a network of your own, see `molt dev-ca --help` (a CA, and certificates for molt-edge).

Exit status: 0 on success, 1 on error (one line on stderr starting with `error:`), 2 on a \
command-line usage error. Set RUST_LOG (e.g. RUST_LOG=debug) for diagnostics on stderr."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Up(up::UpArgs),
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
    // `molt up` logs as its edge's configuration says.
    if !matches!(cli.command, Command::Up(_)) {
        init_logging();
    }
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
        Command::Up(args) => up::run(&args),
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}

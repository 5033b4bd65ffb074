//! `molt`: the Molt command line. Thin: parses arguments, builds a runtime where one is
//! needed, and calls `molt_sdk`. Every command lives in its own module.
#![forbid(unsafe_code)]

mod admin_key;
mod agent;
mod agent_keys;
mod card;
mod cert;
mod control;
mod demo;
mod dev_ca;
mod edge;
mod enrollment_token;
mod keygen;
mod ledger;
mod listen;
mod network;
mod org;
mod run_edge;
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
    about = "Molt command line: agent keys, a development PKI, sending and listening through an edge, and the control plane's admin, registry and credits commands",
    long_about = "Molt command line: agent keys, a development PKI, and sending and listening through an edge.

Agents talk through QUIC edge relays with mutual TLS. An agent's id is derived from its first \
(inception) Ed25519 key; messages are encrypted to the recipient (HPKE) and signed by the sender.

Quick start, all on one machine: `molt up` runs a local network (a control plane on \
127.0.0.1:8080 and two linked edges, west on 127.0.0.1:4433 and east on 127.0.0.1:4434) and \
prints the commands to try it; `molt demo` runs a scripted tour on a fresh network. With \
`molt up` running, in another terminal:

  export MOLT_ADMIN_TOKEN=$(cat .molt/control-plane/admin.token)
  molt keygen --dir alice && molt cert issue-agent --org org_… --agent-dir alice   # org id: molt up's banner
  molt keygen --dir bob   && molt cert issue-agent --org org_… --agent-dir bob
  molt listen --agent-dir bob --edge 127.0.0.1:4434 --ca-root .molt/root.pem --peer alice/card.json &
  molt send --agent-dir alice --edge 127.0.0.1:4433 --ca-root .molt/root.pem --to bob/card.json 'hello bob'

Without a control plane, `molt dev-ca --help` shows how to make a CA of your own (and \
certificates for molt-edge).

With a control plane (`molt-control-plane`, default http://127.0.0.1:8080; --api or MOLT_API), \
admins manage orgs, certificates and keys, and agents register and find each other:

  export MOLT_ADMIN_TOKEN=molt_admin_…   # printed once by the control plane's first start
  molt org create acme && molt org ca create org_…
  molt keygen --dir alice && molt cert issue-agent --org org_… --agent-dir alice
  molt agent register --agent-dir alice --name 'Alice' --capability translate.text#nlp
  molt agent search alice

Credits: agents open wallets, pay, escrow and stake (signed with --agent-dir); admins mint, \
set the fee, rule on disputes and audit (`molt ledger`). Amounts are credits with up to 6 \
decimals (1.5) or micro-credits with a `u` suffix (1500000u):

  molt wallet open --agent-dir alice
  molt ledger mint 100 --to agent-…                      # admin, scope ledger:admin
  molt pay --agent-dir alice --to agent-… 1.5 --id invoice-42
  molt wallet history --agent-dir alice

See `molt org --help`, `molt cert --help`, `molt agent --help`, `molt admin-key --help`, \
`molt wallet --help`, `molt pay --help`, `molt escrow --help`, `molt stake --help`, \
`molt ledger --help`.

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
    Demo(demo::DemoArgs),
    /// Runs one edge of `molt up`'s network (started by `molt up` and `molt demo`).
    #[command(hide = true)]
    RunEdge(run_edge::RunEdgeArgs),
    Keygen(keygen::KeygenArgs),
    #[command(subcommand)]
    DevCa(dev_ca::DevCaCommand),
    #[command(subcommand)]
    Card(card::CardCommand),
    Send(send::SendArgs),
    Listen(listen::ListenArgs),
    Org(org::OrgArgs),
    Cert(cert::CertArgs),
    Agent(agent::AgentArgs),
    AdminKey(admin_key::AdminKeyArgs),
    EnrollmentToken(enrollment_token::EnrollmentTokenArgs),
    Edge(edge::EdgeArgs),
    Wallet(ledger::WalletArgs),
    Pay(ledger::PayArgs),
    Escrow(ledger::EscrowArgs),
    Stake(ledger::StakeArgs),
    Ledger(ledger::LedgerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `up`, `demo` and `run-edge` set up logging of their own.
    if !matches!(cli.command, Command::Up(_) | Command::Demo(_) | Command::RunEdge(_)) {
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
        Command::Demo(args) => demo::run(&args),
        Command::RunEdge(args) => run_edge::run(&args),
        Command::Keygen(args) => keygen::run(&args),
        Command::DevCa(command) => dev_ca::run(command),
        Command::Card(command) => card::run(command),
        Command::Send(args) => runtime()?.block_on(send::run(args)),
        Command::Listen(args) => runtime()?.block_on(listen::run(args)),
        Command::Org(args) => runtime()?.block_on(org::run(args)),
        Command::Cert(args) => runtime()?.block_on(cert::run(args)),
        Command::Agent(args) => runtime()?.block_on(agent::run(args)),
        Command::AdminKey(args) => runtime()?.block_on(admin_key::run(args)),
        Command::EnrollmentToken(args) => runtime()?.block_on(enrollment_token::run(args)),
        Command::Edge(args) => runtime()?.block_on(edge::run(args)),
        Command::Wallet(args) => runtime()?.block_on(ledger::run_wallet(args)),
        Command::Pay(args) => runtime()?.block_on(ledger::run_pay(args)),
        Command::Escrow(args) => runtime()?.block_on(ledger::run_escrow(args)),
        Command::Stake(args) => runtime()?.block_on(ledger::run_stake(args)),
        Command::Ledger(args) => runtime()?.block_on(ledger::run_ledger(args)),
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

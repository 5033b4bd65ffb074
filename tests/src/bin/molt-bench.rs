//! `molt-bench`: load benchmark of the Molt edge relay on loopback.
//!
//! Starts a real `molt-edge` process (built next to this binary), connects raw QUIC
//! agents that send pre-signed envelopes and answer with pre-signed receipts, and prints
//! the figures next to their targets and next to this machine's Ed25519 verification
//! cost measured in the same run. `ledger-api` measures the credits ledger's signed
//! single-transfer calls through a real `molt-control-plane`'s HTTP API instead. See
//! `BENCHMARKS.md`.
#![forbid(unsafe_code)]

#[path = "../bench/crypto.rs"]
mod crypto;
#[path = "../bench/federation.rs"]
mod federation;
#[path = "../bench/harness.rs"]
mod harness;
#[path = "../bench/ledger_api.rs"]
mod ledger_api;
#[path = "../bench/offline.rs"]
mod offline;
#[path = "../bench/prepared.rs"]
mod prepared;
#[path = "../bench/relay.rs"]
mod relay;
#[path = "../bench/report.rs"]
mod report;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::federation::FederationArgs;
use crate::harness::Bench;
use crate::ledger_api::LedgerApiArgs;
use crate::offline::OfflineArgs;
use crate::relay::RelayArgs;
use crate::report::{Section, append_markdown, load_average, machine_description};

/// Load benchmark of the Molt edge: relay throughput, latency and CPU per message,
/// durable offline ingest and drain on reconnect; and the credits ledger's HTTP API.
#[derive(Debug, Parser)]
#[command(long_about = "Load benchmark of the Molt edge relay on loopback, and of the credits ledger's HTTP API \
(ledger-api).\n\nBuild the edge (or the control plane) with the same profile first:\n  cargo build --release -p \
molt-edge -p molt-tests\n  target/release/molt-bench all --markdown BENCHMARKS.md\n  cargo build --release -p \
molt-tests --bin molt-bench -p molt-control-plane --bin molt-control-plane\n  target/release/molt-bench ledger-api \
--clients 32,64,256")]
struct Cli {
    /// Append the figures as markdown to FILE.
    #[arg(long, global = true, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Worker threads of the bench's own runtime; 1 runs every client on one thread,
    /// which leaves the most CPU to the edge.
    #[arg(long, global = true, default_value_t = 1)]
    client_threads: usize,
    /// Before each timed phase, wait up to SECS for other processes to leave the CPUs
    /// (0: do not wait).
    #[arg(long, global = true, default_value_t = 120, value_name = "SECS")]
    wait_quiet: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ed25519 single and batched verification cost on this machine.
    Crypto,
    /// Live relay: throughput, latency and edge CPU per message (runs `crypto` first).
    Relay(RelayArgs),
    /// Offline recipients: durable ingest, then drain on reconnect (runs `crypto` first).
    Offline(OfflineArgs),
    /// A control plane and two linked edges: the relay run on one edge, then across the
    /// two, and revocation reaching several edges (runs `crypto` first).
    Federation(FederationArgs),
    /// The credits ledger through a real control plane's HTTP API: signed single-transfer
    /// calls by concurrent agents on SQLite and PostgreSQL, with latency, CPU per call and
    /// a check of the books afterwards (runs `crypto` first; needs molt-control-plane
    /// built beside molt-bench).
    LedgerApi(LedgerApiArgs),
    /// crypto, relay with 256 B and 1 KiB payloads, offline with 256 B; about two minutes.
    All,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = client_runtime(cli.client_threads)?;
    let machine = machine_description();
    let load = load_average();
    println!("molt-bench on {machine}; load average {load}; bench client on {} thread(s)", cli.client_threads.max(1));
    let reference = crypto::measure();
    let mut sections = vec![printed(crypto::section(&reference))];
    let bench = Bench { runtime, reference, quiet_patience: Duration::from_secs(cli.wait_quiet) };
    let title = match &cli.command {
        Command::Crypto => "crypto",
        Command::Relay(_) => "relay",
        Command::Offline(_) => "offline",
        Command::Federation(_) => "federation",
        Command::LedgerApi(_) => "ledger-api",
        Command::All => "all",
    };
    let mut failures = Vec::new();
    match &cli.command {
        Command::Crypto => {}
        Command::Relay(args) => sections.push(printed(relay::run(args, &bench)?)),
        Command::Offline(args) => sections.push(printed(offline::run(args, &bench)?)),
        Command::Federation(args) => sections.extend(federation::run(args, &bench)?.into_iter().map(printed)),
        Command::LedgerApi(args) => {
            // Printed as each phase ends.
            let outcome = ledger_api::run(args, &bench)?;
            sections.extend(outcome.sections);
            failures = outcome.failures;
        }
        Command::All => sections.extend(run_all(&bench)?),
    }
    if let Some(path) = &cli.markdown {
        let mut text = format!(
            "## molt-bench {title}\n\nMachine: {machine}; 1-minute load average {load} at start; bench client on {} \
             thread(s).\n\n",
            cli.client_threads.max(1)
        );
        for section in &sections {
            text.push_str(&section.markdown());
        }
        append_markdown(path, &text)?;
        println!("\nappended to {}", path.display());
    }
    anyhow::ensure!(failures.is_empty(), "{} failure(s):\n  {}", failures.len(), failures.join("\n  "));
    Ok(())
}

fn client_runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    };
    runtime.context("while starting the bench runtime")
}

fn printed(section: Section) -> Section {
    section.print();
    section
}

/// The standard set, then a summary of every figure that has a target.
fn run_all(bench: &Bench) -> anyhow::Result<Vec<Section>> {
    let relay_small = RelayArgs { pairs: 8, messages: 300_000, payload: 256, window: 32, outbound_queue: 4096 };
    let relay_large = RelayArgs { payload: 1024, messages: 200_000, ..relay_small.clone() };
    let offline = OfflineArgs { recipients: 8, messages: 300_000, payload: 256, window: 1024 };
    let mut sections = vec![
        printed(relay::run(&relay_small, bench)?),
        printed(relay::run(&relay_large, bench)?),
        printed(offline::run(&offline, bench)?),
    ];
    let mut summary = Section::new("summary: measured vs targets");
    summary.note(format!(
        "reference from this run: single Ed25519 verify {:.1} µs, batched {:.1} µs/signature",
        bench.reference.verify_us, bench.reference.batch_us
    ));
    for section in &sections {
        let scenario = section.title.split(':').next().unwrap_or_default().to_string();
        let payload = section.title.split(", ").next().and_then(|t| t.split(": ").nth(1)).unwrap_or_default();
        for (figure, measured, target, verdict) in section.targeted_rows() {
            summary.copy_targeted(format!("{scenario} {payload}: {figure}"), measured, target, verdict);
        }
    }
    sections.push(printed(summary));
    Ok(sections)
}

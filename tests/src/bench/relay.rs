//! `relay`: senders and recipients all connected to one edge; every message is forwarded
//! live, receipted by its recipient and the receipt passed back to its sender. Measures
//! delivered messages per second at the recipients, send-to-delivery latency, and the
//! edge process's CPU time per delivered message against one Ed25519 verification.

use std::sync::Arc;
use std::time::Duration;

use molt_protocol::cert::TrustAnchors;
use molt_tests::Network;
use tokio::sync::watch;

use crate::crypto::CryptoReference;
use crate::harness::{
    Bench, BenchEdge, Clock, CpuMark, CpuUse, Finished, RawSession, RecipientPlan, Recipients, SenderPlan, Senders,
    Workload, client_endpoint, collect, competition_note, edge_extra_toml, finish, sent_at_table,
};
use crate::report::{Section, Target, thousands};

/// Longest the timed phase may take before the bench gives up and reports what it has.
pub const PHASE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long recipients keep listening after the run, to count late duplicates.
pub const DUPLICATE_GRACE: Duration = Duration::from_millis(300);
/// Delivered messages per second the relay should reach with 256-byte payloads.
pub const TARGET_MESSAGES_PER_SECOND: f64 = 60_000.0;
/// Edge CPU per relayed message, in single Ed25519 verifications, at most.
pub const TARGET_CPU_IN_VERIFICATIONS: f64 = 2.0;

#[derive(Clone, Debug, clap::Args)]
pub struct RelayArgs {
    /// Sender/recipient pairs (each sender writes to its own recipient).
    #[arg(long, default_value_t = 8)]
    pub pairs: usize,
    /// Messages in total, spread evenly over the pairs.
    #[arg(long, default_value_t = 200_000)]
    pub messages: usize,
    /// Payload bytes per message (at least 8).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Messages each sender keeps unanswered (not yet accepted or rejected), at most. The
    /// latency measured is mostly queueing: about pairs × window / throughput.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// The edge's `limits.outbound_queue_depth_max`.
    #[arg(long, default_value_t = 4096)]
    pub outbound_queue: usize,
}

/// What the timed phase produced.
#[derive(Debug)]
pub struct Outcome {
    finished: Finished,
    /// From the start signal to the last delivery.
    delivery_time: Duration,
    /// From the start signal to the last receipt back at its sender.
    cpu: CpuUse,
    /// Some task timed out or failed: figures are partial.
    incomplete: bool,
}

pub fn run(args: &RelayArgs, bench: &Bench) -> anyhow::Result<Section> {
    let net = Network::new()?;
    let edge = BenchEdge::spawn(net.edge("edge", &edge_extra_toml(args.messages, args.outbound_queue))?)?;
    eprintln!("relay: signing {} messages and receipts…", thousands(args.messages as f64));
    let workload = Arc::new(Workload::build(&net, args.pairs, args.messages, args.payload)?);
    eprintln!("relay: signed in {:.1} s; running", workload.presign_time.as_secs_f64());
    bench.settle(&edge)?;
    let route = Route { anchors: net.anchors.clone(), sender_edge: &edge, recipient_edge: &edge };
    let outcome = bench.runtime.block_on(timed_phase(&route, workload.clone(), args, async { Ok(()) }))?;
    let title = format!("relay: {} B payload, {} pairs", args.payload, args.pairs);
    Ok(section(title, args, &bench.reference, &workload, &outcome))
}

/// Where a timed phase's senders and recipients connect. The CPU figures are the
/// recipients' edge's.
#[derive(Debug)]
pub struct Route<'a> {
    pub anchors: Arc<TrustAnchors>,
    pub sender_edge: &'a BenchEdge,
    pub recipient_edge: &'a BenchEdge,
}

/// Connects every session, waits for `ready`, then times the run.
pub async fn timed_phase(
    route: &Route<'_>,
    workload: Arc<Workload>,
    args: &RelayArgs,
    ready: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Outcome> {
    let edge = route.recipient_edge;
    let endpoint = client_endpoint()?;
    let clock = Clock::new();
    let sent_at = sent_at_table(workload.messages());
    let (start, start_signal) = watch::channel(false);
    let (stop, stop_signal) = watch::channel(false);

    let mut recipient_sessions = Vec::new();
    let mut recipient_plans = Vec::new();
    let mut sender_sessions = Vec::new();
    let mut sender_plans = Vec::new();
    for (pair, plan) in workload.pairs.iter().enumerate() {
        let session = RawSession::connect(&endpoint, &plan.recipient, route.anchors.clone(), edge.quic_addr()).await?;
        recipient_sessions.push(std::future::ready(Ok(session)));
        recipient_plans.push(RecipientPlan {
            workload: workload.clone(),
            pair,
            expected: plan.seqs.len() as u64,
            clock,
            sent_at: Some(sent_at.clone()),
            stop: stop_signal.clone(),
        });
        sender_sessions.push(
            RawSession::connect(&endpoint, &plan.sender, route.anchors.clone(), route.sender_edge.quic_addr()).await?,
        );
        sender_plans.push(SenderPlan {
            workload: workload.clone(),
            pair,
            window: args.window,
            clock,
            sent_at: sent_at.clone(),
            start: start_signal.clone(),
            stop: stop_signal.clone(),
        });
    }
    let mut recipients = Recipients::spawn(recipient_sessions, recipient_plans);
    let mut senders = Senders::spawn(sender_sessions, sender_plans);
    // Let the handshakes' tail (tickets, acks) settle before the edge's CPU is read.
    tokio::time::sleep(Duration::from_millis(200)).await;
    ready.await?;

    let before = CpuMark::take(edge)?;
    let started = clock.nanos();
    let _ = start.send(true);
    let deadline = tokio::time::Instant::now() + PHASE_TIMEOUT;
    let complete = collect(std::mem::take(&mut recipients.complete), deadline).await;
    let last_delivery = complete.iter().flatten().copied().max().unwrap_or(started);
    let answered = collect(std::mem::take(&mut senders.answered), deadline).await;
    let receipted = collect(std::mem::take(&mut senders.receipted), deadline).await;
    let after = CpuMark::take(edge)?;
    let incomplete = complete.iter().any(Option::is_none)
        || answered.iter().any(Option::is_none)
        || receipted.iter().any(Option::is_none);

    tokio::time::sleep(DUPLICATE_GRACE).await;
    let finished = finish(&endpoint, &stop, senders, recipients).await;
    Ok(Outcome {
        finished,
        delivery_time: Duration::from_nanos(last_delivery.saturating_sub(started)),
        cpu: after.since(&before),
        incomplete,
    })
}

pub fn section(
    title: String,
    args: &RelayArgs,
    reference: &CryptoReference,
    workload: &Workload,
    outcome: &Outcome,
) -> Section {
    let finished = &outcome.finished;
    let delivered = finished.unique();
    let answers = finished.answers();
    let rate = delivered as f64 / outcome.delivery_time.as_secs_f64();
    let mut section = Section::new(title);
    section.note(format!(
        "{} messages ({} per pair), window {} unanswered per sender, edge outbound queue {}; signed in advance in {:.1} s",
        thousands(workload.messages() as f64),
        thousands((workload.messages() / args.pairs) as f64),
        args.window,
        args.outbound_queue,
        workload.presign_time.as_secs_f64()
    ));
    section.note(format!(
        "reference from this run: single verify {:.1} µs, batched {:.1} µs/signature",
        reference.verify_us, reference.batch_us
    ));
    if outcome.incomplete {
        section.note(format!("INCOMPLETE (a task failed or {PHASE_TIMEOUT:?} passed): figures are partial"));
    }
    section.notes_extend(competition_note(&outcome.cpu));
    for error in finished.errors.iter().take(5) {
        section.note(format!("error: {error}"));
    }

    if args.payload <= 256 {
        section.target(
            "delivered msgs/s (end to end)",
            rate,
            thousands(rate),
            Target::AtLeast(TARGET_MESSAGES_PER_SECOND),
            format!("≥ {}", thousands(TARGET_MESSAGES_PER_SECOND)),
        );
    } else {
        section.info("delivered msgs/s (end to end)", thousands(rate));
    }
    section.info("payload throughput", format!("{:.1} MiB/s", rate * args.payload as f64 / (1024.0 * 1024.0)));
    let latency = finished.latency_us();
    section.info(
        "latency p50 / p99 / p99.9 (send → delivery)",
        format!(
            "{} / {} / {} ms",
            millis(latency.value_at_quantile(0.5)),
            millis(latency.value_at_quantile(0.99)),
            millis(latency.value_at_quantile(0.999))
        ),
    );
    let edge_us = outcome.cpu.edge_us_per(delivered);
    let ratio = edge_us / reference.verify_us;
    section.target(
        "edge CPU per delivered message",
        ratio,
        format!("{edge_us:.1} µs = {ratio:.2}× verify"),
        Target::AtMost(TARGET_CPU_IN_VERIFICATIONS),
        format!(
            "≤ {TARGET_CPU_IN_VERIFICATIONS}× verify ({:.1} µs)",
            TARGET_CPU_IN_VERIFICATIONS * reference.verify_us
        ),
    );
    section.info(
        "  Ed25519 floor (envelope in a 256-batch + single receipt)",
        format!(
            "{:.1} µs = {:.2}× verify",
            reference.relay_floor_us(),
            reference.relay_floor_us() / reference.verify_us
        ),
    );
    section.info(
        "CPU busy: edge / bench client / other processes",
        format!(
            "{:.2} / {:.2} / {:.2} cores",
            outcome.cpu.edge_cores(),
            outcome.cpu.bench_cores(),
            outcome.cpu.other_cores()
        ),
    );
    section.info("bench client CPU per message", format!("{:.1} µs", outcome.cpu.bench_us_per(delivered)));
    section.info(
        "delivered / sent",
        format!("{} / {}", thousands(delivered as f64), thousands(workload.messages() as f64)),
    );
    section.info(
        "answers: forwarded / stored (fallback) / rejected",
        format!(
            "{} / {} / {}{}",
            thousands(answers.forwarded as f64),
            thousands(answers.stored as f64),
            thousands(answers.rejected as f64),
            reject_detail(&answers.reject_codes)
        ),
    );
    section.info(
        "duplicates / missing / foreign; receipts back at senders",
        format!(
            "{} / {} / {}; {}",
            finished.duplicates(),
            finished.missing(),
            finished.foreign(),
            thousands(finished.receipts() as f64)
        ),
    );
    section
}

pub fn millis(micros: u64) -> String {
    format!("{:.2}", micros as f64 / 1000.0)
}

pub fn reject_detail(codes: &std::collections::BTreeMap<String, u64>) -> String {
    if codes.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = codes.iter().map(|(code, count)| format!("{code} {count}")).collect();
    format!(" ({})", parts.join(", "))
}

//! `offline`: recipients are away, so the edge stores every message durably (its answer
//! `Accepted{Stored}` comes only after the group commit's fsync): durable ingest per
//! second. Then the recipients connect and the edge drains their backlogs, each delivery
//! receipted and deleted: drain per second, with every stored message checked to arrive
//! exactly once.

use std::sync::Arc;
use std::time::Duration;

use molt_tests::Network;
use tokio::sync::watch;

use crate::crypto::CryptoReference;
use crate::harness::{
    Answers, Bench, BenchEdge, Clock, CpuMark, CpuUse, Finished, RawSession, RecipientPlan, Recipients, SenderPlan,
    Senders, Workload, client_endpoint, collect, competition_note, edge_extra_toml, finish, sent_at_table,
};
use crate::relay::{DUPLICATE_GRACE, PHASE_TIMEOUT, reject_detail};
use crate::report::{Section, Target, thousands};

/// Durable ingest the edge should reach, messages per second.
pub const TARGET_INGEST_PER_SECOND: f64 = 120_000.0;
/// Drain on reconnect the edge should reach, messages per second.
pub const TARGET_DRAIN_PER_SECOND: f64 = 250_000.0;
/// How long to wait for the buffer gauge (refreshed once a second) to show the drain.
const BUFFER_SETTLE_TIMEOUT: Duration = Duration::from_secs(3);
const BUFFER_MESSAGES_METRIC: &str = "molt_edge_buffer_messages";

#[derive(Clone, Debug, clap::Args)]
pub struct OfflineArgs {
    /// Offline recipients, each with its own sender.
    #[arg(long, default_value_t = 8)]
    pub recipients: usize,
    /// Messages in total, spread evenly over the senders.
    #[arg(long, default_value_t = 200_000)]
    pub messages: usize,
    /// Payload bytes per message (at least 8).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Messages each sender keeps unanswered (not yet stored or rejected), at most.
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
}

#[derive(Debug)]
struct Outcome {
    finished: Finished,
    stored: u64,
    ingest_time: Duration,
    ingest_cpu: CpuUse,
    drain_time: Duration,
    drain_cpu: CpuUse,
    buffer_after: Option<f64>,
    incomplete: bool,
}

pub fn run(args: &OfflineArgs, bench: &Bench) -> anyhow::Result<Section> {
    let net = Network::new()?;
    // The outbound queue only matters for live forwarding; keep the edge's default.
    let edge = BenchEdge::spawn(net.edge("edge", &edge_extra_toml(args.messages, 1024))?)?;
    eprintln!("offline: signing {} messages and receipts…", thousands(args.messages as f64));
    let workload = Arc::new(Workload::build(&net, args.recipients, args.messages, args.payload)?);
    eprintln!("offline: signed in {:.1} s; running", workload.presign_time.as_secs_f64());
    bench.settle(&edge)?;
    let outcome = bench.runtime.block_on(phases(&net, &edge, workload.clone(), args))?;
    Ok(section(args, &bench.reference, &workload, &outcome))
}

async fn phases(
    net: &Network,
    edge: &BenchEdge,
    workload: Arc<Workload>,
    args: &OfflineArgs,
) -> anyhow::Result<Outcome> {
    let endpoint = client_endpoint()?;
    let clock = Clock::new();
    let sent_at = sent_at_table(workload.messages());
    let (start, start_signal) = watch::channel(false);
    let (stop, stop_signal) = watch::channel(false);

    let mut sessions = Vec::new();
    let mut plans = Vec::new();
    for (pair, plan) in workload.pairs.iter().enumerate() {
        sessions.push(RawSession::connect(&endpoint, &plan.sender, net.anchors.clone(), edge.quic_addr()).await?);
        plans.push(SenderPlan {
            workload: workload.clone(),
            pair,
            window: args.window,
            clock,
            sent_at: sent_at.clone(),
            start: start_signal.clone(),
            stop: stop_signal.clone(),
        });
    }
    let mut senders = Senders::spawn(sessions, plans);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Ingest: every answer is `Stored` after an fsync.
    let ingest_before = CpuMark::take(edge)?;
    let started = clock.nanos();
    let _ = start.send(true);
    let deadline = tokio::time::Instant::now() + PHASE_TIMEOUT;
    let answered = collect(std::mem::take(&mut senders.answered), deadline).await;
    let ingest_after = CpuMark::take(edge)?;
    let ingest_end = answered.iter().flatten().map(|a| a.last_answer_nanos).max().unwrap_or(started);
    let stored: Vec<u64> = answered.iter().map(|a| a.as_ref().map_or(0, |a: &Answers| a.stored)).collect();

    // Drain: the recipients connect now and take their backlogs.
    let drain_started = clock.nanos();
    let mut connecting = Vec::new();
    let mut plans = Vec::new();
    for (pair, expected) in stored.iter().enumerate() {
        let (endpoint, anchors, shared, addr) =
            (endpoint.clone(), net.anchors.clone(), workload.clone(), edge.quic_addr());
        connecting
            .push(async move { RawSession::connect(&endpoint, &shared.pairs[pair].recipient, anchors, addr).await });
        plans.push(RecipientPlan {
            workload: workload.clone(),
            pair,
            expected: *expected,
            clock,
            sent_at: None,
            stop: stop_signal.clone(),
        });
    }
    let mut recipients = Recipients::spawn(connecting, plans);
    let deadline = tokio::time::Instant::now() + PHASE_TIMEOUT;
    let complete = collect(std::mem::take(&mut recipients.complete), deadline).await;
    let last_delivery = complete.iter().flatten().copied().max().unwrap_or(drain_started);
    let receipted = collect(std::mem::take(&mut senders.receipted), deadline).await;
    let drain_after = CpuMark::take(edge)?;
    let incomplete = answered.iter().any(Option::is_none)
        || complete.iter().any(Option::is_none)
        || receipted.iter().any(Option::is_none);

    tokio::time::sleep(DUPLICATE_GRACE).await;
    let finished = finish(&endpoint, &stop, senders, recipients).await;
    Ok(Outcome {
        finished,
        stored: stored.iter().sum(),
        ingest_time: Duration::from_nanos(ingest_end.saturating_sub(started)),
        ingest_cpu: ingest_after.since(&ingest_before),
        drain_time: Duration::from_nanos(last_delivery.saturating_sub(drain_started)),
        drain_cpu: drain_after.since(&ingest_after),
        buffer_after: settled_buffer(edge).await,
        incomplete,
    })
}

/// The buffer gauge once it reads 0, or its last reading.
async fn settled_buffer(edge: &BenchEdge) -> Option<f64> {
    let deadline = tokio::time::Instant::now() + BUFFER_SETTLE_TIMEOUT;
    loop {
        let value = edge.metric(BUFFER_MESSAGES_METRIC).ok();
        if value == Some(0.0) || tokio::time::Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn section(args: &OfflineArgs, reference: &CryptoReference, workload: &Workload, outcome: &Outcome) -> Section {
    let finished = &outcome.finished;
    let answers = finished.answers();
    let delivered = finished.unique();
    let ingest_rate = outcome.stored as f64 / outcome.ingest_time.as_secs_f64();
    let drain_rate = delivered as f64 / outcome.drain_time.as_secs_f64();
    let mut section = Section::new(format!(
        "offline: {} B payload, {} offline recipients (durable ingest, then drain on reconnect)",
        args.payload, args.recipients
    ));
    section.note(format!(
        "{} messages ({} per sender), window {} unanswered per sender; signed in advance in {:.1} s",
        thousands(workload.messages() as f64),
        thousands((workload.messages() / args.recipients) as f64),
        args.window,
        workload.presign_time.as_secs_f64()
    ));
    section.note(format!(
        "reference from this run: single verify {:.1} µs, batched {:.1} µs/signature",
        reference.verify_us, reference.batch_us
    ));
    if outcome.incomplete {
        section.note(format!("INCOMPLETE (a task failed or {PHASE_TIMEOUT:?} passed): figures are partial"));
    }
    section.notes_extend(competition_note(&outcome.ingest_cpu).map(|note| format!("ingest: {note}")));
    section.notes_extend(competition_note(&outcome.drain_cpu).map(|note| format!("drain: {note}")));
    for error in finished.errors.iter().take(5) {
        section.note(format!("error: {error}"));
    }
    section.target(
        "durable ingest msgs/s (answered Stored after fsync)",
        ingest_rate,
        thousands(ingest_rate),
        Target::AtLeast(TARGET_INGEST_PER_SECOND),
        format!("≥ {}", thousands(TARGET_INGEST_PER_SECOND)),
    );
    section.info(
        "  edge CPU per stored message",
        format!(
            "{:.1} µs = {:.2}× verify",
            outcome.ingest_cpu.edge_us_per(outcome.stored),
            outcome.ingest_cpu.edge_us_per(outcome.stored) / reference.verify_us
        ),
    );
    section.target(
        "drain on reconnect msgs/s (delivered and receipted)",
        drain_rate,
        thousands(drain_rate),
        Target::AtLeast(TARGET_DRAIN_PER_SECOND),
        format!("≥ {}", thousands(TARGET_DRAIN_PER_SECOND)),
    );
    section.info(
        "  edge CPU per drained message",
        format!(
            "{:.1} µs = {:.2}× verify",
            outcome.drain_cpu.edge_us_per(delivered),
            outcome.drain_cpu.edge_us_per(delivered) / reference.verify_us
        ),
    );
    section.info(
        "CPU busy, ingest: edge / bench client / other processes",
        format!(
            "{:.2} / {:.2} / {:.2} cores",
            outcome.ingest_cpu.edge_cores(),
            outcome.ingest_cpu.bench_cores(),
            outcome.ingest_cpu.other_cores()
        ),
    );
    section.info(
        "CPU busy, drain: edge / bench client / other processes",
        format!(
            "{:.2} / {:.2} / {:.2} cores",
            outcome.drain_cpu.edge_cores(),
            outcome.drain_cpu.bench_cores(),
            outcome.drain_cpu.other_cores()
        ),
    );
    section.info(
        "sent / stored / forwarded / rejected",
        format!(
            "{} / {} / {} / {}{}",
            thousands(workload.messages() as f64),
            thousands(outcome.stored as f64),
            thousands(answers.forwarded as f64),
            thousands(answers.rejected as f64),
            reject_detail(&answers.reject_codes)
        ),
    );
    let exactly_once = delivered == outcome.stored && finished.duplicates() == 0 && finished.foreign() == 0;
    section.info(
        "delivered distinct / duplicates / foreign",
        format!("{} / {} / {}", thousands(delivered as f64), finished.duplicates(), finished.foreign()),
    );
    section.info(
        "every stored message delivered exactly once",
        if exactly_once {
            "yes".to_string()
        } else {
            format!("NO ({} not delivered)", outcome.stored.saturating_sub(delivered))
        },
    );
    section.info("receipts back at senders", thousands(finished.receipts() as f64));
    section.info(
        "edge buffer after drain",
        outcome.buffer_after.map_or("unknown".into(), |messages| format!("{} messages", thousands(messages))),
    );
    section
}

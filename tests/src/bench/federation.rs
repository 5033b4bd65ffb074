//! `federation`: a control plane (gRPC, SQLite) and two edges enrolled with it and linked
//! over QUIC. The same relay workload runs twice in one run: senders and recipients on
//! one edge, then senders on the west edge and recipients on the east edge (agent → edge
//! 1 → edge 2 → agent, every message stored at edge 2 before its answer). Then the time
//! from a revocation at the control plane to the closing of one agent's connections at
//! every edge of a larger set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use molt_tests::cluster::{Cluster, EnrolledEdge};

use crate::harness::{Bench, BenchEdge, Workload, edge_extra_toml};
use crate::relay::{self, RelayArgs, Route};
use crate::report::{Section, thousands};

/// Control-link settings: presence reported within a quarter second.
const LINK: &str = "presence_interval_ms = 1000\nreconnect_backoff_min_ms = 100\nreconnect_backoff_max_ms = 1000";
/// Longest wait for the control plane to see every recipient at its edge.
const PRESENCE_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for a revocation to close a connection.
const REVOCATION_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, clap::Args)]
pub struct FederationArgs {
    /// Sender/recipient pairs (each sender writes to its own recipient).
    #[arg(long, default_value_t = 8)]
    pub pairs: usize,
    /// Messages per phase, spread evenly over the pairs.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Payload bytes per message (at least 8).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Messages each sender keeps unanswered, at most.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Edges an agent is connected to when its certificate is revoked (2 to 5: an agent
    /// may hold 5 connections).
    #[arg(long, default_value_t = 4)]
    pub revocation_edges: usize,
}

pub fn run(args: &FederationArgs, bench: &Bench) -> anyhow::Result<Vec<Section>> {
    anyhow::ensure!((2..=5).contains(&args.revocation_edges), "--revocation-edges must be 2 to 5");
    let cluster = Cluster::start()?;
    let extra = edge_extra_toml(args.messages, 4096);
    let federation = format!("presence_fresh_ms = 2000\n{extra}");
    let west = cluster.enroll("west", "eu-west", &[], LINK, Some(&federation))?;
    let east = cluster.enroll("east", "us-east", &[], LINK, Some(&federation))?;
    let west_edge = BenchEdge::spawn(west.setup.clone())?;
    let east_edge = BenchEdge::spawn(east.setup.clone())?;
    let relay_args = RelayArgs {
        pairs: args.pairs,
        messages: args.messages,
        payload: args.payload,
        window: args.window,
        outbound_queue: 4096,
    };
    let mut sections = Vec::new();
    for (name, recipient_edge, recipient_setup) in
        [("one edge", &west_edge, &west), ("across two edges", &east_edge, &east)]
    {
        eprintln!("federation ({name}): certifying agents and signing {} messages…", thousands(args.messages as f64));
        let prefix = if name == "one edge" { "local" } else { "cross" };
        let workload = Arc::new(Workload::build_with(
            &mut |agent| Ok(cluster.agent(&format!("{prefix}-{agent}"))?.0),
            args.pairs,
            args.messages,
            args.payload,
        )?);
        let route = Route { anchors: west.anchors.clone(), sender_edge: &west_edge, recipient_edge };
        bench.settle(recipient_edge)?;
        // The control plane must see the recipients at their edge before the senders
        // start, or the first messages would wait for a hand-off.
        let presence = wait_for_presence(&cluster, &workload, recipient_setup);
        let outcome = bench.runtime.block_on(relay::timed_phase(&route, workload.clone(), &relay_args, presence))?;
        let title = format!("federation: {name}, {} B payload, {} pairs", args.payload, args.pairs);
        let mut section = relay::section(title, &relay_args, &bench.reference, &workload, &outcome);
        section.note("the CPU figures are the recipients' edge's; the relay targets are single-edge targets");
        sections.push(section);
    }
    drop((west_edge, east_edge));
    sections.push(revocation(&cluster, args.revocation_edges, bench)?);
    Ok(sections)
}

/// Polls until every recipient of `workload` is present at `edge`.
async fn wait_for_presence(cluster: &Cluster, workload: &Workload, edge: &EnrolledEdge) -> anyhow::Result<()> {
    let deadline = Instant::now() + PRESENCE_WAIT;
    let ids: Vec<String> = workload.pairs.iter().map(|plan| format!("'{}'", plan.recipient.id())).collect();
    let query = format!(
        "SELECT COUNT(*) FROM edge_presence WHERE edge_id = '{}' AND agent_id IN ({})",
        edge.edge_id,
        ids.join(",")
    );
    loop {
        if cluster.cp.sql(&query).unwrap_or_default().trim() == ids.len().to_string() {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the recipients were not present at their edge in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One agent connected to `count` edges; its certificate is revoked; time to each close.
fn revocation(cluster: &Cluster, count: usize, bench: &Bench) -> anyhow::Result<Section> {
    let link = "presence_interval_ms = 1000";
    let mut edges = Vec::new();
    for index in 0..count {
        let enrolled = cluster.enroll(&format!("revocation-{index}"), "eu-west", &[], link, None)?;
        edges.push((BenchEdge::spawn(enrolled.setup.clone())?, enrolled));
    }
    let (agent, serial) = cluster.agent("revoked")?;
    let times = bench.runtime.block_on(async {
        let mut sessions = Vec::new();
        for (edge, enrolled) in &edges {
            let session = molt_tests::RawSession::connect(&agent.identity, enrolled.anchors.clone(), edge.quic_addr())
                .await
                .context("while connecting the agent to every edge")?;
            sessions.push(session);
        }
        let revoked_at = Instant::now();
        cluster.revoke(&serial)?;
        let mut times = Vec::new();
        for session in &sessions {
            tokio::time::timeout(REVOCATION_WAIT, session.connection.closed())
                .await
                .context("a revoked connection stayed open")?;
            times.push(revoked_at.elapsed());
        }
        anyhow::Ok(times)
    })?;
    let mut section = Section::new(format!("federation: revocation reaching {count} edges"));
    section.note(
        "one agent holds a connection to each edge; the clock starts at the revoke request to the control plane's \
         HTTP API and stops when the edge closes the connection (the control plane polls its database every \
         500 ms)",
    );
    let slowest = times.iter().max().copied().unwrap_or_default();
    section.target(
        "revoke request → last edge closed the connection",
        slowest.as_secs_f64(),
        format!("{} ms", slowest.as_millis()),
        crate::report::Target::AtMost(2.0),
        "≤ 2 s",
    );
    let each: Vec<String> = times.iter().map(|time| time.as_millis().to_string()).collect();
    section.info("each edge, in connection order", format!("{} ms", each.join(" / ")));
    Ok(section)
}

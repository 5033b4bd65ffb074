//! The load harness: a real `molt-edge` process whose CPU time we can read, a workload of
//! envelopes and receipts signed before any timing starts, and a raw QUIC session per
//! agent (no SDK: no sealing, no signing or verifying while timed) that writes pre-encoded
//! frames and counts what comes back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use molt_protocol::cert::{ExpectedRole, TrustAnchors};
use molt_protocol::envelope::{self, EnvelopeHeader, EnvelopeView, Ttl};
use molt_protocol::frame::{Disposition, Frame, FrameReader};
use molt_protocol::receipt::{RECEIPT_LEN, Receipt};
use molt_protocol::tls::{self, SharedRevocations};
use molt_protocol::{MessageId, UnixMillis};
use molt_tests::{EdgeSetup, Network, TestAgent, http_get};
use rand::RngCore as _;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::crypto::CryptoReference;
use crate::report::{QUIET_CORES_MAX, process_cpu_time, system_busy_time, wait_for_quiet};

/// How long the edge may take to answer its health check.
pub const EDGE_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes asked of a stream per read.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;
/// Encoded size of a `Frame::Receipt`: length prefix, type, receipt.
pub const RECEIPT_FRAME_LEN: usize = 4 + 1 + RECEIPT_LEN;
/// Client QUIC flow-control windows, as the SDK sets them.
const STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Lifetime of the benchmark's envelopes.
const MESSAGE_TTL_SECS: u32 = 3600;
/// Bytes at the start of each payload carrying the message's sequence number.
pub const SEQUENCE_LEN: usize = 8;

/// Edge configuration appended to the harness's: nothing rate limited, quotas far above
/// the run's message count, little logging.
pub fn edge_extra_toml(messages: usize, outbound_queue_depth: usize) -> String {
    let messages = messages.max(1);
    format!(
        "[limits]\nmessages_per_minute = 4000000000\nmessages_per_hour = 4000000000\n\
         bytes_per_minute = 1099511627776\nconnections_per_ip = 10000\n\
         outbound_queue_depth_max = {outbound_queue_depth}\nreplay_window_capacity = {replay}\n\n\
         [buffer]\nqueue_depth_per_agent_max = {quota}\nmessages_max = {quota}\nbytes_max = 68719476736\n\n\
         [log]\nlevel = \"warn\"\n",
        replay = (messages * 2).max(1 << 20),
        quota = (messages * 2).max(10_000),
    )
}

/// A `molt-edge` process started from the binary next to this one; killed when dropped.
/// (`molt_tests::EdgeSetup::spawn` looks one directory too high for a binary target and
/// does not expose the pid, which the CPU figures need.)
#[derive(Debug)]
pub struct BenchEdge {
    child: Child,
    pub setup: EdgeSetup,
}

impl BenchEdge {
    pub fn spawn(setup: EdgeSetup) -> anyhow::Result<BenchEdge> {
        let exe = std::env::current_exe().context("while locating molt-bench")?;
        let binary = exe.with_file_name("molt-edge");
        if !binary.exists() {
            bail!(
                "{} not found: build it with the same profile, e.g. `cargo build --release -p molt-edge -p molt-tests`",
                binary.display()
            );
        }
        let log = std::fs::File::create(setup.config.with_extension("log"))?;
        let child = Command::new(&binary)
            .arg("--config")
            .arg(&setup.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("while starting {}", binary.display()))?;
        let mut edge = BenchEdge { child, setup };
        edge.wait_healthy()?;
        Ok(edge)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn quic_addr(&self) -> SocketAddr {
        self.setup.quic_addr
    }

    pub fn log_path(&self) -> PathBuf {
        self.setup.config.with_extension("log")
    }

    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        process_cpu_time(self.pid())
    }

    /// The value of the metric sample named exactly `name` (no labels).
    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let (status, body) = http_get(self.setup.admin_addr, "/metrics")?;
        anyhow::ensure!(status == 200, "metrics answered {status}");
        let value = body
            .lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .with_context(|| format!("no metric {name}"))?;
        Ok(value.trim().parse()?)
    }

    fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + EDGE_START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                bail!("molt-edge exited with {status} during start:\n{log}");
            }
            if http_get(self.setup.admin_addr, "/healthz").is_ok_and(|(status, _)| status == 200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("molt-edge did not become healthy within {EDGE_START_TIMEOUT:?}")
    }
}

impl Drop for BenchEdge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every scenario runs with.
#[derive(Debug)]
pub struct Bench {
    /// The bench's own runtime (the clients).
    pub runtime: tokio::runtime::Runtime,
    /// Ed25519 costs measured at the start of this run.
    pub reference: CryptoReference,
    /// How long to wait for other processes to leave the CPUs before a timed phase.
    pub quiet_patience: Duration,
}

impl Bench {
    /// Waits for a quiet machine before a timed phase (see [`wait_for_quiet`]).
    pub fn settle(&self, edge: &BenchEdge) -> anyhow::Result<()> {
        if self.quiet_patience.is_zero() {
            return Ok(());
        }
        let others = wait_for_quiet(edge.pid(), self.quiet_patience)?;
        if others >= QUIET_CORES_MAX {
            eprintln!("  gave up waiting: other processes use {others:.2} cores");
        }
        Ok(())
    }
}

/// A note for figures taken while other processes competed for the cores.
pub fn competition_note(cpu: &CpuUse) -> Option<String> {
    let others = cpu.other_cores();
    (others >= 2.0 * QUIET_CORES_MAX).then(|| {
        format!("WARNING: other processes used {others:.2} cores during this phase; the figures understate the edge")
    })
}

/// Nanoseconds since the bench started; 0 means "not yet".
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock { origin: Instant::now() }
    }

    pub fn nanos(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1)
    }
}

/// When each message (by sequence number) was written to its sender's stream.
pub type SentAt = Vec<AtomicU64>;

/// CPU used by the edge and by this process over a phase.
#[derive(Clone, Copy, Debug)]
pub struct CpuUse {
    pub edge: Duration,
    pub bench: Duration,
    /// Every other process on the machine: competition for the same cores.
    pub other: Duration,
    pub wall: Duration,
}

impl CpuUse {
    /// Microseconds of edge CPU per message.
    pub fn edge_us_per(&self, messages: u64) -> f64 {
        self.edge.as_secs_f64() * 1e6 / messages as f64
    }

    pub fn bench_us_per(&self, messages: u64) -> f64 {
        self.bench.as_secs_f64() * 1e6 / messages as f64
    }

    /// Average cores busy.
    pub fn edge_cores(&self) -> f64 {
        self.edge.as_secs_f64() / self.wall.as_secs_f64()
    }

    pub fn bench_cores(&self) -> f64 {
        self.bench.as_secs_f64() / self.wall.as_secs_f64()
    }

    pub fn other_cores(&self) -> f64 {
        self.other.as_secs_f64() / self.wall.as_secs_f64()
    }
}

/// A CPU-time snapshot of the edge and of this process.
#[derive(Clone, Copy, Debug)]
pub struct CpuMark {
    edge: Duration,
    bench: Duration,
    system: Duration,
    at: Instant,
}

impl CpuMark {
    pub fn take(edge: &BenchEdge) -> anyhow::Result<CpuMark> {
        Ok(CpuMark {
            edge: edge.cpu_time()?,
            bench: process_cpu_time(std::process::id())?,
            system: system_busy_time()?,
            at: Instant::now(),
        })
    }

    pub fn since(&self, earlier: &CpuMark) -> CpuUse {
        let edge = self.edge.saturating_sub(earlier.edge);
        let bench = self.bench.saturating_sub(earlier.bench);
        let system = self.system.saturating_sub(earlier.system);
        CpuUse { edge, bench, other: system.saturating_sub(edge + bench), wall: self.at.duration_since(earlier.at) }
    }
}

/// One sender and its recipient, and the sequence numbers of the messages between them.
#[derive(Debug)]
pub struct PairPlan {
    pub sender: TestAgent,
    pub recipient: TestAgent,
    pub seqs: Range<usize>,
}

/// Every message of a run, signed and framed before timing starts, with the receipt its
/// recipient will answer (also signed in advance, so recipients spend no CPU on crypto).
#[derive(Debug)]
pub struct Workload {
    pub pairs: Vec<PairPlan>,
    /// `Frame::Send` of message `seq` at `seq * envelope_stride`.
    envelope_frames: Vec<u8>,
    pub envelope_stride: usize,
    /// `Frame::Receipt` for message `seq` at `seq * RECEIPT_FRAME_LEN`.
    receipt_frames: Vec<u8>,
    message_ids: Vec<MessageId>,
    pub presign_time: Duration,
}

impl Workload {
    /// Creates `pairs` sender/recipient agents and signs `messages` envelopes of
    /// `payload_bytes` spread evenly over the pairs, on every core.
    pub fn build(net: &Network, pairs: usize, messages: usize, payload_bytes: usize) -> anyhow::Result<Workload> {
        Workload::build_with(&mut |name| net.agent(name), pairs, messages, payload_bytes)
    }

    /// As [`Workload::build`], with agents made by `make_agent` (given a name).
    pub fn build_with(
        make_agent: &mut dyn FnMut(&str) -> anyhow::Result<TestAgent>,
        pairs: usize,
        messages: usize,
        payload_bytes: usize,
    ) -> anyhow::Result<Workload> {
        anyhow::ensure!(pairs > 0 && messages >= pairs, "need at least one message per pair");
        anyhow::ensure!(payload_bytes >= SEQUENCE_LEN, "payload must hold the {SEQUENCE_LEN}-byte sequence number");
        let mut plans = Vec::with_capacity(pairs);
        let mut start = 0;
        for index in 0..pairs {
            let count = messages / pairs + usize::from(index < messages % pairs);
            plans.push(PairPlan {
                sender: make_agent(&format!("sender-{index}"))?,
                recipient: make_agent(&format!("recipient-{index}"))?,
                seqs: start..start + count,
            });
            start += count;
        }
        let started = Instant::now();
        let envelope_stride = envelope_frame(&plans[0], 0, payload_bytes, UnixMillis::now_from_system())?.0.len();
        let mut envelope_frames = vec![0u8; messages * envelope_stride];
        let mut receipt_frames = vec![0u8; messages * RECEIPT_FRAME_LEN];
        let mut message_ids = vec![MessageId::from_bytes([0; 16]); messages];
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = messages.div_ceil(threads);
        std::thread::scope(|scope| -> anyhow::Result<()> {
            let workers: Vec<_> = envelope_frames
                .chunks_mut(chunk * envelope_stride)
                .zip(receipt_frames.chunks_mut(chunk * RECEIPT_FRAME_LEN))
                .zip(message_ids.chunks_mut(chunk))
                .enumerate()
                .map(|(index, ((envelopes, receipts), ids))| {
                    let plans = &plans;
                    scope.spawn(move || {
                        sign_range(plans, index * chunk, envelopes, envelope_stride, receipts, ids, payload_bytes)
                    })
                })
                .collect();
            for worker in workers {
                worker.join().map_err(|_| anyhow::anyhow!("a signing thread panicked"))??;
            }
            Ok(())
        })?;
        Ok(Workload {
            pairs: plans,
            envelope_frames,
            envelope_stride,
            receipt_frames,
            message_ids,
            presign_time: started.elapsed(),
        })
    }

    pub fn messages(&self) -> usize {
        self.message_ids.len()
    }

    /// The encoded `Send` frames of consecutive messages.
    pub fn envelopes(&self, seqs: Range<usize>) -> &[u8] {
        &self.envelope_frames[seqs.start * self.envelope_stride..seqs.end * self.envelope_stride]
    }

    pub fn receipt(&self, seq: usize) -> &[u8] {
        &self.receipt_frames[seq * RECEIPT_FRAME_LEN..(seq + 1) * RECEIPT_FRAME_LEN]
    }

    pub fn message_id(&self, seq: usize) -> Option<MessageId> {
        self.message_ids.get(seq).copied()
    }
}

/// Signs messages `first..first + ids.len()` into the given slices.
fn sign_range(
    plans: &[PairPlan],
    first: usize,
    envelopes: &mut [u8],
    envelope_stride: usize,
    receipts: &mut [u8],
    ids: &mut [MessageId],
    payload_bytes: usize,
) -> anyhow::Result<()> {
    let now = UnixMillis::now_from_system();
    for (offset, id) in ids.iter_mut().enumerate() {
        let seq = first + offset;
        let pair = &plans[plans.partition_point(|plan| plan.seqs.end <= seq)];
        let (frame, message_id) = envelope_frame(pair, seq, payload_bytes, now)?;
        anyhow::ensure!(frame.len() == envelope_stride, "envelope frames differ in size");
        envelopes[offset * envelope_stride..(offset + 1) * envelope_stride].copy_from_slice(&frame);
        let receipt =
            Receipt::sign(message_id, pair.recipient.id(), pair.sender.id(), now, &pair.recipient.identity.signing_key)
                .context("while signing a receipt")?;
        let frame = Frame::Receipt(receipt.encode()).encode();
        receipts[offset * RECEIPT_FRAME_LEN..(offset + 1) * RECEIPT_FRAME_LEN].copy_from_slice(&frame);
        *id = message_id;
    }
    Ok(())
}

/// A `Frame::Send` whose random payload starts with the big-endian sequence number.
fn envelope_frame(
    pair: &PairPlan,
    seq: usize,
    payload_bytes: usize,
    now: UnixMillis,
) -> anyhow::Result<(Vec<u8>, MessageId)> {
    let mut rng = rand::thread_rng();
    let mut payload = vec![0u8; payload_bytes];
    rng.fill_bytes(&mut payload[SEQUENCE_LEN..]);
    payload[..SEQUENCE_LEN].copy_from_slice(&(seq as u64).to_be_bytes());
    let header = EnvelopeHeader {
        message_id: MessageId::random(&mut rng),
        sender: pair.sender.id(),
        recipient: pair.recipient.id(),
        timestamp: now,
        ttl: Ttl::from_secs(MESSAGE_TTL_SECS)?,
    };
    let bytes = envelope::sign_raw(&header, &payload, &pair.sender.identity.signing_key)?;
    Ok((Frame::Send(bytes).encode(), header.message_id))
}

/// One agent's connection and session stream, past the ping/pong handshake.
#[derive(Debug)]
pub struct RawSession {
    pub connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    reader: FrameReader,
    /// Frames that arrived before the pong.
    early: Vec<Frame>,
}

impl RawSession {
    /// Connects as `agent`, opens the session stream and waits for the pong: only then has
    /// the edge registered the session.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        agent: &TestAgent,
        anchors: Arc<TrustAnchors>,
        edge: SocketAddr,
    ) -> anyhow::Result<RawSession> {
        let config = client_config(agent, anchors)?;
        let connection = endpoint.connect_with(config, edge, "localhost")?.await.context("while connecting")?;
        let (mut send, mut recv) = connection.open_bi().await.context("while opening the session stream")?;
        let nonce = rand::random::<u64>();
        send.write_all(&Frame::Ping(nonce).encode()).await?;
        let mut reader = FrameReader::new();
        let mut early = Vec::new();
        loop {
            let chunk = recv.read_chunk(READ_CHUNK_BYTES, true).await?.context("edge closed the session stream")?;
            reader.extend(&chunk.bytes);
            while let Some(frame) = reader.next_frame()? {
                match frame {
                    Frame::Pong(answer) if answer == nonce => {
                        return Ok(RawSession { connection, send, recv, reader, early });
                    }
                    other => early.push(other),
                }
            }
        }
    }

    pub fn close(&self) {
        self.connection.close(0u32.into(), b"bench done");
    }

    /// Reads the next chunk of frames into `frames`; `Ok(false)` when `stop` fired first.
    async fn read_frames(&mut self, frames: &mut Vec<Frame>, stop: &mut watch::Receiver<bool>) -> anyhow::Result<bool> {
        frames.clear();
        frames.append(&mut self.early);
        if !frames.is_empty() {
            return Ok(true);
        }
        let chunk = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return Ok(false),
            chunk = self.recv.read_chunk(READ_CHUNK_BYTES, true) => chunk,
        };
        let chunk = chunk
            .map_err(|error| {
                anyhow::anyhow!("{}", self.connection.close_reason().map_or(error.to_string(), |r| r.to_string()))
            })?
            .context("edge closed the session stream")?;
        self.reader.extend(&chunk.bytes);
        while let Some(frame) = self.reader.next_frame()? {
            frames.push(frame);
        }
        Ok(true)
    }
}

fn client_config(agent: &TestAgent, anchors: Arc<TrustAnchors>) -> anyhow::Result<quinn::ClientConfig> {
    let tls = tls::client_config(
        &agent.identity.tls(),
        anchors,
        SharedRevocations::default(),
        ExpectedRole::AnyEdge,
        tls::ALPN_AGENT,
    )?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .max_idle_timeout(Some(Duration::from_secs(60).try_into()?))
        .stream_receive_window(STREAM_WINDOW_BYTES.into())
        .receive_window(CONNECTION_WINDOW_BYTES.into())
        .send_window(u64::from(CONNECTION_WINDOW_BYTES));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The edge's answers to one sender's messages.
#[derive(Clone, Debug, Default)]
pub struct Answers {
    pub forwarded: u64,
    pub stored: u64,
    pub rejected: u64,
    pub reject_codes: BTreeMap<String, u64>,
    /// When the last answer arrived.
    pub last_answer_nanos: u64,
}

impl Answers {
    pub fn total(&self) -> u64 {
        self.forwarded + self.stored + self.rejected
    }

    pub fn accepted(&self) -> u64 {
        self.forwarded + self.stored
    }

    pub fn merge(&mut self, other: &Answers) {
        self.forwarded += other.forwarded;
        self.stored += other.stored;
        self.rejected += other.rejected;
        for (code, count) in &other.reject_codes {
            *self.reject_codes.entry(code.clone()).or_default() += count;
        }
        self.last_answer_nanos = self.last_answer_nanos.max(other.last_answer_nanos);
    }
}

#[derive(Debug)]
pub struct SenderReport {
    pub answers: Answers,
    /// Receipts the edge passed on from the recipient.
    pub receipts: u64,
    pub error: Option<String>,
}

/// What a sender needs besides its session.
#[derive(Debug)]
pub struct SenderPlan {
    pub workload: Arc<Workload>,
    pub pair: usize,
    /// Messages sent and not yet answered (accepted or rejected), at most.
    pub window: usize,
    pub clock: Clock,
    pub sent_at: Arc<SentAt>,
    pub start: watch::Receiver<bool>,
    pub stop: watch::Receiver<bool>,
}

/// How a sender tells the bench about its progress.
#[derive(Debug)]
struct SenderSignals {
    /// Fires when every message is answered.
    answered: Option<oneshot::Sender<Answers>>,
    /// Fires when every accepted message's receipt came back.
    receipted: Option<oneshot::Sender<u64>>,
}

/// Running senders and their progress signals.
#[derive(Debug)]
pub struct Senders {
    pub tasks: Vec<JoinHandle<(SenderReport, RawSession)>>,
    pub answered: Vec<oneshot::Receiver<Answers>>,
    pub receipted: Vec<oneshot::Receiver<u64>>,
}

impl Senders {
    pub fn spawn(sessions: Vec<RawSession>, plans: Vec<SenderPlan>) -> Senders {
        let mut senders = Senders { tasks: Vec::new(), answered: Vec::new(), receipted: Vec::new() };
        for (session, plan) in sessions.into_iter().zip(plans) {
            let (answered, answered_receiver) = oneshot::channel();
            let (receipted, receipted_receiver) = oneshot::channel();
            let signals = SenderSignals { answered: Some(answered), receipted: Some(receipted) };
            senders.tasks.push(tokio::spawn(run_sender(session, plan, signals)));
            senders.answered.push(answered_receiver);
            senders.receipted.push(receipted_receiver);
        }
        senders
    }
}

/// Sends the pair's messages keeping at most `window` unanswered, writing each refill of
/// the window as one stream write; then keeps reading receipts until `stop`.
async fn run_sender(
    mut session: RawSession,
    mut plan: SenderPlan,
    mut signals: SenderSignals,
) -> (SenderReport, RawSession) {
    let mut answers = Answers::default();
    let mut receipts = 0u64;
    let result = sender_loop(&mut session, &mut plan, &mut signals, &mut answers, &mut receipts).await;
    (SenderReport { answers, receipts, error: result.err().map(|e| format!("{e:#}")) }, session)
}

async fn sender_loop(
    session: &mut RawSession,
    plan: &mut SenderPlan,
    signals: &mut SenderSignals,
    answers: &mut Answers,
    receipts: &mut u64,
) -> anyhow::Result<()> {
    let seqs = plan.workload.pairs[plan.pair].seqs.clone();
    let total = seqs.len() as u64;
    if plan.start.wait_for(|start| *start).await.is_err() {
        return Ok(());
    }
    let mut next = seqs.start;
    let mut frames = Vec::new();
    let mut replies = Vec::new();
    loop {
        let limit = (seqs.start + answers.total() as usize + plan.window).min(seqs.end);
        if next < limit {
            let now = plan.clock.nanos();
            for stamp in &plan.sent_at[next..limit] {
                stamp.store(now, Ordering::Relaxed);
            }
            session.send.write_all(plan.workload.envelopes(next..limit)).await?;
            next = limit;
        }
        if answers.total() == total
            && let Some(signal) = signals.answered.take()
        {
            let _ = signal.send(answers.clone());
        }
        if signals.answered.is_none()
            && *receipts >= answers.accepted()
            && let Some(signal) = signals.receipted.take()
        {
            let _ = signal.send(*receipts);
        }
        if !session.read_frames(&mut frames, &mut plan.stop).await? {
            return Ok(());
        }
        let now = plan.clock.nanos();
        replies.clear();
        for frame in frames.drain(..) {
            match frame {
                Frame::Accepted { disposition: Disposition::Forwarded, .. } => answers.forwarded += 1,
                Frame::Accepted { disposition: Disposition::Stored, .. } => answers.stored += 1,
                Frame::Rejected { code, .. } => {
                    answers.rejected += 1;
                    *answers.reject_codes.entry(format!("{code:?}")).or_default() += 1;
                }
                Frame::Receipt(_) => *receipts += 1,
                Frame::Ping(nonce) => Frame::Pong(nonce).encode_into(&mut replies),
                Frame::GoAway { detail, .. } => bail!("edge is going away: {detail}"),
                Frame::Pong(_) | Frame::Send(_) | Frame::Deliver(_) => continue,
            }
            if signals.answered.is_some() {
                answers.last_answer_nanos = now;
            }
        }
        if !replies.is_empty() {
            session.send.write_all(&replies).await?;
        }
    }
}

#[derive(Debug)]
pub struct RecipientReport {
    /// Distinct messages of this pair received.
    pub unique: u64,
    /// Deliveries of a message already received.
    pub duplicates: u64,
    /// Deliveries that were not this pair's messages or did not parse.
    pub foreign: u64,
    /// Messages of this pair never received.
    pub missing: u64,
    /// When the last distinct message arrived.
    pub last_delivery_nanos: u64,
    /// Send-to-delivery latency in microseconds (when send instants were recorded).
    pub latency_us: Histogram<u64>,
    pub error: Option<String>,
}

#[derive(Debug)]
pub struct RecipientPlan {
    pub workload: Arc<Workload>,
    pub pair: usize,
    /// Distinct messages to wait for.
    pub expected: u64,
    pub clock: Clock,
    /// Send instants, if latency is to be recorded.
    pub sent_at: Option<Arc<SentAt>>,
    pub stop: watch::Receiver<bool>,
}

/// Running recipients and their completion signals (each the time of its last expected
/// delivery).
#[derive(Debug)]
pub struct Recipients {
    pub tasks: Vec<JoinHandle<anyhow::Result<(RecipientReport, RawSession)>>>,
    pub complete: Vec<oneshot::Receiver<u64>>,
}

impl Recipients {
    /// Starts one task per plan; each first awaits its session (already connected, or
    /// connecting now).
    pub fn spawn<F>(sessions: Vec<F>, plans: Vec<RecipientPlan>) -> Recipients
    where
        F: Future<Output = anyhow::Result<RawSession>> + Send + 'static,
    {
        let mut recipients = Recipients { tasks: Vec::new(), complete: Vec::new() };
        for (session, plan) in sessions.into_iter().zip(plans) {
            let (complete, complete_receiver) = oneshot::channel();
            recipients.tasks.push(tokio::spawn(async move { Ok(run_recipient(session.await?, plan, complete).await) }));
            recipients.complete.push(complete_receiver);
        }
        recipients
    }
}

/// Receives the pair's messages, answering each with its pre-signed receipt, until `stop`
/// (so that late duplicates are still counted).
async fn run_recipient(
    mut session: RawSession,
    mut plan: RecipientPlan,
    complete: oneshot::Sender<u64>,
) -> (RecipientReport, RawSession) {
    let seqs = plan.workload.pairs[plan.pair].seqs.clone();
    let mut seen = vec![0u8; seqs.len()];
    let mut report = RecipientReport {
        unique: 0,
        duplicates: 0,
        foreign: 0,
        missing: 0,
        last_delivery_nanos: 0,
        latency_us: latency_histogram(),
        error: None,
    };
    let result = recipient_loop(&mut session, &mut plan, complete, &seqs, &mut seen, &mut report).await;
    report.error = result.err().map(|e| format!("{e:#}"));
    report.missing = seen.iter().filter(|count| **count == 0).count() as u64;
    (report, session)
}

async fn recipient_loop(
    session: &mut RawSession,
    plan: &mut RecipientPlan,
    complete: oneshot::Sender<u64>,
    seqs: &Range<usize>,
    seen: &mut [u8],
    report: &mut RecipientReport,
) -> anyhow::Result<()> {
    let mut complete = Some(complete);
    let mut frames = Vec::new();
    let mut out = Vec::new();
    loop {
        if report.unique >= plan.expected
            && let Some(signal) = complete.take()
        {
            let _ = signal.send(report.last_delivery_nanos);
        }
        if !session.read_frames(&mut frames, &mut plan.stop).await? {
            return Ok(());
        }
        let now = plan.clock.nanos();
        out.clear();
        for frame in frames.drain(..) {
            match frame {
                Frame::Deliver(bytes) => {
                    let Some(seq) = sequence_of(&bytes, &plan.workload).filter(|seq| seqs.contains(seq)) else {
                        report.foreign += 1;
                        continue;
                    };
                    let count = &mut seen[seq - seqs.start];
                    *count = count.saturating_add(1);
                    if *count > 1 {
                        report.duplicates += 1;
                    } else {
                        report.unique += 1;
                        report.last_delivery_nanos = now;
                        if let Some(sent_at) = &plan.sent_at {
                            let sent = sent_at[seq].load(Ordering::Relaxed);
                            report.latency_us.saturating_record(now.saturating_sub(sent) / 1_000);
                        }
                    }
                    // Duplicates are receipted too, so the edge stops redelivering them.
                    out.extend_from_slice(plan.workload.receipt(seq));
                }
                Frame::Ping(nonce) => Frame::Pong(nonce).encode_into(&mut out),
                Frame::GoAway { detail, .. } => bail!("edge is going away: {detail}"),
                _ => {}
            }
        }
        if !out.is_empty() {
            session.send.write_all(&out).await?;
        }
    }
}

/// The sequence number in an envelope's payload, if the message id is the one signed for
/// it (the envelope itself is not verified: recipients stay cheap).
fn sequence_of(bytes: &[u8], workload: &Workload) -> Option<usize> {
    let view = EnvelopeView::decode(bytes).ok()?;
    let seq = u64::from_be_bytes(view.payload.get(..SEQUENCE_LEN)?.try_into().ok()?);
    let seq = usize::try_from(seq).ok()?;
    (workload.message_id(seq)? == view.header.message_id).then_some(seq)
}

/// 1 µs to 100 s at three significant figures.
pub fn latency_histogram() -> Histogram<u64> {
    // Invariant: these bounds and precision are valid for hdrhistogram.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

/// Waits for every receiver until `deadline`; `None` for those that did not answer.
pub async fn collect<T>(receivers: Vec<oneshot::Receiver<T>>, deadline: tokio::time::Instant) -> Vec<Option<T>> {
    let mut values = Vec::with_capacity(receivers.len());
    for receiver in receivers {
        values.push(tokio::time::timeout_at(deadline, receiver).await.ok().and_then(Result::ok));
    }
    values
}

/// Every task's final report, and what went wrong.
#[derive(Debug, Default)]
pub struct Finished {
    pub senders: Vec<SenderReport>,
    pub recipients: Vec<RecipientReport>,
    pub errors: Vec<String>,
}

impl Finished {
    pub fn answers(&self) -> Answers {
        let mut answers = Answers::default();
        for report in &self.senders {
            answers.merge(&report.answers);
        }
        answers
    }

    pub fn receipts(&self) -> u64 {
        self.senders.iter().map(|r| r.receipts).sum()
    }

    pub fn unique(&self) -> u64 {
        self.recipients.iter().map(|r| r.unique).sum()
    }

    pub fn duplicates(&self) -> u64 {
        self.recipients.iter().map(|r| r.duplicates).sum()
    }

    pub fn foreign(&self) -> u64 {
        self.recipients.iter().map(|r| r.foreign).sum()
    }

    pub fn missing(&self) -> u64 {
        self.recipients.iter().map(|r| r.missing).sum()
    }

    pub fn latency_us(&self) -> Histogram<u64> {
        let mut merged = latency_histogram();
        for report in &self.recipients {
            // Invariant: every histogram has the same bounds, so adding cannot fail.
            merged.add(&report.latency_us).expect("same histogram bounds");
        }
        merged
    }
}

/// Stops every task, collects the reports and closes the connections.
pub async fn finish(
    endpoint: &quinn::Endpoint,
    stop: &watch::Sender<bool>,
    senders: Senders,
    recipients: Recipients,
) -> Finished {
    let _ = stop.send(true);
    let mut finished = Finished::default();
    for task in senders.tasks {
        match task.await {
            Ok((report, session)) => {
                session.close();
                if let Some(error) = &report.error {
                    finished.errors.push(format!("sender: {error}"));
                }
                finished.senders.push(report);
            }
            Err(error) => finished.errors.push(format!("sender task: {error}")),
        }
    }
    for task in recipients.tasks {
        match task.await {
            Ok(Ok((report, session))) => {
                session.close();
                if let Some(error) = &report.error {
                    finished.errors.push(format!("recipient: {error}"));
                }
                finished.recipients.push(report);
            }
            Ok(Err(error)) => finished.errors.push(format!("recipient could not connect: {error:#}")),
            Err(error) => finished.errors.push(format!("recipient task: {error}")),
        }
    }
    endpoint.close(0u32.into(), b"bench done");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    finished
}

/// A client endpoint on loopback.
pub fn client_endpoint() -> anyhow::Result<quinn::Endpoint> {
    Ok(quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?)
}

/// One zeroed send instant per message.
pub fn sent_at_table(messages: usize) -> Arc<SentAt> {
    Arc::new((0..messages).map(|_| AtomicU64::new(0)).collect())
}

//! `molt demo`: a scripted tour of a fresh local network, printed as a transcript. It exits
//! 0 only if every step worked.
//!
//! The scenario, each step with a time limit ([`STEP_TIMEOUT`]):
//! 1. start a network ([`crate::network`]) on ephemeral ports in a new directory;
//! 2. certify and register alice and bob, each with one capability;
//! 3. connect them, alice preferring edge west and bob edge east (on one machine every
//!    edge is equally near, so the demo states the preference with weights);
//! 4. each finds the other by capability search and takes its keys from the registry;
//! 5. they exchange messages across the two edges, with receipts;
//! 6. bob goes offline, alice sends three messages, bob reconnects and receives them;
//! 7. edge west is killed with SIGKILL while alice sends: alice fails over to east and
//!    the message arrives, once;
//! 8. the network stops.
//!
//! Every message bob's application sees is counted, so a duplicate fails the run.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use molt_protocol::cert::{Certificate, TrustAnchors};
use molt_protocol::frame::Disposition;
use molt_protocol::keys::{EncryptionSecret, SigningKey};
use molt_protocol::{AgentId, MessageId, UnixMillis};
use molt_sdk::api::{AgentCredentials, AgentProfile, ApiClient, Capability, SearchQuery, Visibility};
use molt_sdk::client::Event;
use molt_sdk::edges::{EdgeCandidate, EdgeWeight};
use molt_sdk::{AgentIdentity, Client, ClientConfig, Directory, EdgeSource};

use crate::network::{EdgeLogs, Network, NetworkOptions, Ports};

/// Longest time one step may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The failover time the network aims for; the transcript compares the measured one.
pub const FAILOVER_TARGET: Duration = Duration::from_secs(5);
/// Messages alice sends while bob is offline.
const OFFLINE_MESSAGES: usize = 3;
/// How long search waits for a new registration to become searchable.
const SEARCH_RETRY_FOR: Duration = Duration::from_secs(10);
/// Weight of an agent's preferred edge and of the other one.
const PREFERRED_WEIGHT: u16 = 1000;
const FALLBACK_WEIGHT: u16 = 1;

#[derive(Debug, Args)]
#[command(
    about = "Run a scripted tour of a fresh local network; exits 0 only if every step works",
    long_about = "Run a scripted tour of Molt on a fresh local network of its own (a control plane on \
SQLite and two linked edges, west and east, on ephemeral loopback ports), printing a transcript:

  1. start the network
  2. certify alice and bob and register them with a capability each
  3. connect alice to edge west and bob to edge east
  4. each finds the other by capability search
  5. they exchange messages across the edges, with receipts
  6. bob goes offline; alice's messages wait for him and arrive when he reconnects
  7. edge west is killed (SIGKILL) while alice sends; she fails over to east
  8. the network stops

Exit status 0 only if every step worked; otherwise the failed step is named and the \
directory, with the control plane's and each edge's log, is kept.

Examples:
  molt demo
  molt demo --dir /tmp/molt-demo --keep"
)]
pub struct DemoArgs {
    /// Directory for the demo's network; must be new or empty [default: a temporary
    /// directory, removed after a successful run].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Keep the directory after a successful run (it is always kept after a failure).
    #[arg(long)]
    pub keep: bool,
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let (dir, temporary) = match &args.dir {
        Some(dir) => {
            let empty = match std::fs::read_dir(dir) {
                Ok(mut entries) => entries.next().is_none(),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => true,
                Err(error) => return Err(error).with_context(|| format!("while reading --dir {}", dir.display())),
            };
            ensure!(empty, "--dir {} is not empty: the demo needs a fresh network", dir.display());
            std::fs::create_dir_all(dir).with_context(|| format!("while creating {}", dir.display()))?;
            (dir.clone(), None)
        }
        None => {
            let temporary = tempfile::Builder::new()
                .prefix("molt-demo-")
                .tempdir()
                .context("while making a temporary directory")?;
            (temporary.path().to_owned(), Some(temporary))
        }
    };
    init_logging(&dir.join("control-plane.log"))?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("while starting the async runtime")?;
    let outcome = runtime.block_on(Demo::new(&dir).run());
    drop(runtime);
    match outcome {
        Ok(()) => {
            println!("\nAll steps passed.");
            match temporary {
                Some(temporary) if !args.keep => drop(temporary),
                Some(temporary) => println!("Files and logs kept in {}", temporary.keep().display()),
                None => println!("Files and logs in {}", dir.display()),
            }
            Ok(())
        }
        Err(error) => {
            let kept = temporary.map_or(dir, tempfile::TempDir::keep);
            println!("\nThe demo failed. Files and logs kept in {}:", kept.display());
            println!("  {}", kept.join("control-plane.log").display());
            for edge in crate::network::EDGES {
                println!("  {}", kept.join("edges").join(edge.name).join("edge.log").display());
            }
            Err(error)
        }
    }
}

/// The control plane (in this process) logs to a file; the transcript has stdout.
fn init_logging(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("while creating {}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::sync::Mutex::new(file)).with_ansi(false).init();
    Ok(())
}

/// An agent of the demo: its identity and its connection.
struct DemoAgent {
    name: &'static str,
    identity: Arc<AgentIdentity>,
    capability: &'static str,
    /// The edge it prefers.
    home: &'static str,
    client: Option<Client>,
    /// The peers it knows, kept across its connections.
    directory: Directory,
    /// Messages its application received, by id: a second delivery fails the demo.
    received: HashMap<MessageId, String>,
    /// Receipts that arrived for its messages (they may come while it waits for a message).
    receipts: HashSet<MessageId>,
}

impl DemoAgent {
    fn id(&self) -> AgentId {
        self.identity.agent_id
    }

    fn client(&mut self) -> anyhow::Result<&mut Client> {
        self.client.as_mut().with_context(|| format!("{} is not connected", self.name))
    }

    /// Waits for the next message, noting it; a message seen before is an error.
    async fn next_message(&mut self) -> anyhow::Result<(AgentId, String)> {
        let name = self.name;
        loop {
            let event = self.client()?.next_event().await.with_context(|| format!("{name}'s client stopped"))?;
            match event {
                Event::Message(message) => {
                    let text = String::from_utf8_lossy(&message.plaintext).into_owned();
                    if self.received.insert(message.message_id, text.clone()).is_some() {
                        bail!("{name} received message {} twice", message.message_id);
                    }
                    return Ok((message.sender, text));
                }
                Event::Receipt { message_id, .. } => {
                    self.receipts.insert(message_id);
                }
                Event::Unverified { reason, .. } => bail!("{name} received a message it could not verify: {reason}"),
                _ => {}
            }
        }
    }

    /// Waits for receipts for every id in `ids`, ignoring other events except messages,
    /// which are an error here.
    async fn receipts_for(&mut self, ids: &[MessageId]) -> anyhow::Result<()> {
        while !ids.iter().all(|id| self.receipts.contains(id)) {
            let event = self.client()?.next_event().await.context("the client stopped")?;
            match event {
                Event::Receipt { message_id, .. } => {
                    self.receipts.insert(message_id);
                }
                Event::Message(message) => bail!("{} received an unexpected message {}", self.name, message.message_id),
                _ => {}
            }
        }
        Ok(())
    }
}

struct Demo {
    dir: PathBuf,
    step: usize,
}

/// Steps in the transcript.
const STEPS: usize = 8;

impl Demo {
    fn new(dir: &Path) -> Demo {
        Demo { dir: dir.to_owned(), step: 0 }
    }

    /// Runs one step under [`STEP_TIMEOUT`], printing its title and how it ended.
    async fn step<T>(&mut self, title: &str, work: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
        self.step += 1;
        println!("\n[{}/{STEPS}] {title}", self.step);
        let started = Instant::now();
        let outcome = match tokio::time::timeout(STEP_TIMEOUT, work).await {
            Ok(outcome) => outcome,
            Err(_) => Err(anyhow::anyhow!("did not finish within {} s", STEP_TIMEOUT.as_secs())),
        };
        let elapsed = started.elapsed();
        match &outcome {
            Ok(_) => println!("      ok ({})", millis(elapsed)),
            Err(error) => println!("      FAILED after {}: {error:#}", millis(elapsed)),
        }
        outcome.with_context(|| format!("step {} ({title}) failed", self.step))
    }

    async fn run(mut self) -> anyhow::Result<()> {
        println!("molt demo: a fresh local network in {}", self.dir.display());
        let options = NetworkOptions { dir: self.dir.clone(), ports: Ports::Ephemeral, edge_logs: EdgeLogs::Files };
        let mut network = self.step("Start a control plane (SQLite) and two linked edges", start(&options)).await?;
        let result = self.scenario(&mut network).await;
        let stopped = self.step("Stop the network", async { network.stop().await }).await;
        result.and(stopped)
    }

    async fn scenario(&mut self, network: &mut Network) -> anyhow::Result<()> {
        let api = network.control_plane.admin_client()?;
        let anchors = Arc::new(load_anchors(&network.layout.root_pem())?);
        let (mut alice, mut bob) = self
            .step("Certify alice and bob and register their capabilities", async {
                let alice = register(&api, &network.org.id, "alice", "translate.text", "west").await?;
                let bob = register(&api, &network.org.id, "bob", "summarize.text", "east").await?;
                Ok((alice, bob))
            })
            .await?;

        self.step("Connect alice to edge west and bob to edge east", async {
            for agent in [&mut alice, &mut bob] {
                connect(network, agent, &anchors).await?;
            }
            until_present(network, &[&alice, &bob]).await
        })
        .await?;

        self.step("Find each other by capability search", async {
            let public = network.control_plane.public_client()?;
            find(&public, &mut alice, bob.capability, bob.id()).await?;
            find(&public, &mut bob, alice.capability, alice.id()).await
        })
        .await?;

        self.step("Exchange messages across the edges", exchange(&mut alice, &mut bob)).await?;
        self.step("Bob goes offline; alice's messages wait for him", offline(network, &mut alice, &mut bob, &anchors))
            .await?;
        self.step(
            "Kill edge west (SIGKILL) while alice sends; she fails over to east",
            failover(network, &mut alice, &mut bob),
        )
        .await?;
        for agent in [alice, bob] {
            if let Some(client) = agent.client {
                client.close().await;
            }
        }
        Ok(())
    }
}

async fn start(options: &NetworkOptions) -> anyhow::Result<Network> {
    let network = Network::start(options).await?;
    println!("      control plane  {} (gRPC {})", network.control_plane.url(), network.control_plane.grpc_addr);
    for edge in &network.edges {
        let link = edge.ready.peer_addr.map(|addr| format!(", link {addr}")).unwrap_or_default();
        println!(
            "      edge {:<9} {} in {}: QUIC {}{link}",
            edge.spec.name,
            edge.edge_id(),
            edge.spec.region,
            edge.ready.quic_addr
        );
    }
    Ok(network)
}

fn load_anchors(path: &Path) -> anyhow::Result<TrustAnchors> {
    let text = std::fs::read_to_string(path).with_context(|| format!("while reading {}", path.display()))?;
    TrustAnchors::from_pem(&text).with_context(|| format!("while reading {}", path.display()))
}

/// A new agent with a certificate from the org's CA, registered with `capability`.
async fn register(
    api: &ApiClient,
    org_id: &str,
    name: &'static str,
    capability: &'static str,
    home: &'static str,
) -> anyhow::Result<DemoAgent> {
    let mut rng = rand::rngs::OsRng;
    let signing_key = SigningKey::generate(&mut rng);
    let now = UnixMillis::now_from_system();
    let issued = api
        .issue_agent_certificate(org_id, &signing_key, now)
        .await
        .with_context(|| format!("while certifying {name}"))?;
    let chain = Certificate::chain_from_pem(&issued.chain_pem).context("the issued chain")?;
    let identity = Arc::new(AgentIdentity::new(chain, signing_key.clone(), EncryptionSecret::generate(&mut rng))?);
    let credentials = AgentCredentials::from_inception_key(signing_key);
    let profile = AgentProfile {
        name: name.to_owned(),
        description: format!("the demo's {name}"),
        capabilities: vec![Capability {
            name: capability.to_owned(),
            version: "1".to_owned(),
            tags: vec!["demo".to_owned()],
        }],
        key_binding: Some(hex::encode(identity.key_binding(now).encode())),
        visibility: Visibility::Public,
        home_edge: None,
    };
    api.register_agent(&credentials, &profile).await.with_context(|| format!("while registering {name}"))?;
    println!("      {name:<5} {} certified (serial {}), offers {capability}", identity.agent_id, issued.serial);
    Ok(DemoAgent {
        name,
        identity,
        capability,
        home,
        client: None,
        directory: Directory::new(),
        received: HashMap::new(),
        receipts: HashSet::new(),
    })
}

/// Connects `agent` with both edges as candidates, its home edge weighted far above the
/// other; checks it landed on its home edge.
async fn connect(network: &Network, agent: &mut DemoAgent, anchors: &Arc<TrustAnchors>) -> anyhow::Result<()> {
    let candidates = network
        .edges
        .iter()
        .map(|edge| EdgeCandidate {
            addr: edge.ready.quic_addr,
            edge_id: Some(edge.edge_id()),
            region: edge.spec.region.to_owned(),
            weight: EdgeWeight::new(if edge.spec.name == agent.home { PREFERRED_WEIGHT } else { FALLBACK_WEIGHT })
                .unwrap_or_default(),
        })
        .collect();
    let mut config =
        ClientConfig::with_edges(agent.identity.clone(), anchors.clone(), EdgeSource::Candidates(candidates));
    config.backoff_min = Duration::from_millis(100);
    config.backoff_max = Duration::from_secs(1);
    agent.directory.insert(agent.id(), agent.identity.peer_keys());
    let client = Client::connect(config, agent.directory.clone())
        .await
        .with_context(|| format!("while connecting {}", agent.name))?;
    let home = network.edge(agent.home).context("the home edge")?;
    let at = client.edge();
    ensure!(
        at == Some(home.ready.quic_addr),
        "{} connected to {at:?}, not to {} ({})",
        agent.name,
        agent.home,
        home.ready.quic_addr
    );
    println!("      {:<5} connected to {} ({})", agent.name, agent.home, home.ready.quic_addr);
    agent.client = Some(client);
    Ok(())
}

/// Waits until the control plane knows each agent is at its home edge: from then on the
/// other edge routes messages for it over the link instead of buffering them.
async fn until_present(network: &Network, agents: &[&DemoAgent]) -> anyhow::Result<()> {
    let started = Instant::now();
    for agent in agents {
        let home = network.edge(agent.home).context("the home edge")?.edge_id().to_string();
        while network.control_plane.reported_home_edge(agent.id()).await?.as_deref() != Some(home.as_str()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let names: Vec<String> = agents.iter().map(|agent| format!("{} at {}", agent.name, agent.home)).collect();
    println!("      the control plane saw {} after {}", names.join(" and "), millis(started.elapsed()));
    Ok(())
}

/// `seeker` searches for `capability` and takes the one hit's keys from the registry.
async fn find(api: &ApiClient, seeker: &mut DemoAgent, capability: &str, expected: AgentId) -> anyhow::Result<()> {
    let query = SearchQuery { capability: Some(capability.to_owned()), ..SearchQuery::default() };
    let deadline = Instant::now() + SEARCH_RETRY_FOR;
    let hits = loop {
        let results = api.search_agents(&query).await.with_context(|| format!("while searching for {capability}"))?;
        if !results.items.is_empty() || Instant::now() >= deadline {
            break results.items;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let [hit] = hits.as_slice() else {
        bail!("searching for {capability} found {} agents, expected 1", hits.len());
    };
    let (found, keys) = hit.agent.peer_keys().with_context(|| format!("the registry entry of {}", hit.agent.id))?;
    ensure!(found == expected, "searching for {capability} found {found}, expected {expected}");
    seeker.directory.insert(found, keys);
    println!(
        "      {:<5} searched capability {capability}: found {} ({found}), score {:.2}",
        seeker.name, hit.agent.name, hit.score
    );
    Ok(())
}

async fn exchange(alice: &mut DemoAgent, bob: &mut DemoAgent) -> anyhow::Result<()> {
    let started = Instant::now();
    let request = "please summarize: agents find each other, talk securely and pay each other";
    let sent = alice.client()?.send(bob.id(), request.as_bytes()).await.context("alice's send")?;
    let (sender, text) = bob.next_message().await?;
    ensure!(sender == alice.id() && text == request, "bob received {text:?} from {sender}");
    println!(
        "      alice → bob  {request:?} ({}, received after {})",
        describe(sent.disposition),
        millis(started.elapsed())
    );

    let started = Instant::now();
    let reply = "summary: a network for agents";
    let answered = bob.client()?.send(alice.id(), reply.as_bytes()).await.context("bob's send")?;
    let (sender, text) = alice.next_message().await?;
    ensure!(sender == bob.id() && text == reply, "alice received {text:?} from {sender}");
    println!(
        "      bob → alice  {reply:?} ({}, received after {})",
        describe(answered.disposition),
        millis(started.elapsed())
    );

    alice.receipts_for(&[sent.message_id]).await?;
    bob.receipts_for(&[answered.message_id]).await?;
    println!("      both signed receipts came back across the edges");
    if [sent.disposition, answered.disposition].contains(&Disposition::Stored) {
        println!("      (across edges, the sender's edge answers `stored` once the far edge has the message on disk)");
    }
    Ok(())
}

async fn offline(
    network: &Network,
    alice: &mut DemoAgent,
    bob: &mut DemoAgent,
    anchors: &Arc<TrustAnchors>,
) -> anyhow::Result<()> {
    if let Some(client) = bob.client.take() {
        client.close().await;
    }
    println!("      bob disconnected");
    let mut sent = Vec::new();
    for index in 1..=OFFLINE_MESSAGES {
        let text = format!("while you were away, note {index}");
        let report = alice.client()?.send(bob.id(), text.as_bytes()).await.context("alice's send")?;
        ensure!(
            report.disposition == Disposition::Stored,
            "bob is offline, yet the edge answered {}",
            describe(report.disposition)
        );
        sent.push((report.message_id, text));
    }
    println!("      alice sent {OFFLINE_MESSAGES} messages: each stored durably at an edge");

    connect(network, bob, anchors).await?;
    for (index, (_, expected)) in sent.iter().enumerate() {
        let (sender, text) = bob.next_message().await?;
        ensure!(sender == alice.id() && &text == expected, "message {} was {text:?} from {sender}", index + 1);
    }
    println!("      bob reconnected and received all {OFFLINE_MESSAGES}, in order");
    let ids: Vec<MessageId> = sent.iter().map(|(id, _)| *id).collect();
    alice.receipts_for(&ids).await?;
    println!("      alice has bob's receipts for them");
    Ok(())
}

async fn failover(network: &mut Network, alice: &mut DemoAgent, bob: &mut DemoAgent) -> anyhow::Result<()> {
    let east = network.edge("east").context("edge east")?.ready.quic_addr;
    let west = network.edge_mut("west").context("edge west")?;
    let mut changes = alice.client()?.edge_changes();
    let killed_at = Instant::now();
    west.kill().await?;
    println!("      edge west killed");
    let text = "are you still there?";
    let report = alice.client()?.send(bob.id(), text.as_bytes()).await.context("alice's send after the kill")?;
    let answered = killed_at.elapsed();
    let moved = loop {
        if *changes.borrow_and_update() == Some(east) {
            break killed_at.elapsed();
        }
        changes.changed().await.context("alice's client stopped")?;
    };
    println!(
        "      alice moved to east after {} (target ≤ {} s); her message was answered after {} ({})",
        millis(moved),
        FAILOVER_TARGET.as_secs(),
        millis(answered),
        describe(report.disposition)
    );
    let (sender, received) = bob.next_message().await?;
    ensure!(sender == alice.id() && received == text, "bob received {received:?} from {sender}");
    println!("      bob received it once; bob has seen {} messages, no duplicates", bob.received.len());
    Ok(())
}

fn describe(disposition: Disposition) -> &'static str {
    match disposition {
        Disposition::Forwarded => "forwarded live",
        Disposition::Stored => "stored durably at an edge",
    }
}

fn millis(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{} ms", duration.as_millis())
    } else {
        format!("{:.2} s", duration.as_secs_f64())
    }
}

//! Starting, running and stopping an edge: the QUIC endpoint and its accept loop, the
//! admin HTTP server, periodic housekeeping, and the graceful shutdown that tells agents
//! when to come back.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::metrics as names;
use anyhow::Context as _;
use molt_protocol::cert::{ExpectedRole, Role};
use molt_protocol::frame::Frame;
use molt_protocol::tls::SignerTlsIdentity;
use molt_protocol::{EdgeId, UnixMillis, tls};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::EdgeConfig;
use crate::control::{ControlClient, ControlLink, LinkContext, TrustKeeper};
use crate::federation::{self, Federation};
use crate::identity::{load_anchors, load_identity, load_revocations};
use crate::live::{LiveConnections, LiveTls};
use crate::ratelimit::{AgentSlots, IpSlots, MessageLimiter, MessageLimits, Slot};
use crate::relay::{self, Relay, RelayConfig, Session, close_code};
use crate::store::{OfflineStore, PURGE_INTERVAL, StoreLimits};

/// How long an agent has after its handshake to open its session stream.
pub const SESSION_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection gets to flush its last frames.
pub const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_millis(200);
/// How often gauges are refreshed.
pub const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// Largest QUIC stream window: holds two of the largest frames.
const STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// The edge as a value: [`Edge::start`] it, then [`EdgeHandle::shutdown`] it.
#[derive(Debug)]
pub struct Edge;

/// A running edge.
#[derive(Debug)]
pub struct EdgeHandle {
    pub edge_id: EdgeId,
    quic_addr: SocketAddr,
    admin_addr: SocketAddr,
    peer_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
    reloader: Arc<crate::reload::Reloader>,
}

impl EdgeHandle {
    /// The UDP address agents connect to (with the real port when 0 was configured).
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The UDP address other edges link to, when `[federation]` is configured.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// What applies a reloaded config to this edge (`crate::reload`).
    pub fn reloader(&self) -> Arc<crate::reload::Reloader> {
        Arc::clone(&self.reloader)
    }

    /// Tells agents to reconnect elsewhere or later, waits for them to leave (at most the
    /// configured drain timeout), closes everything and flushes the buffer.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.task.await.context("while waiting for the edge to stop")?
    }

    /// Runs until `signal` resolves, then shuts down.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        signal.await;
        tracing::info!("shutting down");
        self.shutdown().await
    }
}

struct Shared {
    relay: Arc<Relay>,
    agent_slots: Arc<AgentSlots>,
    config: EdgeConfig,
    live: Arc<LiveConnections>,
}

impl Edge {
    /// Loads identity and trust, opens the buffer, binds the QUIC and admin sockets and
    /// starts serving.
    pub async fn start(config: EdgeConfig) -> anyhow::Result<EdgeHandle> {
        let identity = load_identity(&config.identity.certificate_chain, &config.identity.key)
            .context("while loading the edge identity")?;
        let anchors = Arc::new(load_anchors(&config.trust.anchors).context("while loading trust anchors")?);
        let revocations =
            load_revocations(config.trust.revocation_lists.iter().map(|l| (l.crl.as_path(), l.issuer.as_path())))
                .context("while loading revocation lists")?;
        let revocations: tls::SharedRevocations = Arc::new(RwLock::new(revocations));
        let server_tls = tls::server_config_with_signer(
            &identity.tls,
            Arc::clone(&anchors),
            Arc::clone(&revocations),
            ExpectedRole::AnyAgent,
            tls::ALPN_AGENT,
        )
        .context("while building the tls configuration")?;
        let quic = quic_server_config(server_tls, &config)?;
        let endpoint = quinn::Endpoint::server(quic, config.edge.listen_addr)
            .with_context(|| format!("while binding udp {}", config.edge.listen_addr))?;
        let quic_addr = endpoint.local_addr().context("while reading the bound address")?;
        let live_tls = Arc::new(LiveTls::new(
            endpoint.clone(),
            config.clone(),
            SignerTlsIdentity { chain: identity.tls.chain.clone(), signer: Arc::clone(&identity.tls.signer) },
            (*anchors).clone(),
            revocations,
        ));
        let live = Arc::new(LiveConnections::default());
        let trust = config.control_plane.as_ref().map(|control_plane| {
            Arc::new(TrustKeeper::new(control_plane.bundle_cache.clone(), Arc::clone(&live_tls), Arc::clone(&live)))
        });
        if let Some(trust) = &trust {
            // A damaged cache is not fatal: the configured files still hold, and the link
            // fetches a fresh bundle.
            match trust.load_cache() {
                Ok(Some(sequence)) => tracing::info!(sequence, "trust bundle loaded from the cache"),
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "ignoring the cached trust bundle"),
            }
        }

        std::fs::create_dir_all(&config.edge.data_dir)
            .with_context(|| format!("while creating the data directory {}", config.edge.data_dir.display()))?;
        let store_limits = StoreLimits {
            queue_depth_per_agent_max: config.buffer.queue_depth_per_agent_max.get(),
            messages_max: config.buffer.messages_max.get(),
            bytes_max: config.buffer.bytes_max.get(),
        };
        let buffer_path = config.edge.data_dir.join("buffer.redb");
        let (store, writer) = OfflineStore::open(&buffer_path, store_limits)
            .with_context(|| format!("while opening the offline buffer {}", buffer_path.display()))?;
        let limiter = MessageLimiter::new(MessageLimits {
            messages_per_minute: config.limits.messages_per_minute,
            messages_per_hour: config.limits.messages_per_hour,
            bytes_per_minute: NonZeroU32::new(u32::try_from(config.limits.bytes_per_minute.get()).unwrap_or(u32::MAX))
                .unwrap_or(NonZeroU32::MAX),
        });
        let relay = Relay::new(
            RelayConfig {
                clock_skew: config.limits.clock_skew,
                bad_messages_max: config.limits.bad_messages_per_connection_max,
                outbound_queue_depth: config.limits.outbound_queue_depth_max.get(),
                replay_window_capacity: config.limits.replay_window_capacity.get(),
                retention: config.buffer.retention,
            },
            store,
            limiter,
        );

        let ready = Arc::new(AtomicBool::new(true));
        let admin_listener = tokio::net::TcpListener::bind(config.edge.admin_addr)
            .await
            .with_context(|| format!("while binding the admin port {}", config.edge.admin_addr))?;
        let admin_addr = admin_listener.local_addr()?;
        let (shutdown, shutdown_signal) = watch::channel(false);
        let admin_state = crate::admin::AdminState::new(ready.clone(), crate::metrics::prometheus_handle());
        let mut admin_stop = shutdown_signal.clone();
        let admin = tokio::spawn(crate::admin::serve(admin_listener, admin_state, async move {
            let _ = admin_stop.wait_for(|stop| *stop).await;
        }));

        let control_client = Arc::new(ControlClient::default());
        let federation = match &config.federation {
            Some(federation) => {
                let federation = Federation::bind(
                    identity.edge_id,
                    federation.clone(),
                    Arc::clone(&live_tls),
                    Arc::clone(&control_client),
                )?;
                relay.set_federation(Arc::clone(&federation));
                Some(federation)
            }
            None => None,
        };
        let peer_addr = federation.as_ref().map(|federation| federation.local_addr()).transpose()?;
        let peer_advertised = federation.as_ref().map(|federation| federation.advertised_addr()).transpose()?;
        tracing::info!(
            edge_id = %identity.edge_id,
            %quic_addr,
            %admin_addr,
            peer_addr = ?peer_addr,
            region = %config.edge.region,
            "edge is serving"
        );
        if let Some(control_plane) = &config.control_plane {
            // Checked now so that a wrong path stops the start instead of every reconnect.
            let path = &control_plane.trust_anchor;
            load_anchors(path)
                .with_context(|| format!("while loading the control plane's trust anchor {}", path.display()))?;
        }
        let link = match (&config.control_plane, trust) {
            (Some(control_plane), Some(trust)) => Some(ControlLink::spawn(LinkContext {
                config: control_plane.clone(),
                edge_id: identity.edge_id,
                region: config.edge.region.to_string(),
                quic_addr,
                chain_path: config.identity.certificate_chain.clone(),
                tls: live_tls,
                trust,
                relay: Arc::clone(&relay),
                peer_addr: peer_advertised,
                client: control_client,
                key: config.identity.key.clone(),
                metrics: crate::metrics::prometheus_handle(),
                started: std::time::Instant::now(),
            })),
            _ => None,
        };
        let agent_slots = AgentSlots::new(config.limits.connections_per_agent.get());
        let ip_slots = IpSlots::new(config.limits.connections_per_ip.get());
        let reloader = Arc::new(crate::reload::Reloader::new(
            &relay,
            Arc::clone(&agent_slots),
            Arc::clone(&ip_slots),
            config.clone(),
        ));
        let shared = Arc::new(Shared { relay, agent_slots, config, live });
        let peers = federation.map(|federation| PeerTasks {
            server: tokio::spawn(federation::serve(
                Arc::clone(&federation),
                Arc::clone(&shared.relay),
                Arc::clone(&shared.live),
                shutdown_signal.clone(),
            )),
            handoff: tokio::spawn(federation::handoff_loop(Arc::clone(&federation), Arc::clone(&shared.relay))),
            federation,
        });
        let task = tokio::spawn(run(endpoint, shared, ip_slots, shutdown_signal, ready, admin, writer, link, peers));
        Ok(EdgeHandle { edge_id: identity.edge_id, quic_addr, admin_addr, peer_addr, shutdown, task, reloader })
    }
}

pub(crate) fn quic_server_config(
    tls: rustls::ServerConfig,
    config: &EdgeConfig,
) -> anyhow::Result<quinn::ServerConfig> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("while adapting tls to quic")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(config.limits.idle_timeout.try_into().context("idle timeout is too long for quic")?))
        .keep_alive_interval(Some(config.limits.keep_alive))
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(STREAM_WINDOW_BYTES.into())
        .receive_window(CONNECTION_WINDOW_BYTES.into())
        .send_window(u64::from(CONNECTION_WINDOW_BYTES));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// The edge-to-edge server and hand-off tasks.
struct PeerTasks {
    federation: Arc<Federation>,
    server: JoinHandle<()>,
    handoff: JoinHandle<()>,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    ip_slots: Arc<IpSlots>,
    mut shutdown: watch::Receiver<bool>,
    ready: Arc<AtomicBool>,
    admin: JoinHandle<std::io::Result<()>>,
    writer: crate::store::WriterGuard,
    link: Option<ControlLink>,
    peers: Option<PeerTasks>,
) -> anyhow::Result<()> {
    let housekeeping = tokio::spawn(housekeeping(shared.relay.clone()));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let ip: IpAddr = incoming.remote_address().ip();
                match ip_slots.acquire(ip) {
                    Some(slot) => { connections.spawn(serve_connection(shared.clone(), incoming, slot)); }
                    None => {
                        metrics::counter!(names::CONNECTIONS_REFUSED_TOTAL, names::LABEL_REASON => "ip_limit").increment(1);
                        tracing::debug!(%ip, "refusing a connection: too many from this address");
                        incoming.refuse();
                    }
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }

    // Drain: stop taking connections, tell every agent when to come back, give them the
    // drain timeout to leave, then close what is left.
    drop(link);
    ready.store(false, Ordering::Release);
    endpoint.set_server_config(None);
    let reconnect_after_ms = shared.config.shutdown.reconnect_after_ms();
    for session in shared.relay.all_sessions() {
        session.try_send(Frame::GoAway { reconnect_after_ms, detail: "edge is shutting down".into() });
    }
    let drained = tokio::time::timeout(shared.config.shutdown.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(remaining = connections.len(), "drain timeout reached; closing remaining connections");
    }
    endpoint.close(close_code::SHUTTING_DOWN.into(), b"edge is shutting down");
    connections.shutdown().await;
    housekeeping.abort();
    if let Some(peers) = peers {
        peers.handoff.abort();
        let _ = peers.server.await;
        peers.federation.close();
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    let _ = admin.await;
    drop(shared);
    // The writer thread ends once every store handle is gone and its queue is committed.
    tokio::task::spawn_blocking(move || writer.join()).await.context("while flushing the offline buffer")?;
    tracing::info!("edge stopped");
    Ok(())
}

async fn housekeeping(relay: Arc<Relay>) {
    let capacity = relay.store().limits().messages_max as f64;
    metrics::gauge!(names::BUFFER_CAPACITY_MESSAGES).set(capacity);
    metrics::gauge!(names::BUFFER_CAPACITY_BYTES).set(relay.store().limits().bytes_max as f64);
    let mut gauges = tokio::time::interval(GAUGE_INTERVAL);
    let mut ticks: u64 = 0;
    let purge_every = (PURGE_INTERVAL.as_secs() / GAUGE_INTERVAL.as_secs()).max(1);
    loop {
        gauges.tick().await;
        ticks += 1;
        let occupancy = relay.store().occupancy();
        metrics::gauge!(names::BUFFER_MESSAGES).set(occupancy.messages as f64);
        metrics::gauge!(names::BUFFER_BYTES).set(occupancy.bytes as f64);
        if ticks % purge_every == 0 {
            match relay.store().purge_expired(UnixMillis::now_from_system()).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "dropped expired buffered messages"),
                Err(error) => tracing::warn!(%error, "purging expired messages failed"),
            }
            relay.limiter().housekeeping();
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, incoming: quinn::Incoming, _ip_slot: Slot<IpAddr>) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            metrics::counter!(names::CONNECTIONS_REFUSED_TOTAL, names::LABEL_REASON => "handshake").increment(1);
            tracing::info!(%remote, %error, "handshake failed");
            return;
        }
    };
    // Every certificate of the chain, so revoking the org CA closes its agents too.
    let Some((leaf, serials)) = crate::live::authenticated_peer(&connection) else {
        connection.close(close_code::PROTOCOL_VIOLATION.into(), b"no client certificate");
        return;
    };
    let _live = shared.live.insert(serials, connection.clone());
    let Role::Agent(agent) = leaf.role() else {
        connection.close(close_code::PROTOCOL_VIOLATION.into(), b"not an agent certificate");
        return;
    };
    let Some(_agent_slot) = shared.agent_slots.acquire(agent) else {
        metrics::counter!(names::CONNECTIONS_REFUSED_TOTAL, names::LABEL_REASON => "agent_limit").increment(1);
        tracing::info!(%agent, %remote, "refusing a connection: too many for this agent");
        connection.close(close_code::CONNECTION_LIMIT.into(), b"too many connections for this agent");
        return;
    };
    let (send, recv) = match tokio::time::timeout(SESSION_OPEN_TIMEOUT, connection.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(error)) => {
            tracing::debug!(%agent, %error, "connection ended before its session stream");
            return;
        }
        Err(_) => {
            connection.close(close_code::NO_SESSION_STREAM.into(), b"no session stream opened");
            return;
        }
    };
    let relay = &shared.relay;
    let (outbound, outbound_receiver) = mpsc::channel(relay.config().outbound_queue_depth);
    let session = Session::new(relay.next_session_id(), agent, leaf.public_key(), outbound);
    relay.register(&session);
    relay.prime(&session);
    tracing::debug!(%agent, %remote, session = session.id, "agent connected");
    let writer = AbortOnDrop(tokio::spawn(relay::write_loop(outbound_receiver, send)));
    let drainer = AbortOnDrop(tokio::spawn({
        let relay = relay.clone();
        let session = session.clone();
        async move { relay.drain(session).await }
    }));
    let code = relay::read_loop(relay, &session, recv).await;
    drop(drainer);
    relay.unregister(&session).await;
    if code != close_code::NORMAL {
        tokio::time::sleep(CLOSE_FLUSH_TIMEOUT).await;
        connection.close(code.into(), b"closing");
    }
    drop(writer);
    tracing::debug!(%agent, session = session.id, code, "agent disconnected");
}

/// Aborts its task when dropped: a connection task aborted at shutdown takes its helper
/// tasks (and their handles on the relay and the store) with it.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

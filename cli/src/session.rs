//! What `send` and `listen` share: loading the agent, its trust anchors and its peers'
//! cards, and connecting to the edge: the one given with `--edge`, or the nearest in the
//! control plane's edge map (`--api`), with failover between them.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use molt_protocol::cert::{Revocations, TrustAnchors};
use molt_protocol::{AgentId, UnixMillis};
use molt_sdk::api::ApiClient;
use molt_sdk::dev::{self, AgentCard, AgentFiles};
use molt_sdk::{AgentIdentity, Client, ClientConfig, Directory, EdgeSource};

/// TLS server name used when `--edge` is an IP address; `molt dev-ca issue-edge` puts it
/// in edge certificates by default.
const DEFAULT_SERVER_NAME: &str = "localhost";

/// How to reach the edge, as whom, and whom to trust.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Agent directory: keys from `molt keygen`, certificate from `molt dev-ca issue-agent`.
    #[arg(long, value_name = "DIR")]
    pub agent_dir: PathBuf,
    /// Edge address as HOST:PORT, e.g. 127.0.0.1:4433 or localhost:4433. Without it the
    /// edge is chosen from the control plane's edge map (--api).
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "api")]
    pub edge: Option<String>,
    /// Control plane URL: without --edge, the agent measures the edges of its edge map,
    /// connects to the nearest and fails over to the next if it dies.
    #[arg(long = "api", value_name = "URL", env = "MOLT_API")]
    pub api: Option<String>,
    /// Root CA certificate (PEM) that the edge and peers must chain to, e.g. CA_DIR/root.pem.
    #[arg(long, value_name = "ROOT_PEM")]
    pub ca_root: PathBuf,
    /// TLS server name; one of the edge certificate's DNS names [default: the host of
    /// --edge, or `localhost` when that is an IP address].
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Revocation list (PEM) of the agent's org CA, e.g. CA_DIR/revoked.crl; edges and peers
    /// whose certificates it lists are refused.
    #[arg(long, value_name = "CRL_PEM")]
    pub crl: Option<PathBuf>,
    /// Seconds to wait for the first connection to the edge.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub connect_timeout_secs: u64,
}

/// The loaded agent and what it trusts, before connecting.
#[derive(Debug)]
pub struct Session {
    pub identity: Arc<AgentIdentity>,
    pub anchors: Arc<TrustAnchors>,
    pub revocations: Revocations,
    pub directory: Directory,
}

impl Session {
    pub fn load(args: &ConnectArgs) -> anyhow::Result<Session> {
        let identity = AgentFiles::load(&args.agent_dir)
            .with_context(|| format!("while loading the agent in {}", args.agent_dir.display()))?;
        let root_text = std::fs::read_to_string(&args.ca_root)
            .with_context(|| format!("while reading --ca-root {}", args.ca_root.display()))?;
        let anchors = TrustAnchors::from_pem(&root_text)
            .with_context(|| format!("while reading --ca-root {}", args.ca_root.display()))?;
        let revocations = match &args.crl {
            Some(path) => load_revocations(path, &identity)?,
            None => Revocations::default(),
        };
        Ok(Session {
            identity: Arc::new(identity),
            anchors: Arc::new(anchors),
            revocations,
            directory: Directory::new(),
        })
    }

    /// Verifies the card at `path` and adds its agent's keys to the directory.
    pub fn add_peer(&self, path: &Path, now: UnixMillis) -> anyhow::Result<AgentId> {
        let card = AgentCard::load(path).with_context(|| format!("while loading the card {}", path.display()))?;
        let (agent_id, keys) = card
            .verify(&self.anchors, &self.revocations, now)
            .with_context(|| format!("while verifying the card {}", path.display()))?;
        self.directory.insert(agent_id, keys);
        Ok(agent_id)
    }

    /// Lets the agent verify messages it sent to itself.
    pub fn add_self(&self) {
        self.directory.insert(self.identity.agent_id, self.identity.peer_keys());
    }

    /// Resolves the edge (or fetches the edge map) and connects; returns once the first
    /// connection is up.
    pub async fn connect(
        self,
        args: &ConnectArgs,
        configure: impl FnOnce(&mut ClientConfig),
    ) -> anyhow::Result<Client> {
        let (mut config, edge_addr) = match (&args.edge, &args.api) {
            (Some(edge), _) => {
                let edge_addr = resolve(edge).await?;
                let mut config = ClientConfig::new(self.identity, self.anchors, edge_addr);
                config.server_name = default_server_name(edge);
                (config, Some(edge_addr))
            }
            (None, Some(api)) => {
                let api = ApiClient::new(api).context("while reading --api")?;
                (ClientConfig::with_edges(self.identity, self.anchors, EdgeSource::EdgeMap(api)), None)
            }
            (None, None) => anyhow::bail!("give --edge HOST:PORT, or --api URL to choose from the edge map"),
        };
        if let Some(server_name) = &args.server_name {
            config.server_name = server_name.clone();
        }
        config.revocations = Arc::new(RwLock::new(self.revocations));
        config.connect_timeout = Duration::from_secs(args.connect_timeout_secs);
        configure(&mut config);
        let connected = Client::connect(config, self.directory).await;
        match (&args.edge, edge_addr) {
            (Some(edge), Some(addr)) => {
                connected.with_context(|| format!("while connecting to the edge at {edge} ({addr})"))
            }
            _ => connected.context("while connecting to an edge of the edge map"),
        }
    }
}

fn load_revocations(path: &Path, identity: &AgentIdentity) -> anyhow::Result<Revocations> {
    let context = || format!("while reading --crl {}", path.display());
    // The CRL must be signed by a CA in the agent's own chain: its org CA.
    let mut last_error = None;
    for issuer in identity.chain.iter().skip(1) {
        match dev::read_revocation_list(path, issuer) {
            Ok(list) => {
                let mut revocations = Revocations::default();
                revocations.extend_from(&list);
                return Ok(revocations);
            }
            Err(error) => last_error = Some(error),
        }
    }
    match last_error {
        Some(error) => Err(error).with_context(context),
        None => anyhow::bail!("{}: the agent's chain has no CA to check it against", context()),
    }
}

/// Resolves HOST:PORT (a name or an IP address) to the first address found.
pub async fn resolve(edge: &str) -> anyhow::Result<SocketAddr> {
    let context = || format!("while resolving --edge {edge:?} (expected HOST:PORT, e.g. localhost:4433)");
    let mut addresses = tokio::net::lookup_host(edge).await.with_context(context)?;
    addresses.next().with_context(|| format!("{}: no address found", context()))
}

/// The host of HOST:PORT when it is a name; [`DEFAULT_SERVER_NAME`] for IP addresses.
fn default_server_name(edge: &str) -> String {
    let host = edge.rsplit_once(':').map_or(edge, |(host, _port)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.parse::<IpAddr>().is_ok() { DEFAULT_SERVER_NAME.to_owned() } else { host.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_is_the_host_unless_it_is_an_ip_address() {
        assert_eq!(default_server_name("edge.example.net:4433"), "edge.example.net");
        assert_eq!(default_server_name("localhost:4433"), "localhost");
        assert_eq!(default_server_name("127.0.0.1:4433"), "localhost");
        assert_eq!(default_server_name("[::1]:4433"), "localhost");
    }

    #[tokio::test]
    async fn edges_resolve_by_name_or_address() {
        assert_eq!(resolve("127.0.0.1:4433").await.unwrap(), "127.0.0.1:4433".parse().unwrap());
        assert_eq!(resolve("localhost:4433").await.unwrap().port(), 4433);
        let error = resolve("no-port-here").await.unwrap_err();
        assert!(format!("{error:#}").contains("HOST:PORT"), "{error:#}");
    }
}

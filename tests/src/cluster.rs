//! A real control plane (with its gRPC service for edges) and edges enrolled with it
//! through `molt-edge enroll`, each a process on loopback; agents certified by the
//! control plane's CA. Used by the end-to-end tests of the edge's control link and of
//! edge-to-edge routing.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use molt_protocol::cert::{Certificate, Role, TrustAnchors};
use molt_protocol::keys::{EncryptionSecret, SigningKey};
use molt_protocol::request::{AGENT_PROOF_DOMAIN, possession_message};
use molt_protocol::{EdgeId, UnixMillis};
use molt_sdk::dev::AgentCard;
use molt_sdk::{AgentIdentity, Client, ClientConfig, Directory};
use serde_json::json;

use crate::control_plane::{Cli, ControlPlane, run};
use crate::{EdgeSetup, TestAgent, binary, free_ports, http_json};

/// Longest wait for anything eventual (registration, presence, reconnection).
pub const WAIT: Duration = Duration::from_secs(20);

/// A control plane with gRPC and one org, in a temporary directory.
#[derive(Debug)]
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub cp: ControlPlane,
    pub org: String,
}

/// An edge enrolled with the cluster's control plane, not started yet.
#[derive(Clone, Debug)]
pub struct EnrolledEdge {
    pub edge_id: EdgeId,
    pub setup: EdgeSetup,
    /// Where other edges link to it, when it was enrolled with `[federation]`.
    pub peer_addr: Option<SocketAddr>,
    /// The roots agents check it against.
    pub anchors: Arc<TrustAnchors>,
}

impl Cluster {
    pub fn start() -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("cp"))?;
        let cp = ControlPlane::start_with_grpc(&dir.path().join("cp"))?;
        let (status, org) = http_json(cp.addr(), "POST", "/v1/orgs", Some(&cp.token), Some(&json!({"name": "acme"})))?;
        anyhow::ensure!(status == 201, "creating the org answered {status}: {org}");
        let org = org["id"].as_str().context("org id")?.to_owned();
        Ok(Cluster { dir, cp, org })
    }

    pub fn cli(&self) -> Cli {
        Cli { api: self.cp.url(), token: Some(self.cp.token.clone()), dir: self.dir.path().to_owned() }
    }

    /// Enrolls an edge named `name` in `region` with a token made by
    /// `molt enrollment-token create` (plus `token_flags`), gives it free loopback ports,
    /// and appends `link` to its `[control_plane]` section. With `federation`, the edge
    /// also gets a `[federation]` section on a free port, followed by `federation_extra`.
    pub fn enroll(
        &self,
        name: &str,
        region: &str,
        token_flags: &[&str],
        link: &str,
        federation: Option<&str>,
    ) -> anyhow::Result<EnrolledEdge> {
        let mut create = vec!["enrollment-token", "create", "--org", &self.org, "--region", region];
        create.extend_from_slice(token_flags);
        let created = self.cli().json(&create)?;
        anyhow::ensure!(created["status"] == "active", "token: {created}");

        let edge_dir = self.dir.path().join(name);
        let grpc_addr = self.cp.grpc_addr.context("the control plane serves no gRPC")?.to_string();
        let mut enroll = std::process::Command::new(binary("molt-edge"));
        enroll.args(["enroll", "--control-plane", &format!("http://{}", self.cp.addr())]);
        enroll.args(["--token", created["token"].as_str().context("token")?]);
        enroll.args(["--grpc-addr", &grpc_addr]);
        enroll.arg("--dir").arg(&edge_dir);
        let (status, stdout, stderr) = run(enroll)?;
        if !status.success() {
            bail!("molt-edge enroll: {stdout}{stderr}");
        }

        // The stub has no ports; give it free loopback ones, and the test's settings.
        let config = edge_dir.join("edge.toml");
        let (quic_port, admin_port) = free_ports();
        let text = std::fs::read_to_string(&config)?.replace(
            "[edge]\n",
            &format!("[edge]\nlisten_addr = \"127.0.0.1:{quic_port}\"\nadmin_addr = \"127.0.0.1:{admin_port}\"\n"),
        );
        let (federation_section, peer_addr) = match federation {
            Some(extra) => {
                let port = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                (format!("\n[federation]\nlisten_addr = \"{addr}\"\n{extra}\n"), Some(addr))
            }
            None => (String::new(), None),
        };
        std::fs::write(&config, format!("{text}{link}\n{federation_section}"))?;
        let chain = read_chain(&edge_dir.join("edge.pem"))?;
        let Role::Edge(edge_id) = chain[0].role() else { bail!("enrolled as {:?}", chain[0].role()) };
        let anchors = std::fs::read_to_string(edge_dir.join("trust-anchors.pem"))?;
        let anchors = Arc::new(TrustAnchors::from_pem(&anchors)?);
        let setup = EdgeSetup {
            config,
            quic_addr: SocketAddr::from(([127, 0, 0, 1], quic_port)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        };
        Ok(EnrolledEdge { edge_id, setup, peer_addr, anchors })
    }

    /// An agent with a certificate from the control plane's CA, and its serial.
    pub fn agent(&self, name: &str) -> anyhow::Result<(TestAgent, String)> {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let now = UnixMillis::now_from_system();
        let signature = key.sign(&possession_message(AGENT_PROOF_DOMAIN, &self.org, &key.public_key(), now));
        let body = json!({
            "public_key": hex::encode(key.public_key().as_bytes()),
            "timestamp_ms": now.0,
            "signature": hex::encode(signature.0),
        });
        let path = format!("/v1/orgs/{}/agents/certificates", self.org);
        let (status, issued) = http_json(self.cp.addr(), "POST", &path, Some(&self.cp.token), Some(&body))?;
        anyhow::ensure!(status == 201, "issuing answered {status}: {issued}");
        let chain = Certificate::chain_from_pem(issued["chain_pem"].as_str().context("chain_pem")?)?;
        let identity = Arc::new(AgentIdentity::new(chain, key, EncryptionSecret::generate(&mut rand::rngs::OsRng))?);
        let card = AgentCard::from_identity(&identity, now);
        let agent = TestAgent { dir: self.dir.path().join(name), identity, card };
        Ok((agent, issued["serial"].as_str().context("serial")?.to_owned()))
    }

    /// Revokes a certificate through the admin API.
    pub fn revoke(&self, serial: &str) -> anyhow::Result<()> {
        let path = format!("/v1/certificates/{serial}/revoke");
        let body = json!({ "reason": "key_compromise" });
        let (status, revoked) = http_json(self.cp.addr(), "POST", &path, Some(&self.cp.token), Some(&body))?;
        anyhow::ensure!(status == 200, "revoking answered {status}: {revoked}");
        Ok(())
    }

    /// Polls the control plane's database until `query` prints `expected`.
    pub async fn until_sql(&self, query: &str, expected: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.cp.sql(query).unwrap_or_default();
            if got.trim() == expected {
                return;
            }
            assert!(Instant::now() < deadline, "{query} printed {got:?}, expected {expected:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the control plane names `edge` as `agent`'s home edge.
    pub async fn until_present(&self, agent: &TestAgent, edge: &EnrolledEdge) {
        let query = format!("SELECT edge_id FROM edge_presence WHERE agent_id = '{}'", agent.id());
        self.until_sql(&query, &edge.edge_id.to_string()).await;
    }
}

impl EnrolledEdge {
    /// An SDK client for `agent` on this edge, knowing the keys of `peers`, reconnecting
    /// fast.
    pub async fn connect(&self, agent: &TestAgent, peers: &[&TestAgent]) -> anyhow::Result<Client> {
        let directory = Directory::new();
        for peer in peers.iter().chain([&agent]) {
            directory.insert(peer.id(), peer.identity.peer_keys());
        }
        let mut config = ClientConfig::new(agent.identity.clone(), self.anchors.clone(), self.setup.quic_addr);
        config.backoff_min = Duration::from_millis(100);
        config.backoff_max = Duration::from_secs(1);
        Ok(Client::connect(config, directory).await?)
    }

    /// The chain file the edge serves.
    pub fn chain_path(&self) -> PathBuf {
        self.setup.config.with_file_name("edge.pem")
    }
}

pub fn read_chain(path: &Path) -> anyhow::Result<Vec<Certificate>> {
    Ok(Certificate::chain_from_pem(&std::fs::read_to_string(path)?)?)
}

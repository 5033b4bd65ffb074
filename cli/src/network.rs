//! A local Molt network: a control plane on SQLite running in this process, and two edges
//! in different regions, each a child process of this binary ([`crate::run_edge`]),
//! enrolled with the control plane and linked to each other. `molt up` runs one until
//! Ctrl-C; `molt demo` runs a fresh one through a scenario.
//!
//! Everything lives under one directory, made on the first start and reused later:
//!
//! ```text
//! control-plane/control-plane.toml  its addresses (yours to edit)
//! control-plane/molt.db             the control plane's SQLite database (+ molt.db.kek)
//! control-plane/admin.token         an admin key with every scope, mode 0600
//! control-plane/org.json            the org the edges and agents belong to
//! edges/NAME/                       an enrolled edge: key, certificate, edge.toml, data/
//! root.pem                          the root agents trust (copied from the enrollment)
//! agents/                           where the banner suggests creating agents
//! ```
//!
//! Starting is one pass that makes or checks each piece in dependency order: the control
//! plane (its database, CA and admin key), the org, each edge's enrollment and config, then
//! the edge processes. An edge is ready when it has printed its [`Ready`] line and the
//! control plane's edge map lists it. Stopping runs the other way: each edge gets end of
//! file on its standard input and drains, then the control plane stops.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use molt_control_plane::clock::SystemClock;
use molt_control_plane::config::{self as cp_config, Config as ControlPlaneConfig, Overrides};
use molt_edge::enroll::{self, EnrollError, EnrollOptions, KeyPlan};
use molt_protocol::{EdgeId, UnixMillis};
use molt_sdk::api::ApiClient;
use molt_sdk::api::enrollment::NewEnrollmentToken;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdin};

use crate::run_edge::{self, Ready};

const CONTROL_PLANE_DIR: &str = "control-plane";
const CONTROL_PLANE_CONFIG_FILE: &str = "control-plane.toml";
const DATABASE_FILE: &str = "molt.db";
const ADMIN_TOKEN_FILE: &str = "admin.token";
const ORG_FILE: &str = "org.json";
const EDGES_DIR: &str = "edges";
const AGENTS_DIR: &str = "agents";
const ROOT_FILE: &str = "root.pem";
const EDGE_LOG_FILE: &str = "edge.log";

/// Name of the org a new network creates.
pub const ORG_NAME: &str = "local";
/// Name of the admin key made when the saved one is missing.
const ADMIN_KEY_NAME: &str = "molt-up";
/// Longest wait for an edge process to say it is ready.
pub const EDGE_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for an edge process to drain and exit once asked to; then it is killed.
/// Above the edge's default drain timeout (5 s).
pub const EDGE_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for the control plane's edge map to list every edge after they start.
pub const EDGE_MAP_TIMEOUT: Duration = Duration::from_secs(20);
/// Lifetime of the enrollment token made for each new edge: it is used at once.
const ENROLLMENT_TOKEN_TTL_SECS: u64 = 600;

/// One edge of the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeSpec {
    /// Directory name under `edges/`, and the label on its log lines.
    pub name: &'static str,
    pub region: &'static str,
}

/// The network's edges, in start order.
pub const EDGES: [EdgeSpec; 2] =
    [EdgeSpec { name: "west", region: "local-west" }, EdgeSpec { name: "east", region: "local-east" }];

/// Which ports a new network's components listen on (all on 127.0.0.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ports {
    /// API 8080 (the CLI's default `--api`), gRPC 8081; edge QUIC 4433/4434, admin
    /// 9090/9091, edge links 4533/4534.
    Standard,
    /// BASE for the API, then consecutive ports: gRPC, and per edge QUIC, admin, link.
    Base(u16),
    /// Whatever the kernel gives (for `molt demo` and tests).
    Ephemeral,
}

/// Addresses a new network's files are written with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addresses {
    pub api: SocketAddr,
    pub grpc: SocketAddr,
    pub edges: [EdgeAddresses; EDGES.len()],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeAddresses {
    pub quic: SocketAddr,
    pub admin: SocketAddr,
    pub link: SocketAddr,
}

impl Ports {
    pub fn addresses(self) -> anyhow::Result<Addresses> {
        let at = |port: u16| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        Ok(match self {
            Ports::Standard => Addresses {
                api: at(8080),
                grpc: at(8081),
                edges: [
                    EdgeAddresses { quic: at(4433), admin: at(9090), link: at(4533) },
                    EdgeAddresses { quic: at(4434), admin: at(9091), link: at(4534) },
                ],
            },
            Ports::Base(base) => {
                let port = |offset: u16| {
                    base.checked_add(offset)
                        .map(at)
                        .with_context(|| format!("--port-base {base}: the network needs 8 ports from it, up to 65535"))
                };
                Addresses {
                    api: port(0)?,
                    grpc: port(1)?,
                    edges: [
                        EdgeAddresses { quic: port(2)?, admin: port(3)?, link: port(4)? },
                        EdgeAddresses { quic: port(5)?, admin: port(6)?, link: port(7)? },
                    ],
                }
            }
            Ports::Ephemeral => {
                let edge = EdgeAddresses { quic: at(0), admin: at(0), link: at(0) };
                Addresses { api: at(0), grpc: at(0), edges: [edge; EDGES.len()] }
            }
        })
    }
}

/// Where edge processes' logs go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeLogs {
    /// To this process's stderr, each line labelled with the edge's name.
    Labelled,
    /// To `edges/NAME/edge.log`.
    Files,
}

#[derive(Clone, Debug)]
pub struct NetworkOptions {
    pub dir: PathBuf,
    /// Used only for files made now; a reused network keeps the addresses in its files.
    pub ports: Ports,
    pub edge_logs: EdgeLogs,
}

/// What a start did with one piece of the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Provenance {
    Created,
    Reused,
    /// Made again, for the given reason.
    Replaced(String),
}

impl Provenance {
    pub fn describe(&self) -> String {
        match self {
            Provenance::Created => "created now".to_owned(),
            Provenance::Reused => "reused".to_owned(),
            Provenance::Replaced(reason) => format!("made again: {reason}"),
        }
    }
}

/// Where each piece lives under the network directory.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn control_plane_dir(&self) -> PathBuf {
        self.root.join(CONTROL_PLANE_DIR)
    }

    pub fn control_plane_config(&self) -> PathBuf {
        self.control_plane_dir().join(CONTROL_PLANE_CONFIG_FILE)
    }

    pub fn database(&self) -> PathBuf {
        self.control_plane_dir().join(DATABASE_FILE)
    }

    pub fn admin_token(&self) -> PathBuf {
        self.control_plane_dir().join(ADMIN_TOKEN_FILE)
    }

    fn org_file(&self) -> PathBuf {
        self.control_plane_dir().join(ORG_FILE)
    }

    pub fn edge_dir(&self, name: &str) -> PathBuf {
        self.root.join(EDGES_DIR).join(name)
    }

    pub fn edge_log(&self, name: &str) -> PathBuf {
        self.edge_dir(name).join(EDGE_LOG_FILE)
    }

    pub fn root_pem(&self) -> PathBuf {
        self.root.join(ROOT_FILE)
    }

    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.root.join(AGENTS_DIR).join(name)
    }
}

/// The org a network's edges and agents belong to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalOrg {
    pub id: String,
    pub name: String,
}

/// A running network.
#[derive(Debug)]
pub struct Network {
    pub layout: Layout,
    pub control_plane: ControlPlane,
    pub org: LocalOrg,
    pub org_provenance: Provenance,
    pub edges: Vec<EdgeProcess>,
}

impl Network {
    /// Makes or checks every piece under `options.dir` and starts them all.
    pub async fn start(options: &NetworkOptions) -> anyhow::Result<Network> {
        let layout = Layout { root: options.dir.clone() };
        for dir in [layout.control_plane_dir(), layout.root.join(EDGES_DIR), layout.root.join(AGENTS_DIR)] {
            std::fs::create_dir_all(&dir).with_context(|| format!("while creating {}", dir.display()))?;
        }
        let addresses = options.ports.addresses()?;
        let control_plane = ControlPlane::start(&layout, &addresses).await?;
        let api = control_plane.admin_client()?;
        let (org, org_provenance) = ensure_org(&api, &layout).await?;
        let mut edges = Vec::with_capacity(EDGES.len());
        for (spec, edge_addresses) in EDGES.iter().zip(addresses.edges) {
            let prepared = ensure_edge(&api, &control_plane, &org, spec, edge_addresses, &layout).await?;
            edges.push(EdgeProcess::spawn(prepared, &layout, options.edge_logs).await?);
        }
        copy_root(&layout, &edges[0])?;
        let network = Network { layout, control_plane, org, org_provenance, edges };
        network.until_mapped().await?;
        Ok(network)
    }

    pub fn edge(&self, name: &str) -> Option<&EdgeProcess> {
        self.edges.iter().find(|edge| edge.spec.name == name)
    }

    pub fn edge_mut(&mut self, name: &str) -> Option<&mut EdgeProcess> {
        self.edges.iter_mut().find(|edge| edge.spec.name == name)
    }

    /// Waits until the control plane's edge map lists every running edge: until then
    /// agents choosing from the map would not see it.
    async fn until_mapped(&self) -> anyhow::Result<()> {
        let api = self.control_plane.public_client()?;
        let deadline = Instant::now() + EDGE_MAP_TIMEOUT;
        loop {
            let listed = match api.edge_map().await {
                Ok(map) => map.edges.into_iter().map(|entry| entry.edge_id).collect::<Vec<_>>(),
                Err(_) => Vec::new(),
            };
            let missing: Vec<&EdgeProcess> =
                self.edges.iter().filter(|edge| !listed.contains(&edge.ready.edge_id.to_string())).collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let names: Vec<String> = missing.iter().map(|edge| edge.spec.name.to_owned()).collect();
                bail!(
                    "the control plane's edge map still lacks {} after {} s: the edge did not register over gRPC \
                     (see its log)",
                    names.join(" and "),
                    EDGE_MAP_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the edges (each drains), then the control plane.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for edge in self.edges.iter_mut().rev() {
            if let Err(error) = edge.stop().await {
                problems.push(format!("{}: {error:#}", edge.spec.name));
            }
        }
        self.control_plane.stop().await;
        if problems.is_empty() { Ok(()) } else { bail!("stopping the edges: {}", problems.join("; ")) }
    }
}

/// The control plane, served from this process.
#[derive(Debug)]
pub struct ControlPlane {
    pub api_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub config_path: PathBuf,
    pub database: Provenance,
    /// How the saved admin token came to be.
    pub admin_token: Provenance,
    token: String,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
    started: molt_control_plane::Started,
}

impl ControlPlane {
    async fn start(layout: &Layout, addresses: &Addresses) -> anyhow::Result<ControlPlane> {
        let config_path = layout.control_plane_config();
        if !config_path.exists() {
            write_new(&config_path, &control_plane_config_text(addresses), false)?;
        }
        let config = load_control_plane_config(&config_path, &layout.database())?;
        let database = if layout.database().exists() { Provenance::Reused } else { Provenance::Created };
        let started =
            molt_control_plane::start(&config.database, &config.ca, config.grpc_listen_addr, Arc::new(SystemClock))
                .await
                .with_context(|| format!("while starting the control plane on {}", layout.database().display()))?;
        let grpc_addr = started
            .grpc
            .as_ref()
            .map(molt_control_plane::grpc::GrpcServer::local_addr)
            .with_context(|| format!("{} sets no grpc_listen_addr: edges need it", config_path.display()))?;
        let (token, admin_token) = ensure_admin_token(layout, &started).await?;
        let listener = tokio::net::TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("while binding the control plane's API to {}", config.listen_addr))?;
        let api_addr = listener.local_addr().context("while reading the API's address")?;
        let state = started.state.clone().with_key_policy(config.keys);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(molt_control_plane::api::serve(listener, state, async {
            let _ = stopped.await;
        }));
        Ok(ControlPlane { api_addr, grpc_addr, config_path, database, admin_token, token, stop, serving, started })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    pub fn admin_client(&self) -> anyhow::Result<ApiClient> {
        Ok(self.public_client()?.with_admin_token(self.token.clone()))
    }

    /// The edge that reported `agent` as connected, per the control plane's database.
    pub async fn reported_home_edge(&self, agent: molt_protocol::AgentId) -> anyhow::Result<Option<String>> {
        molt_control_plane::grpc::reported_home_edge(&self.started.state.db, agent)
            .await
            .context("while reading presence")
    }

    pub fn public_client(&self) -> anyhow::Result<ApiClient> {
        ApiClient::new(&self.url()).context("while making an API client for the local control plane")
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        match self.serving.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "the control plane's API stopped with an error"),
            Err(error) => tracing::warn!(%error, "the control plane's API task failed"),
        }
        let molt_control_plane::Started { state, grpc, .. } = self.started;
        if let Some(grpc) = grpc {
            grpc.shutdown();
        }
        state.db.close().await;
    }
}

/// The control-plane.toml of a new network. The database is not named in it: `up` puts it
/// beside the file unless the file says otherwise.
fn control_plane_config_text(addresses: &Addresses) -> String {
    format!(
        "# The local control plane's settings, written by `molt up`, which keeps them: edit freely.\n\
         # Keys as in molt-control-plane's configuration file. Without [database] url, the\n\
         # database is {DATABASE_FILE} beside this file (SQLite). Logs: RUST_LOG.\n\n\
         listen_addr = \"{api}\"\n\
         grpc_listen_addr = \"{grpc}\"\n",
        api = addresses.api,
        grpc = addresses.grpc,
    )
}

/// Loads control-plane.toml; without a database URL in it, the SQLite file `database`.
fn load_control_plane_config(path: &Path, database: &Path) -> anyhow::Result<ControlPlaneConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("while reading {}", path.display()))?;
    let file = cp_config::parse_file(&text).map_err(|message| anyhow::anyhow!("{}: {message}", path.display()))?;
    let database_url = match file.database.url {
        Some(_) => None,
        None => {
            let absolute =
                std::path::absolute(database).with_context(|| format!("while resolving {}", database.display()))?;
            Some(format!("sqlite:{}", absolute.display()))
        }
    };
    let overrides = Overrides { database_url, listen_addr: None };
    // The environment is not read: the network's files say everything.
    cp_config::load(Some(path), &BTreeMap::new(), &overrides)
        .with_context(|| format!("while loading {}", path.display()))
}

/// The admin token saved under the network directory: the bootstrap credential of a new
/// database, or a new admin key when the saved token is missing or no longer works.
async fn ensure_admin_token(
    layout: &Layout,
    started: &molt_control_plane::Started,
) -> anyhow::Result<(String, Provenance)> {
    let path = layout.admin_token();
    if let Some(token) = &started.bootstrap_token {
        write_new(&path, token.expose(), true)?;
        return Ok((token.expose().to_owned(), Provenance::Created));
    }
    let reason = match std::fs::read_to_string(&path) {
        Ok(saved) => {
            let saved = saved.trim().to_owned();
            let valid = match molt_control_plane::auth::AdminToken::parse(&saved) {
                Some(token) => {
                    matches!(started.state.db.admin_key_by_token(&token).await, Ok(Some(key)) if key.revoked_at.is_none())
                }
                None => false,
            };
            if valid {
                return Ok((saved, Provenance::Reused));
            }
            "the saved token is not a live admin key"
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => "the saved token was missing",
        Err(error) => return Err(error).with_context(|| format!("while reading {}", path.display())),
    };
    let name = molt_control_plane::model::AdminKeyName::new(ADMIN_KEY_NAME).context("admin key name")?;
    let scopes = molt_control_plane::auth::Scopes::all();
    let (_key, token) = started
        .state
        .db
        .create_admin_key(&name, &scopes, UnixMillis::now_from_system())
        .await
        .context("while creating an admin key for the network")?;
    write_new(&path, token.expose(), true)?;
    Ok((token.expose().to_owned(), Provenance::Replaced(reason.to_owned())))
}

/// The org saved in org.json, or a new one (with its CA).
async fn ensure_org(api: &ApiClient, layout: &Layout) -> anyhow::Result<(LocalOrg, Provenance)> {
    let path = layout.org_file();
    let provenance = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let saved: LocalOrg =
                serde_json::from_str(&text).with_context(|| format!("while reading {}", path.display()))?;
            match api.org(&saved.id).await {
                Ok(_) => {
                    api.create_org_ca(&saved.id).await.context("while checking the org's CA")?;
                    return Ok((saved, Provenance::Reused));
                }
                Err(error) if error.status() == Some(404) => {
                    Provenance::Replaced(format!("{} was not in the database", saved.id))
                }
                Err(error) => return Err(error).context("while reading the network's org"),
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Provenance::Created,
        Err(error) => return Err(error).with_context(|| format!("while reading {}", path.display())),
    };
    let created = api.create_org(ORG_NAME).await.with_context(|| format!("while creating the org {ORG_NAME:?}"))?;
    api.create_org_ca(&created.id).await.context("while creating the org's CA")?;
    let org = LocalOrg { id: created.id, name: created.name };
    // Invariant: two strings serialise.
    let text = serde_json::to_string_pretty(&org).expect("LocalOrg serialises");
    replace_file(&path, &text)?;
    Ok((org, provenance))
}

/// An edge's files, checked, with the config it will run with.
#[derive(Debug)]
struct PreparedEdge {
    spec: EdgeSpec,
    config_path: PathBuf,
    enrollment: Provenance,
}

/// Enrolls the edge unless its directory holds a usable enrollment with this control
/// plane; writes edge.toml when enrolling.
async fn ensure_edge(
    api: &ApiClient,
    control_plane: &ControlPlane,
    org: &LocalOrg,
    spec: &EdgeSpec,
    addresses: EdgeAddresses,
    layout: &Layout,
) -> anyhow::Result<PreparedEdge> {
    let dir = layout.edge_dir(spec.name);
    let url = control_plane.url();
    let (force, enrollment) = match enroll::existing_enrollment(&dir, &url).await {
        Ok(Some(enrolled)) => {
            return Ok(PreparedEdge { spec: *spec, config_path: enrolled.config, enrollment: Provenance::Reused });
        }
        Ok(None) => (false, Provenance::Created),
        Err(EnrollError::IdentityDamaged { detail, .. }) => (true, Provenance::Replaced(detail)),
        Err(EnrollError::IdentityExists { .. }) => {
            (true, Provenance::Replaced("it was enrolled with another control plane".to_owned()))
        }
        Err(error) => return Err(error).with_context(|| format!("while checking the edge in {}", dir.display())),
    };
    let request = NewEnrollmentToken {
        org_id: org.id.clone(),
        region: spec.region.to_owned(),
        ttl_secs: Some(ENROLLMENT_TOKEN_TTL_SECS),
        certificate_validity_secs: None,
    };
    let token = api
        .create_enrollment_token(&request)
        .await
        .with_context(|| format!("while creating an enrollment token for the edge {}", spec.name))?;
    let options = EnrollOptions {
        control_plane: url,
        token: token.token,
        grpc_addr: control_plane.grpc_addr,
        dir: dir.clone(),
        config: None,
        key: KeyPlan::File,
        force,
    };
    let enrolled = enroll::enroll(&options).await.with_context(|| format!("while enrolling the edge {}", spec.name))?;
    let stub = std::fs::read_to_string(&enrolled.config)
        .with_context(|| format!("while reading {}", enrolled.config.display()))?;
    replace_file(&enrolled.config, &edge_config_text(&stub, addresses))?;
    Ok(PreparedEdge { spec: *spec, config_path: enrolled.config, enrollment })
}

/// The enrollment's config stub with this network's addresses, the edge link and logging.
fn edge_config_text(stub: &str, addresses: EdgeAddresses) -> String {
    let with_addresses = stub.replacen(
        "[edge]\n",
        &format!("[edge]\nlisten_addr = \"{}\"\nadmin_addr = \"{}\"\n", addresses.quic, addresses.admin),
        1,
    );
    format!(
        "# Written by `molt up` after enrolling this edge with the local control plane; kept on\n\
         # later runs, so edit freely (`molt-edge config check FILE` checks it).\n\
         {with_addresses}\n\
         [federation]\n\
         listen_addr = \"{link}\"\n\n\
         [log]\n\
         format = \"text\"\n\
         level = \"info\"\n",
        link = addresses.link,
    )
}

/// An edge running as a child process.
#[derive(Debug)]
pub struct EdgeProcess {
    pub spec: EdgeSpec,
    pub ready: Ready,
    pub config_path: PathBuf,
    pub enrollment: Provenance,
    child: Child,
    /// Closing it asks the edge to stop.
    stdin: Option<ChildStdin>,
    /// Set once [`EdgeProcess::kill`] ended it on purpose.
    killed: bool,
}

impl EdgeProcess {
    async fn spawn(prepared: PreparedEdge, layout: &Layout, logs: EdgeLogs) -> anyhow::Result<EdgeProcess> {
        let name = prepared.spec.name;
        let program = std::env::current_exe().context("while finding this program to run the edges")?;
        let mut command = tokio::process::Command::new(program);
        command.arg(run_edge::SUBCOMMAND).arg("--config").arg(&prepared.config_path);
        command.stdin(Stdio::piped()).stdout(Stdio::piped());
        // Its own process group: Ctrl-C in the terminal reaches this process only, which
        // stops the edges in order.
        command.process_group(0).kill_on_drop(true);
        let log_path = layout.edge_log(name);
        match logs {
            EdgeLogs::Labelled => command.stderr(Stdio::piped()),
            EdgeLogs::Files => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_path)
                    .with_context(|| format!("while opening {}", log_path.display()))?;
                command.stderr(file)
            }
        };
        let mut child = command.spawn().with_context(|| format!("while starting the edge {name}"))?;
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(label_lines(name, stderr));
        }
        let stdout = child.stdout.take().context("the edge's stdout")?;
        let where_logs = match logs {
            EdgeLogs::Labelled => "its log lines above".to_owned(),
            EdgeLogs::Files => log_path.display().to_string(),
        };
        let ready = match tokio::time::timeout(EDGE_START_TIMEOUT, first_line(stdout)).await {
            Ok(Ok(Some(line))) => serde_json::from_str::<Ready>(&line)
                .with_context(|| format!("the edge {name} announced itself with {line:?}"))?,
            Ok(Ok(None)) => {
                let status = child.wait().await.ok();
                bail!(
                    "the edge {name} exited before it was ready ({}); see {where_logs}",
                    status.map_or_else(|| "status unknown".to_owned(), |status| status.to_string())
                )
            }
            Ok(Err(error)) => return Err(error).with_context(|| format!("while reading the edge {name}'s output")),
            Err(_) => bail!("the edge {name} was not ready after {} s; see {where_logs}", EDGE_START_TIMEOUT.as_secs()),
        };
        let stdin = child.stdin.take();
        Ok(EdgeProcess {
            spec: prepared.spec,
            ready,
            config_path: prepared.config_path,
            enrollment: prepared.enrollment,
            child,
            stdin,
            killed: false,
        })
    }

    pub fn edge_id(&self) -> EdgeId {
        self.ready.edge_id
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Asks the edge to stop (it drains its agents) and waits; kills it after
    /// [`EDGE_STOP_TIMEOUT`].
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if self.killed {
            return Ok(());
        }
        drop(self.stdin.take());
        match tokio::time::timeout(EDGE_STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!("it exited with {status}"),
            Ok(Err(error)) => Err(error).context("while waiting for it to exit"),
            Err(_) => {
                self.kill().await?;
                bail!("it did not stop within {} s and was killed", EDGE_STOP_TIMEOUT.as_secs())
            }
        }
    }

    /// Kills the edge with SIGKILL, as a crash would, and reaps it.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await.context("while killing the edge")?;
        self.killed = true;
        Ok(())
    }
}

async fn first_line(stdout: tokio::process::ChildStdout) -> std::io::Result<Option<String>> {
    BufReader::new(stdout).lines().next_line().await
}

/// Copies an edge's log lines to stderr, each after the edge's name.
async fn label_lines(name: &'static str, stderr: tokio::process::ChildStderr) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("{name:>4} | {line}");
    }
}

/// The root the edges were enrolled under, where agents find it.
fn copy_root(layout: &Layout, edge: &EdgeProcess) -> anyhow::Result<()> {
    let anchors = edge.config_path.with_file_name(enroll::ANCHORS_FILE);
    let text = std::fs::read_to_string(&anchors).with_context(|| format!("while reading {}", anchors.display()))?;
    if std::fs::read_to_string(layout.root_pem()).ok().as_deref() != Some(text.as_str()) {
        replace_file(&layout.root_pem(), &text)?;
    }
    Ok(())
}

/// Writes a file that must not exist yet; `secret` makes it 0600.
fn write_new(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    if secret {
        options.mode(0o600);
    }
    options
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()).and_then(|()| file.sync_all()))
        .with_context(|| format!("while writing {}", path.display()))
}

/// Replaces a file whole: a temporary file beside it, then a rename.
fn replace_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temporary);
    write_new(&temporary, text, false)?;
    std::fs::rename(&temporary, path).with_context(|| format!("while replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_layouts_give_distinct_ports_and_refuse_overflow() {
        for ports in [Ports::Standard, Ports::Base(20000)] {
            let addresses = ports.addresses().unwrap();
            let mut all = vec![addresses.api, addresses.grpc];
            for edge in addresses.edges {
                all.extend([edge.quic, edge.admin, edge.link]);
            }
            let count = all.len();
            all.sort();
            all.dedup();
            assert_eq!(all.len(), count, "{ports:?} reuses a port");
            assert!(all.iter().all(|addr| addr.ip().is_loopback()));
        }
        assert_eq!(Ports::Standard.addresses().unwrap().api.port(), 8080, "the CLI's default --api");
        assert_eq!(Ports::Base(65528).addresses().unwrap().edges[1].link.port(), 65535);
        let error = Ports::Base(65529).addresses().unwrap_err();
        assert!(error.to_string().contains("8 ports"), "{error}");
    }

    #[test]
    fn the_edge_config_is_the_stub_with_addresses_a_link_and_logging() {
        let stub = enroll::config_stub("local-west", "127.0.0.1:8081".parse().unwrap());
        let addresses = Ports::Base(20000).addresses().unwrap().edges[0];
        let text = edge_config_text(&stub, addresses);
        let config = molt_edge::config::parse(&text, Path::new("/srv/west")).unwrap();
        assert_eq!(config.edge.listen_addr, addresses.quic);
        assert_eq!(config.edge.admin_addr, addresses.admin);
        assert_eq!(config.edge.region.as_str(), "local-west");
        assert_eq!(config.federation.expect("a link").listen_addr, addresses.link);
        assert_eq!(config.control_plane.expect("a control plane").grpc_addr, "127.0.0.1:8081".parse().unwrap());
    }

    #[test]
    fn the_control_plane_config_names_its_addresses_and_the_database_beside_it() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join(CONTROL_PLANE_CONFIG_FILE);
        let addresses = Ports::Base(20000).addresses().unwrap();
        std::fs::write(&path, control_plane_config_text(&addresses)).unwrap();
        let database = temp.path().join(DATABASE_FILE);
        let config = load_control_plane_config(&path, &database).unwrap();
        assert_eq!(config.listen_addr, addresses.api);
        assert_eq!(config.grpc_listen_addr, Some(addresses.grpc));
        assert_eq!(config.database.url, format!("sqlite:{}", database.display()));

        std::fs::write(&path, "listen_addr = \"127.0.0.1:1\"\n[database]\nurl = \"sqlite:/elsewhere.db\"\n").unwrap();
        assert_eq!(load_control_plane_config(&path, &database).unwrap().database.url, "sqlite:/elsewhere.db");
        std::fs::write(&path, "listen_adr = 1\n").unwrap();
        let error = load_control_plane_config(&path, &database).unwrap_err();
        assert!(format!("{error:#}").contains("listen_adr"), "{error:#}");
    }
}

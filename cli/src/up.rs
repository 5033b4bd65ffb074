//! `molt up`: a local Molt network on embedded defaults, with no other setup.
//!
//! The model: one network directory (default `.molt`) holds every component's files, each
//! made on the first run and reused on later ones:
//!
//! ```text
//! ca/            the development CA (see `molt dev-ca`); ca/root.pem is everyone's trust anchor
//! edge/          the edge's key, certificate and edge.toml; edge/data/ is its offline buffer
//! agents/NAME/   where the banner suggests creating agents (`up` itself never touches it)
//! ```
//!
//! `up` runs in two phases. [`prepare`] makes or checks the files and loads every
//! component's configuration, synchronously and without touching the network. [`serve`]
//! then starts the components in this process, prints the banner, and stops them all on
//! Ctrl-C or SIGTERM. Today the network is one edge; more edges and a control plane become
//! more fields of [`LocalNetwork`] and [`Running`], prepared and started the same way.

use std::fmt::Write as _;
use std::future::Future;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use molt_edge::config::{EdgeConfig, LogConfig, LogFormat, Region};
use molt_edge::{Edge, EdgeHandle};
use molt_protocol::UnixMillis;
use molt_sdk::dev::{self, CARD_FILE, CRL_FILE, DevCa, EDGE_CHAIN_FILE, EDGE_KEY_FILE, ORG_CERT_FILE, ROOT_CERT_FILE};

/// Network directory when `--dir` is not given.
pub const DEFAULT_DIR: &str = ".molt";
/// QUIC address of the edge when neither `--listen` nor edge.toml says otherwise: loopback
/// only, since this is a development network.
pub const DEFAULT_LISTEN_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 4433));
/// Admin HTTP address of the edge when neither `--admin` nor edge.toml says otherwise.
pub const DEFAULT_ADMIN_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9090));
/// Region of the edge when neither `--region` nor edge.toml says otherwise.
pub const DEFAULT_REGION: &str = "local";
/// The DNS name in the edge certificate; `molt send` and `molt listen` use it as the TLS
/// server name when `--edge` is an IP address.
pub const EDGE_DNS_NAME: &str = "localhost";

const CA_DIR: &str = "ca";
const EDGE_DIR: &str = "edge";
const AGENTS_DIR: &str = "agents";
const EDGE_CONFIG_FILE: &str = "edge.toml";

#[derive(Debug, Args)]
#[command(
    about = "Run a local Molt network (a development CA and an edge) until Ctrl-C",
    long_about = "Run a local Molt network on built-in defaults, with no other setup: a development CA and \
one edge relay, in this process, until Ctrl-C or SIGTERM (then the edge drains gracefully).

On the first run, DIR (default .molt) gets:
  ca/        a development CA (as `molt dev-ca init`); ca/root.pem is the trust anchor agents use
  edge/      the edge's key and certificate (for DNS name localhost) and edge.toml, its configuration
  edge/data  the edge's durable offline buffer
Later runs reuse all of it, so agents, certificates and buffered messages survive restarts. \
edge.toml is yours to edit; --listen, --admin and --region override it for one run. The edge \
certificate is reissued if it expired or the CA was replaced.

Once the edge is up, it prints where it listens (QUIC, and the admin /healthz and /metrics) and \
the commands that create two agents and send a message between them. Logs go to stderr at \
edge.toml's [log] level; RUST_LOG overrides it.

Examples:
  molt up
  molt up --dir /tmp/molt --listen 127.0.0.1:5433 --admin 127.0.0.1:9190
  RUST_LOG=debug molt up --region eu-west"
)]
pub struct UpArgs {
    /// Network directory: CA, edge files and offline buffer; made on the first run, reused later.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// UDP address the edge accepts agents on [default: 127.0.0.1:4433, or edge.toml's once written].
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<SocketAddr>,
    /// TCP address of the edge's /healthz and /metrics [default: 127.0.0.1:9090, or edge.toml's once written].
    #[arg(long, value_name = "IP:PORT")]
    pub admin: Option<SocketAddr>,
    /// Region the edge serves [default: local, or edge.toml's once written].
    #[arg(long, value_name = "REGION")]
    pub region: Option<Region>,
}

pub fn run(args: &UpArgs) -> anyhow::Result<()> {
    let network = prepare(args, UnixMillis::now_from_system())?;
    init_logging(&network.edge.config.log);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("while starting the async runtime")?;
    runtime.block_on(serve(network, shutdown_signal()))
}

/// What a preparation step did with a component's files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Provenance {
    Created,
    Reused,
    /// Replaced, for the given reason.
    Reissued(&'static str),
}

/// Where each component's files live under the network directory.
#[derive(Clone, Debug)]
struct Layout {
    root: PathBuf,
}

/// The network's files, made and checked; nothing runs yet.
#[derive(Debug)]
struct LocalNetwork {
    layout: Layout,
    ca: Provenance,
    edge: LocalEdge,
}

/// An edge's files and its configuration as it will run.
#[derive(Debug)]
struct LocalEdge {
    dir: PathBuf,
    config_path: PathBuf,
    config: EdgeConfig,
    certificate: Provenance,
    config_file: Provenance,
    /// Flags whose values differ from edge.toml and replace them for this run.
    overrides: Vec<&'static str>,
}

/// The started components; stopped together.
#[derive(Debug)]
struct Running {
    edge: EdgeHandle,
}

impl Layout {
    fn ca_dir(&self) -> PathBuf {
        self.root.join(CA_DIR)
    }

    fn edge_dir(&self) -> PathBuf {
        self.root.join(EDGE_DIR)
    }

    fn agent_dir(&self, name: &str) -> PathBuf {
        self.root.join(AGENTS_DIR).join(name)
    }
}

impl Running {
    async fn start(network: &LocalNetwork) -> anyhow::Result<Running> {
        let edge = Edge::start(network.edge.config.clone())
            .await
            .with_context(|| format!("while starting the edge from {}", network.edge.config_path.display()))?;
        Ok(Running { edge })
    }

    /// Stops components in the reverse order of starting them.
    async fn run_until(self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.edge.run_until(stop).await.context("while stopping the edge")
    }
}

/// Makes whatever is missing under `--dir` and loads the configuration.
fn prepare(args: &UpArgs, now: UnixMillis) -> anyhow::Result<LocalNetwork> {
    let layout = Layout { root: args.dir.clone() };
    let (ca, ca_provenance) = prepare_ca(&layout.ca_dir(), now)?;
    let edge = prepare_edge(&layout.edge_dir(), &ca, args, now)?;
    Ok(LocalNetwork { layout, ca: ca_provenance, edge })
}

/// Starts the network, prints the banner, and stops everything once `stop` resolves.
async fn serve(network: LocalNetwork, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    let running = Running::start(&network).await?;
    print!("{}", banner(&network, &running));
    running.run_until(stop).await?;
    eprintln!("molt up: stopped");
    Ok(())
}

fn prepare_ca(dir: &Path, now: UnixMillis) -> anyhow::Result<(DevCa, Provenance)> {
    // `DevCa::init` writes root.pem last: its presence marks a complete CA.
    if dir.join(ROOT_CERT_FILE).exists() {
        let ca = DevCa::load(dir).with_context(|| format!("while opening the development CA in {}", dir.display()))?;
        return Ok((ca, Provenance::Reused));
    }
    let ca = DevCa::init(dir, now).with_context(|| format!("while creating a development CA in {}", dir.display()))?;
    Ok((ca, Provenance::Created))
}

fn prepare_edge(dir: &Path, ca: &DevCa, args: &UpArgs, now: UnixMillis) -> anyhow::Result<LocalEdge> {
    let certificate = ensure_edge_certificate(dir, ca, now)?;
    let config_path = dir.join(EDGE_CONFIG_FILE);
    let config_file = if config_path.exists() {
        Provenance::Reused
    } else {
        write_edge_config(&config_path, args)?;
        Provenance::Created
    };
    let mut config = molt_edge::config::load(&config_path)
        .with_context(|| format!("while loading the edge configuration {}", config_path.display()))?;
    let overrides = apply_overrides(&mut config, args);
    Ok(LocalEdge { dir: dir.to_owned(), config_path, config, certificate, config_file, overrides })
}

/// Issues the edge certificate unless a usable one is in `dir`.
fn ensure_edge_certificate(dir: &Path, ca: &DevCa, now: UnixMillis) -> anyhow::Result<Provenance> {
    let key_path = dir.join(EDGE_KEY_FILE);
    let chain_path = dir.join(EDGE_CHAIN_FILE);
    let provenance = match (key_path.exists(), chain_path.exists()) {
        (false, false) => Provenance::Created,
        (true, true) => match edge_certificate_problem(dir, ca, now)? {
            None => return Ok(Provenance::Reused),
            Some(reason) => Provenance::Reissued(reason),
        },
        _ => Provenance::Reissued("its key or certificate was missing"),
    };
    if let Provenance::Reissued(_) = provenance {
        // Files under the network directory belong to `molt up`: replace them.
        remove_if_present(&key_path)?;
        remove_if_present(&chain_path)?;
    }
    ca.issue_edge(dir, &[EDGE_DNS_NAME.to_owned()], now)
        .with_context(|| format!("while issuing the edge certificate into {}", dir.display()))?;
    Ok(provenance)
}

/// Why the edge certificate in `dir` cannot serve this CA's network now, if it cannot.
fn edge_certificate_problem(dir: &Path, ca: &DevCa, now: UnixMillis) -> anyhow::Result<Option<&'static str>> {
    let leaf = dev::read_certificate(&dir.join(EDGE_CHAIN_FILE)).context("while checking the edge certificate")?;
    if !leaf.validity().contains(now) {
        return Ok(Some("it was not valid now"));
    }
    // `issue_edge` copies the CA's root and org certificates next to the edge's: different
    // copies mean the CA directory was replaced since.
    for name in [ROOT_CERT_FILE, ORG_CERT_FILE] {
        let current = std::fs::read(ca.dir().join(name))
            .with_context(|| format!("while reading {}", ca.dir().join(name).display()))?;
        if std::fs::read(dir.join(name)).ok().as_deref() != Some(current.as_slice()) {
            return Ok(Some("the CA changed"));
        }
    }
    Ok(None)
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != ErrorKind::NotFound => {
            Err(error).with_context(|| format!("while removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn write_edge_config(path: &Path, args: &UpArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let text = edge_config_text(
        args.listen.unwrap_or(DEFAULT_LISTEN_ADDR),
        args.admin.unwrap_or(DEFAULT_ADMIN_ADDR),
        args.region.as_ref().map_or(DEFAULT_REGION, Region::as_str),
    );
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .with_context(|| format!("while writing {}", path.display()))
}

/// The edge.toml of a new network. Paths are relative to the file, so the network
/// directory can move.
fn edge_config_text(listen: SocketAddr, admin: SocketAddr, region: &str) -> String {
    format!(
        r#"# Edge configuration written by `molt up`, which keeps it on later runs: edit freely.
# Every key with its default: `molt-edge config reference`. Relative paths are resolved
# against this file's directory.

[edge]
listen_addr = "{listen}"
admin_addr = "{admin}"
data_dir = "data"
region = "{region}"

[identity]
certificate_chain = "{EDGE_CHAIN_FILE}"
private_key = "{EDGE_KEY_FILE}"

[trust]
anchors = "{ROOT_CERT_FILE}"

# The CA's own list (../{CA_DIR}): what `molt dev-ca revoke` writes takes effect when the edge restarts.
[[trust.revocation_lists]]
crl = "../{CA_DIR}/{CRL_FILE}"
issuer = "../{CA_DIR}/{ORG_CERT_FILE}"

[log]
format = "text"
level = "info"
"#
    )
}

/// Replaces edge.toml's values with the flags that differ from them; returns those flags.
fn apply_overrides(config: &mut EdgeConfig, args: &UpArgs) -> Vec<&'static str> {
    let mut overrides = Vec::new();
    if let Some(listen) = args.listen.filter(|listen| *listen != config.edge.listen_addr) {
        config.edge.listen_addr = listen;
        overrides.push("--listen");
    }
    if let Some(admin) = args.admin.filter(|admin| *admin != config.edge.admin_addr) {
        config.edge.admin_addr = admin;
        overrides.push("--admin");
    }
    if let Some(region) = args.region.as_ref().filter(|region| **region != config.edge.region) {
        config.edge.region = region.clone();
        overrides.push("--region");
    }
    overrides
}

/// What the user needs once the network is up: where it listens, where its files are,
/// and the commands for a first exchange.
fn banner(network: &LocalNetwork, running: &Running) -> String {
    let edge = &network.edge;
    let quic = connect_addr(running.edge.quic_addr());
    let admin = connect_addr(running.edge.admin_addr());
    let ca_dir = network.layout.ca_dir();
    let root = ca_dir.join(ROOT_CERT_FILE);
    let mut text = String::new();
    let mut line = |line: String| {
        text.push_str(&line);
        text.push('\n');
    };
    line(format!("Molt is up in {}: a development CA and one edge. Ctrl-C stops it.", network.layout.root.display()));
    line(String::new());
    line(format!("  QUIC     {quic}  (agents connect here: --edge {quic})"));
    line(format!("  health   http://{admin}/healthz"));
    line(format!("  metrics  http://{admin}/metrics"));
    line(format!(
        "  edge     {} in region {}; certificate {}",
        running.edge.edge_id,
        edge.config.edge.region,
        describe(edge.certificate)
    ));
    line(format!(
        "  config   {} ({}){}",
        edge.config_path.display(),
        describe(edge.config_file),
        overrides_note(&edge.overrides)
    ));
    line(format!("  buffer   {}", edge.dir.join("data").display()));
    line(format!("  CA       {} ({}); agents trust {}", ca_dir.display(), describe(network.ca), root.display()));
    line(String::new());
    line("Two agents and a message, from this directory:".to_owned());
    line(String::new());
    for command in first_steps(&network.layout, quic) {
        line(format!("  {command}"));
    }
    line(String::new());
    text
}

/// The commands that create alice and bob and send bob a message.
fn first_steps(layout: &Layout, edge: SocketAddr) -> Vec<String> {
    let ca = layout.ca_dir();
    let root = ca.join(ROOT_CERT_FILE);
    let (alice, bob) = (layout.agent_dir("alice"), layout.agent_dir("bob"));
    let word = |path: &Path| shell_word(&path.display().to_string());
    let connect = |agent: &Path| format!("--agent-dir {} --edge {edge} --ca-root {}", word(agent), word(&root));
    let mut steps = Vec::new();
    for agent in [&alice, &bob] {
        steps.push(format!("molt keygen --dir {}", word(agent)));
        steps.push(format!("molt dev-ca issue-agent --ca {} --agent-dir {}", word(&ca), word(agent)));
    }
    steps.push("# bob listens (leave it running, e.g. in a second terminal):".to_owned());
    steps.push(format!("molt listen {} --peer {}", connect(&bob), word(&alice.join(CARD_FILE))));
    steps.push("# alice sends:".to_owned());
    steps.push(format!("molt send {} --to {} 'hello bob'", connect(&alice), word(&bob.join(CARD_FILE))));
    steps
}

fn describe(provenance: Provenance) -> String {
    match provenance {
        Provenance::Created => "created".to_owned(),
        Provenance::Reused => "reused".to_owned(),
        Provenance::Reissued(reason) => format!("reissued: {reason}"),
    }
}

fn overrides_note(overrides: &[&str]) -> String {
    if overrides.is_empty() {
        return String::new();
    }
    let mut note = String::from("; overridden for this run by");
    for flag in overrides {
        let _ = write!(note, " {flag}");
    }
    note
}

/// The address a local client dials: the loopback address when the edge listens on all.
fn connect_addr(bound: SocketAddr) -> SocketAddr {
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), bound.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), bound.port()),
        _ => bound,
    }
}

/// `text` as one POSIX shell word: unchanged when that is safe, single-quoted otherwise.
fn shell_word(text: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Diagnostics go to stderr, filtered by RUST_LOG or else by edge.toml's `[log]`.
fn init_logging(log: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| log.level.to_env_filter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                return;
            }
            Err(error) => tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops molt up"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> UpArgs {
        UpArgs { dir: dir.to_owned(), listen: None, admin: None, region: None }
    }

    #[test]
    fn first_run_creates_everything_and_later_runs_reuse_it() {
        let temp = tempfile::tempdir().unwrap();
        let now = UnixMillis::now_from_system();
        let first = prepare(&args(temp.path()), now).unwrap();
        assert_eq!(first.ca, Provenance::Created);
        assert_eq!(first.edge.certificate, Provenance::Created);
        assert_eq!(first.edge.config_file, Provenance::Created);
        assert_eq!(first.edge.config.edge.listen_addr, DEFAULT_LISTEN_ADDR);
        assert_eq!(first.edge.config.edge.admin_addr, DEFAULT_ADMIN_ADDR);
        assert_eq!(first.edge.config.edge.region.as_str(), DEFAULT_REGION);
        assert_eq!(first.edge.config.edge.data_dir, std::path::absolute(temp.path().join("edge/data")).unwrap());
        assert_eq!(first.edge.config.trust.revocation_lists.len(), 1);
        assert!(first.edge.config.trust.revocation_lists[0].crl.ends_with("edge/../ca/revoked.crl"));
        let root = std::fs::read(temp.path().join("ca/root.pem")).unwrap();
        let edge_chain = std::fs::read(temp.path().join("edge/edge.pem")).unwrap();

        let second = prepare(&args(temp.path()), now).unwrap();
        assert_eq!(second.ca, Provenance::Reused);
        assert_eq!(second.edge.certificate, Provenance::Reused);
        assert_eq!(second.edge.config_file, Provenance::Reused);
        assert!(second.edge.overrides.is_empty());
        assert_eq!(second.edge.config, first.edge.config);
        assert_eq!(std::fs::read(temp.path().join("ca/root.pem")).unwrap(), root);
        assert_eq!(std::fs::read(temp.path().join("edge/edge.pem")).unwrap(), edge_chain);
    }

    #[test]
    fn flags_shape_a_new_config_and_override_an_existing_one() {
        let temp = tempfile::tempdir().unwrap();
        let now = UnixMillis::now_from_system();
        let mut first_args = args(temp.path());
        first_args.listen = Some("127.0.0.1:5433".parse().unwrap());
        first_args.region = Some("eu-west".parse().unwrap());
        let first = prepare(&first_args, now).unwrap();
        assert_eq!(first.edge.config.edge.listen_addr, "127.0.0.1:5433".parse().unwrap());
        assert_eq!(first.edge.config.edge.region.as_str(), "eu-west");
        assert!(first.edge.overrides.is_empty(), "the flags went into the new file");

        let mut second_args = args(temp.path());
        second_args.admin = Some("127.0.0.1:9191".parse().unwrap());
        second_args.listen = first_args.listen;
        let second = prepare(&second_args, now).unwrap();
        assert_eq!(second.edge.overrides, ["--admin"]);
        assert_eq!(second.edge.config.edge.admin_addr, "127.0.0.1:9191".parse().unwrap());
        assert_eq!(second.edge.config.edge.region.as_str(), "eu-west", "kept from edge.toml");
        let text = std::fs::read_to_string(temp.path().join("edge/edge.toml")).unwrap();
        assert!(text.contains("admin_addr = \"127.0.0.1:9090\""), "overrides do not rewrite the file:\n{text}");
    }

    #[test]
    fn edge_certificate_is_reissued_when_the_ca_is_replaced() {
        let temp = tempfile::tempdir().unwrap();
        let now = UnixMillis::now_from_system();
        prepare(&args(temp.path()), now).unwrap();
        let old_chain = std::fs::read(temp.path().join("edge/edge.pem")).unwrap();
        std::fs::remove_dir_all(temp.path().join("ca")).unwrap();

        let again = prepare(&args(temp.path()), now).unwrap();
        assert_eq!(again.ca, Provenance::Created);
        assert_eq!(again.edge.certificate, Provenance::Reissued("the CA changed"));
        assert_ne!(std::fs::read(temp.path().join("edge/edge.pem")).unwrap(), old_chain);
        let ca = DevCa::load(&temp.path().join("ca")).unwrap();
        assert_eq!(edge_certificate_problem(&temp.path().join("edge"), &ca, now).unwrap(), None);
    }

    #[test]
    fn first_steps_quote_paths_only_when_needed() {
        let edge = "127.0.0.1:4433".parse().unwrap();
        let plain = first_steps(&Layout { root: PathBuf::from(".molt") }, edge);
        assert_eq!(plain[0], "molt keygen --dir .molt/agents/alice");
        assert_eq!(
            plain.last().unwrap(),
            "molt send --agent-dir .molt/agents/alice --edge 127.0.0.1:4433 --ca-root .molt/ca/root.pem \
             --to .molt/agents/bob/card.json 'hello bob'"
        );
        let spaced = first_steps(&Layout { root: PathBuf::from("my net's dir") }, edge);
        assert_eq!(spaced[0], r"molt keygen --dir 'my net'\''s dir/agents/alice'");
    }

    #[test]
    fn local_clients_dial_loopback_when_the_edge_listens_on_all_addresses() {
        assert_eq!(connect_addr("0.0.0.0:4433".parse().unwrap()), "127.0.0.1:4433".parse().unwrap());
        assert_eq!(connect_addr("[::]:4433".parse().unwrap()), "[::1]:4433".parse().unwrap());
        assert_eq!(connect_addr("10.0.0.7:4433".parse().unwrap()), "10.0.0.7:4433".parse().unwrap());
    }
}

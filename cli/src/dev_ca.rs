//! `molt dev-ca`: a development PKI on disk (root CA, org CA, CRL) that issues agent and
//! edge certificates and revokes them.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use molt_protocol::UnixMillis;
use molt_protocol::cert::{Certificate, Serial};
use molt_sdk::dev::{self, AGENT_CHAIN_FILE, CARD_FILE, CRL_FILE, DevCa};

#[derive(Debug, Subcommand)]
#[command(
    about = "Run a development certificate authority (not for production)",
    long_about = "Run a development certificate authority (not for production: the root key sits on disk).

A CA directory holds:
  root.key, root.pem  root CA (10 years); root.pem is the trust anchor agents and edges use
  org.key, org.pem    org CA (5 years); signs agent and edge certificates (1 year) and the CRL
  revoked.crl         the org CA's certificate revocation list (PEM)

Example:
  molt dev-ca init --dir ca
  molt keygen --dir alice
  molt dev-ca issue-agent --ca ca --agent-dir alice
  molt dev-ca issue-edge --ca ca --out edge --dns localhost
  molt dev-ca revoke --ca ca --cert alice/agent.pem"
)]
pub enum DevCaCommand {
    Init(InitArgs),
    IssueAgent(IssueAgentArgs),
    IssueEdge(IssueEdgeArgs),
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
#[command(
    about = "Create a new development CA directory",
    long_about = "Create a new development CA directory: a root CA, an org CA and an empty CRL.

Refuses a directory that already holds a CA. Private keys are written with mode 0600.

Example:
  molt dev-ca init --dir ca"
)]
pub struct InitArgs {
    /// CA directory to create (may exist, but must not hold a CA yet).
    #[arg(long, value_name = "CA_DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
#[command(
    about = "Certify an agent's current key; prints the certificate's serial",
    long_about = "Certify the current key of an agent made by `molt keygen`, for one year.

Writes agent.pem (the agent's certificate, then the org CA) and card.json (what peers need \
to reach the agent: see `molt card show`) into the agent directory, replacing earlier ones.
Prints the new certificate's serial number, which `molt dev-ca revoke --serial` takes.

Example:
  molt keygen --dir alice
  molt dev-ca issue-agent --ca ca --agent-dir alice"
)]
pub struct IssueAgentArgs {
    /// CA directory made by `molt dev-ca init`.
    #[arg(long, value_name = "CA_DIR")]
    pub ca: PathBuf,
    /// Agent directory made by `molt keygen`.
    #[arg(long, value_name = "DIR")]
    pub agent_dir: PathBuf,
}

#[derive(Debug, Args)]
#[command(
    about = "Generate an edge key and certificate; prints the edge id",
    long_about = "Generate an edge relay's key and certificate, valid for the given DNS names for one year.

Writes into OUT_DIR (created if missing): edge.key (mode 0600, refused if present), edge.pem \
(the edge's certificate, then the org CA), and copies of root.pem, org.pem and revoked.crl, \
which is everything the edge's [identity] and [trust] configuration names.
Agents must use one of the DNS names as the TLS server name (`--server-name`, or the host of \
`--edge`).

Example:
  molt dev-ca issue-edge --ca ca --out edge
  molt dev-ca issue-edge --ca ca --out edge-eu --dns edge-eu.example.net --dns localhost"
)]
pub struct IssueEdgeArgs {
    /// CA directory made by `molt dev-ca init`.
    #[arg(long, value_name = "CA_DIR")]
    pub ca: PathBuf,
    /// Directory to write the edge's files into.
    #[arg(long, value_name = "OUT_DIR")]
    pub out: PathBuf,
    /// DNS names the edge is reached by; repeat the flag or list several.
    #[arg(long = "dns", value_name = "NAME", num_args = 1.., default_value = "localhost")]
    pub dns_names: Vec<String>,
}

#[derive(Debug, Args)]
#[command(
    about = "Revoke a certificate by serial number or certificate file",
    long_about = "Revoke a certificate: add its serial number to the CA's revoked.crl and reissue it \
with the next CRL number. Copy the new revoked.crl to every edge (its [[trust.revocation_lists]]) \
and to agents that pass `--crl`.

Example:
  molt dev-ca revoke --ca ca --cert alice/agent.pem
  molt dev-ca revoke --ca ca --serial 5a0e0c3b8f1d2a4e6c7b9d0f1e2a3b4c"
)]
pub struct RevokeArgs {
    /// CA directory made by `molt dev-ca init`.
    #[arg(long, value_name = "CA_DIR")]
    pub ca: PathBuf,
    #[command(flatten)]
    pub target: RevokeTarget,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RevokeTarget {
    /// Serial number to revoke: 32 hexadecimal digits, as `issue-agent` prints it.
    #[arg(long, value_name = "HEX")]
    pub serial: Option<String>,
    /// PEM certificate (or chain: its first certificate) whose serial to revoke.
    #[arg(long, value_name = "PEM_FILE")]
    pub cert: Option<PathBuf>,
}

pub fn run(command: DevCaCommand) -> anyhow::Result<()> {
    let now = UnixMillis::now_from_system();
    match command {
        DevCaCommand::Init(args) => init(&args, now),
        DevCaCommand::IssueAgent(args) => issue_agent(&args, now),
        DevCaCommand::IssueEdge(args) => issue_edge(&args, now),
        DevCaCommand::Revoke(args) => revoke(&args, now),
    }
}

fn init(args: &InitArgs, now: UnixMillis) -> anyhow::Result<()> {
    let ca = DevCa::init(&args.dir, now)
        .with_context(|| format!("while creating a development CA in {}", args.dir.display()))?;
    println!(
        "created a development CA in {}: give root.pem to agents and edges; keep root.key and org.key private",
        ca.dir().display()
    );
    Ok(())
}

fn issue_agent(args: &IssueAgentArgs, now: UnixMillis) -> anyhow::Result<()> {
    let ca = load_ca(&args.ca)?;
    let files = ca
        .issue_agent(&args.agent_dir, now)
        .with_context(|| format!("while issuing a certificate for the agent in {}", args.agent_dir.display()))?;
    let leaf = files.leaf.context("while issuing: no certificate came back")?;
    println!("{}", leaf.serial());
    eprintln!(
        "certified {} until {}; wrote {AGENT_CHAIN_FILE} and {CARD_FILE} in {}",
        files.agent_id,
        format_time(leaf.validity().not_after),
        files.dir.display()
    );
    Ok(())
}

fn issue_edge(args: &IssueEdgeArgs, now: UnixMillis) -> anyhow::Result<()> {
    let ca = load_ca(&args.ca)?;
    let files = ca
        .issue_edge(&args.out, &args.dns_names, now)
        .with_context(|| format!("while issuing an edge certificate into {}", args.out.display()))?;
    println!("{}", files.edge_id);
    eprintln!(
        "certified {} for {} until {}; wrote edge.key, edge.pem, root.pem, org.pem and {CRL_FILE} in {}",
        files.edge_id,
        args.dns_names.join(", "),
        format_time(files.leaf.validity().not_after),
        files.dir.display()
    );
    Ok(())
}

fn revoke(args: &RevokeArgs, now: UnixMillis) -> anyhow::Result<()> {
    let serial = match (&args.target.serial, &args.target.cert) {
        (Some(text), _) => text.parse::<Serial>().with_context(|| format!("while reading --serial {text:?}"))?,
        (None, Some(path)) => serial_of(path)?,
        // clap's argument group requires exactly one of the two.
        (None, None) => anyhow::bail!("give --serial or --cert"),
    };
    let ca = load_ca(&args.ca)?;
    let crl = ca.revoke(serial, now).with_context(|| format!("while revoking serial {serial}"))?;
    println!(
        "revoked {serial}: {} is now CRL number {} listing {} serial(s); copy it to every edge",
        ca.dir().join(CRL_FILE).display(),
        crl.crl_number(),
        crl.revoked().len()
    );
    Ok(())
}

fn load_ca(dir: &Path) -> anyhow::Result<DevCa> {
    DevCa::load(dir)
        .with_context(|| format!("while opening the CA in {} (create one with `molt dev-ca init`)", dir.display()))
}

fn serial_of(path: &Path) -> anyhow::Result<Serial> {
    let certificate: Certificate = dev::read_certificate(path).context("while reading --cert")?;
    Ok(certificate.serial())
}

/// RFC 3339 in UTC, or seconds since the epoch if out of range.
fn format_time(at: UnixMillis) -> String {
    i64::try_from(at.as_secs())
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .and_then(|time| time.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{} seconds after the epoch", at.as_secs()))
}

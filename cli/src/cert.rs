//! `molt cert`: certificates from an org's CA on the control plane, with proof of
//! possession of the key, and their revocation.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use molt_sdk::api::RevocationReason;
use molt_sdk::dev::{self, AgentFiles};
use serde::Serialize;

use crate::control::{AgentDirArgs, ApiArgs, format_time, now};

#[derive(Debug, Args)]
#[command(
    about = "Issue agent and edge certificates from an org's CA, revoke them, fetch CRLs (admin)",
    long_about = "Issue agent and edge certificates from an org's CA on the control plane, revoke them, and \
fetch CRLs and the trust bundle.

Issuing proves possession of the key: the key signs the org, itself and the time, so \
the machine that holds the key runs the command. The agent or edge id is derived from \
the key; asking again with the same key renews. Needs an admin key with the scope \
`ca:write` (`crl` and `trust-bundle` are public).

Examples:
  molt keygen --dir alice
  molt cert issue-agent --org org_… --agent-dir alice     # writes alice/agent.pem and alice/card.json
  molt cert issue-edge --org org_… --out edge1 --dns-name edge1.example.net
  molt cert revoke 3f9c… --reason key_compromise
  molt cert crl org_… > org.crl"
)]
pub struct CertArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: CertCommand,
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Certify an agent's key; writes agent.pem (leaf, then org CA) and card.json into
    /// the agent directory.
    IssueAgent {
        /// The org whose CA certifies the agent (`org_…`).
        #[arg(long, value_name = "ORG_ID")]
        org: String,
        #[command(flatten)]
        agent: AgentDirArgs,
    },
    /// Certify an edge: uses DIR/edge.key (generated if missing) and writes edge.pem,
    /// org.pem, root.pem and revoked.crl into DIR, ready for molt-edge.
    IssueEdge {
        /// The org whose CA certifies the edge (`org_…`).
        #[arg(long, value_name = "ORG_ID")]
        org: String,
        /// Edge directory.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A DNS name the edge serves (agents send one as SNI); repeat for several.
        #[arg(long = "dns-name", value_name = "NAME", required = true)]
        dns_names: Vec<String>,
    },
    /// Revoke a certificate by serial (idempotent); edges learn it from the CRL.
    Revoke {
        /// The serial, 32 hex digits, as `issue-agent`/`issue-edge` printed it.
        serial: String,
        /// Why.
        #[arg(long, value_enum)]
        reason: Option<Reason>,
    },
    /// Print an org's current CRL (PEM).
    Crl {
        /// The org id (`org_…`).
        org_id: String,
    },
    /// Print the trust bundle: roots, org CAs and CRLs, with its sequence number.
    TrustBundle,
}

/// Revocation reasons (X.509).
#[derive(Clone, Copy, Debug, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Reason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
}

impl From<Reason> for RevocationReason {
    fn from(reason: Reason) -> Self {
        match reason {
            Reason::Unspecified => RevocationReason::Unspecified,
            Reason::KeyCompromise => RevocationReason::KeyCompromise,
            Reason::AffiliationChanged => RevocationReason::AffiliationChanged,
            Reason::Superseded => RevocationReason::Superseded,
            Reason::CessationOfOperation => RevocationReason::CessationOfOperation,
        }
    }
}

pub async fn run(args: CertArgs) -> anyhow::Result<()> {
    let api = &args.api;
    let client = api.client()?;
    match args.command {
        CertCommand::IssueAgent { org, agent } => {
            let keys = agent.keys()?;
            let issued = client.issue_agent_certificate(&org, &keys.signing_key, now()).await?;
            AgentFiles::install_chain(&agent.agent_dir, &issued.chain_pem, now())
                .with_context(|| format!("while installing the certificate in {}", agent.agent_dir.display()))?;
            api.print(&issued, |issued| {
                format!(
                    "issued agent certificate {} for {} (valid until {}); wrote {} and {} in {}",
                    issued.serial,
                    issued.subject_id,
                    format_time(issued.not_after_ms),
                    dev::AGENT_CHAIN_FILE,
                    dev::CARD_FILE,
                    agent.agent_dir.display()
                )
            });
        }
        CertCommand::IssueEdge { org, out, dns_names } => {
            let (key, generated) =
                dev::edge_key(&out).with_context(|| format!("while preparing the edge key in {}", out.display()))?;
            let issued = client.issue_edge_certificate(&org, &key, &dns_names, now()).await?;
            let bundle = client.trust_bundle().await?;
            let crl = client.crl(&org).await?;
            dev::install_edge_files(&out, &issued.chain_pem, &bundle.roots.concat(), &crl.pem)
                .with_context(|| format!("while writing the edge files in {}", out.display()))?;
            #[derive(Serialize)]
            struct Answer<'a> {
                #[serde(flatten)]
                issued: &'a molt_sdk::api::IssuedCertificate,
                key_generated: bool,
            }
            api.print(&Answer { issued: &issued, key_generated: generated }, |answer| {
                let key = if answer.key_generated { "new key" } else { "existing key" };
                format!(
                    "issued edge certificate {} for {} ({key}, valid until {}); wrote edge.pem, org.pem, root.pem, revoked.crl in {}",
                    answer.issued.serial,
                    answer.issued.subject_id,
                    format_time(answer.issued.not_after_ms),
                    out.display()
                )
            });
        }
        CertCommand::Revoke { serial, reason } => {
            let revocation = client.revoke_certificate(&serial, reason.map(Into::into)).await?;
            api.print(&revocation, |revocation| {
                format!(
                    "revoked certificate {} of {} ({}) at {}",
                    revocation.serial,
                    revocation.org_id,
                    revocation.reason,
                    format_time(revocation.revoked_at_ms)
                )
            });
        }
        CertCommand::Crl { org_id } => {
            let crl = client.crl(&org_id).await?;
            api.print(&crl, |crl| crl.pem.clone());
        }
        CertCommand::TrustBundle => {
            let bundle = client.trust_bundle().await?;
            api.print(&bundle, |bundle| {
                format!(
                    "trust bundle sequence {}: {} root(s), {} org CA(s), {} CRL(s)\n{}{}{}",
                    bundle.sequence,
                    bundle.roots.len(),
                    bundle.org_cas.len(),
                    bundle.crls.len(),
                    bundle.roots.concat(),
                    bundle.org_cas.concat(),
                    bundle.crls.concat()
                )
            });
        }
    }
    Ok(())
}

//! `molt org`: organisations and their CAs, through the control plane's admin API.

use clap::{Args, Subcommand};
use molt_sdk::api::{Org, Page};
use serde::Serialize;

use crate::control::{ApiArgs, format_time};

#[derive(Debug, Args)]
#[command(
    about = "Create, list and show orgs, and create an org's CA (admin)",
    long_about = "Create, list and show orgs, and create an org's CA, through the control plane's admin API.

An org owns a CA that certifies its agents and edges (`molt cert`). Needs an admin key \
(--token or MOLT_ADMIN_TOKEN) with the scope `orgs:write` to create, `read` to list and \
show, `ca:write` for `org ca create`.

Examples:
  export MOLT_ADMIN_TOKEN=molt_admin_…
  molt org create acme
  molt org list
  molt org show org_…
  molt org ca create org_…"
)]
pub struct OrgArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: OrgCommand,
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an org; prints its id.
    Create {
        /// The org's name: a DNS label (a-z, 0-9, '-'), unique.
        name: String,
    },
    /// List orgs, ordered by name.
    List {
        /// Orgs per page (1 to 1000).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Start after this name: the `next_after` a previous page printed.
        #[arg(long, value_name = "NAME")]
        after: Option<String>,
    },
    /// Show one org.
    Show {
        /// The org id (`org_…`).
        org_id: String,
    },
    /// The org's certificate authority.
    #[command(subcommand)]
    Ca(OrgCaCommand),
}

#[derive(Debug, Subcommand)]
pub enum OrgCaCommand {
    /// Create the org's CA (if it has none) and print its serial; `--out` writes its
    /// certificate (PEM).
    Create {
        /// The org id (`org_…`).
        org_id: String,
        /// File to write the org CA certificate to.
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
}

pub async fn run(args: OrgArgs) -> anyhow::Result<()> {
    let api = &args.api;
    let client = api.client()?;
    match args.command {
        OrgCommand::Create { name } => {
            let org = client.create_org(&name).await?;
            api.print(&org, |org| format!("created org {} ({})", org.name, org.id));
        }
        OrgCommand::List { limit, after } => {
            let page = client.list_orgs(Page { limit, after: after.as_deref() }).await?;
            api.print(&page, |page| {
                let mut text: String = page.items.iter().map(org_line).collect();
                if page.items.is_empty() {
                    text.push_str("no orgs\n");
                }
                if let Some(next) = &page.next_after {
                    text.push_str(&format!("more: molt org list --after {next}\n"));
                }
                text
            });
        }
        OrgCommand::Show { org_id } => {
            let org = client.org(&org_id).await?;
            api.print(&org, org_line);
        }
        OrgCommand::Ca(OrgCaCommand::Create { org_id, out }) => {
            let (ca, created) = client.create_org_ca(&org_id).await?;
            if let Some(path) = &out {
                std::fs::write(path, &ca.certificate_pem)
                    .map_err(|error| anyhow::anyhow!("while writing {}: {error}", path.display()))?;
            }
            #[derive(Serialize)]
            struct Answer<'a> {
                #[serde(flatten)]
                ca: &'a molt_sdk::api::OrgCa,
                created: bool,
            }
            api.print(&Answer { ca: &ca, created }, |answer| {
                let state = if answer.created { "created" } else { "already existed" };
                format!("org CA of {}: serial {} ({state})", answer.ca.org_id, answer.ca.serial)
            });
        }
    }
    Ok(())
}

fn org_line(org: &Org) -> String {
    format!("{}  {}  created {}\n", org.id, org.name, format_time(org.created_at_ms))
}

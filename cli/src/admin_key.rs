//! `molt admin-key`: scoped admin keys, through the control plane's admin API.

use clap::{Args, Subcommand};
use molt_sdk::api::{AdminKey, Page};

use crate::control::{ApiArgs, format_time};

#[derive(Debug, Args)]
#[command(
    about = "Create, list and revoke scoped admin keys (admin)",
    long_about = "Create, list and revoke scoped admin keys. Needs an admin key with the scope `keys:admin`.

Scopes: read (list and show orgs), orgs:write (create orgs), keys:admin (admin keys), \
ca:write (org CAs, certificates, revocation of certificates and agents), plus any the \
control plane adds (see its README). A new key's token is printed once; only its hash is \
stored. Make scoped keys with the bootstrap credential, then revoke the bootstrap key.

Examples:
  molt admin-key create --name ci --scope read --scope ca:write
  molt admin-key list
  molt admin-key revoke key_…"
)]
pub struct AdminKeyArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: AdminKeyCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminKeyCommand {
    /// Create a key; prints its token once.
    Create {
        /// A name to recognise the key by.
        #[arg(long)]
        name: String,
        /// A scope the key holds; repeat for several.
        #[arg(long = "scope", value_name = "SCOPE", required = true)]
        scopes: Vec<String>,
    },
    /// List keys, revoked ones included.
    List {
        /// Keys per page (1 to 1000).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// The `next_after` a previous page printed.
        #[arg(long, value_name = "ID")]
        after: Option<String>,
    },
    /// Revoke a key (idempotent).
    Revoke {
        /// The key id.
        key_id: String,
    },
}

pub async fn run(args: AdminKeyArgs) -> anyhow::Result<()> {
    let api = &args.api;
    let client = api.client()?;
    match args.command {
        AdminKeyCommand::Create { name, scopes } => {
            let created = client.create_admin_key(&name, &scopes).await?;
            api.print(&created, |created| {
                format!(
                    "created admin key {} ({}) with scopes {}\ntoken (shown only this once):\n    {}",
                    created.key.id,
                    created.key.name,
                    created.key.scopes.join(" "),
                    created.token
                )
            });
        }
        AdminKeyCommand::List { limit, after } => {
            let page = client.list_admin_keys(Page { limit, after: after.as_deref() }).await?;
            api.print(&page, |page| {
                let mut text: String = page.items.iter().map(key_line).collect();
                if let Some(next) = &page.next_after {
                    text.push_str(&format!("more: molt admin-key list --after {next}\n"));
                }
                text
            });
        }
        AdminKeyCommand::Revoke { key_id } => {
            let key = client.revoke_admin_key(&key_id).await?;
            api.print(&key, key_line);
        }
    }
    Ok(())
}

fn key_line(key: &AdminKey) -> String {
    let state = match key.revoked_at_ms {
        Some(at) => format!("revoked {}", format_time(at)),
        None => "active".to_owned(),
    };
    format!(
        "{}  {}  [{}]  created {}  {state}\n",
        key.id,
        key.name,
        key.scopes.join(" "),
        format_time(key.created_at_ms)
    )
}

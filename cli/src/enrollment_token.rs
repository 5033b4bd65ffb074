//! `molt enrollment-token`: edge enrollment tokens, through the control plane's admin API.

use clap::{Args, Subcommand};
use molt_sdk::api::Page;
use molt_sdk::api::enrollment::{EnrollmentToken, NewEnrollmentToken};

use crate::control::{ApiArgs, format_time};

#[derive(Debug, Args)]
#[command(
    about = "Create, list and revoke edge enrollment tokens (admin)",
    long_about = "Create, list and revoke the single-use tokens a new edge enrolls with \
(`molt-edge enroll --token`). Needs an admin key with the scope `ca:write`. A token is bound \
to an org and a region and expires (default 24 hours, at most 30 days); it is printed once and \
only its hash is stored.

Examples:
  molt enrollment-token create --org org_… --region eu-west
  molt enrollment-token create --org org_… --region eu-west --ttl-secs 3600
  molt enrollment-token list
  molt enrollment-token revoke enr_…"
)]
pub struct EnrollmentTokenArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: EnrollmentTokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum EnrollmentTokenCommand {
    /// Create a token; prints it once.
    Create {
        /// The org the edge will belong to.
        #[arg(long, value_name = "ORG_ID")]
        org: String,
        /// The region the edge serves.
        #[arg(long)]
        region: String,
        /// Seconds the token can be used (default 24 hours).
        #[arg(long, value_name = "SECS")]
        ttl_secs: Option<u64>,
        /// Lifetime of the edge's certificates in seconds (default 90 days).
        #[arg(long, value_name = "SECS")]
        certificate_validity_secs: Option<u64>,
    },
    /// List tokens (never their secrets).
    List {
        /// Tokens per page (1 to 1000).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// The `next_after` a previous page printed.
        #[arg(long, value_name = "ID")]
        after: Option<String>,
    },
    /// Revoke a token (idempotent).
    Revoke {
        /// The token id (`enr_…`).
        token_id: String,
    },
}

pub async fn run(args: EnrollmentTokenArgs) -> anyhow::Result<()> {
    let api = &args.api;
    let client = api.client()?;
    match args.command {
        EnrollmentTokenCommand::Create { org, region, ttl_secs, certificate_validity_secs } => {
            let request = NewEnrollmentToken { org_id: org, region, ttl_secs, certificate_validity_secs };
            let created = client.create_enrollment_token(&request).await?;
            api.print(&created, |created| {
                format!(
                    "created enrollment token {} for org {} (region {}), expires {}\ntoken (shown only this once):\n    {}",
                    created.record.id,
                    created.record.org_id,
                    created.record.region,
                    format_time(created.record.expires_at_ms),
                    created.token
                )
            });
        }
        EnrollmentTokenCommand::List { limit, after } => {
            let page = client.list_enrollment_tokens(Page { limit, after: after.as_deref() }).await?;
            api.print(&page, |page| {
                let mut text: String = page.items.iter().map(token_line).collect();
                if let Some(next) = &page.next_after {
                    text.push_str(&format!("more: molt enrollment-token list --after {next}\n"));
                }
                text
            });
        }
        EnrollmentTokenCommand::Revoke { token_id } => {
            let token = client.revoke_enrollment_token(&token_id).await?;
            api.print(&token, token_line);
        }
    }
    Ok(())
}

fn token_line(token: &EnrollmentToken) -> String {
    let used = token.used_by_edge.as_deref().map(|edge| format!("  by {edge}")).unwrap_or_default();
    format!(
        "{}  {}  {}  {}{used}  expires {}\n",
        token.id,
        token.org_id,
        token.region,
        token.status,
        format_time(token.expires_at_ms)
    )
}

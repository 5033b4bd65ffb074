//! `molt wallet`, `molt pay`, `molt escrow`, `molt stake` and `molt ledger`: the credits
//! ledger through the control plane's API. Agent commands are signed with the key in
//! `--agent-dir`; admin commands (`escrow rule`, `stake slash`, `ledger …`) need an admin
//! key with the scope `ledger:admin`.
//!
//! Amounts are read exactly ([`Credits`]): credits with up to six decimals (`1.5`) or
//! micro-credits with a `u` suffix (`1500000u`), and printed as credits with six decimals.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use molt_protocol::AgentId;
use molt_sdk::api::{
    AgentCredentials, Credits, Escrow, HistoryPage, LedgerAccount, LedgerAudit, LedgerTransfer, Mint, MintTarget,
    NewEscrow, OnExpiry, Payment, Slash, StakeKind, Stakes, TransferKey, TransferKind, TransferLookup, TransferStatus,
    Unbonding, UnbondingState, Wallet, wallet_account,
};

use crate::control::{AgentDirArgs, ApiArgs, credentials, format_time, now};

/// What `--help` says about amounts, everywhere one is read.
const AMOUNT_HELP: &str = "Credits with up to 6 decimals (1.5 = 1 500 000 micro-credits), or micro-credits with a \
                           `u` suffix (1500000u)";
/// The longest escrow `--expires-in` the control plane accepts.
const ESCROW_LIFETIME_MAX: Duration = Duration::from_secs(366 * 24 * 3600);

const IDEMPOTENCY_HELP: &str = "Every command that moves credits has an id (--id, 1 to 64 of A-Z a-z 0-9 _ . -), its \
idempotency key: repeating the command with the same id returns the first answer, a refusal too, and never moves \
credits twice, so a command that timed out can be repeated safely. The same id with different fields is refused \
(id_reused). Without --id a random one is made and printed.";

// ---- molt wallet ----

#[derive(Debug, Args)]
#[command(
    about = "Open and show an agent's wallet, and its history (signed by the agent)",
    long_about = "Open and show an agent's credits wallet, and list its history, newest first.

Signed with the agent's key from --agent-dir (made by `molt keygen`); the agent must be \
registered (`molt agent register`). A wallet must be opened before it can receive credits. \
Amounts are printed as credits with 6 decimals (1 credit = 1 000 000 micro-credits).

Examples:
  molt wallet open --agent-dir alice
  molt wallet show --agent-dir alice
  molt wallet history --agent-dir alice --limit 20
  molt wallet transfer --agent-dir alice t-0123…      # what became of a payment id"
)]
pub struct WalletArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: WalletCommand,
}

#[derive(Debug, Subcommand)]
pub enum WalletCommand {
    /// Open the agent's wallet (idempotent) and show it.
    Open {
        #[command(flatten)]
        agent: AgentDirArgs,
    },
    /// Show the wallet's balance, what is available (the balance less escrows) and the
    /// agent's stake accounts.
    Show {
        #[command(flatten)]
        agent: AgentDirArgs,
    },
    /// List journal entries touching the wallet, newest first.
    History {
        #[command(flatten)]
        agent: AgentDirArgs,
        /// Entries per page (1 to 1000, default 100).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Entries before this journal position: the `--before` a previous page printed.
        #[arg(long, value_name = "SEQ")]
        before: Option<u64>,
    },
    /// Show whether one of the agent's ids (a payment, escrow or stake id) was applied or
    /// refused, and why.
    Transfer {
        #[command(flatten)]
        agent: AgentDirArgs,
        /// The id given with --id (or printed when it was generated).
        id: TransferKey,
    },
}

pub async fn run_wallet(args: WalletArgs) -> anyhow::Result<()> {
    let api = &args.api;
    let client = api.client()?;
    match args.command {
        WalletCommand::Open { agent } => {
            let keys = agent.keys()?;
            let wallet = client.open_wallet(&credentials(&keys)).await?;
            api.print(&wallet, describe_wallet);
        }
        WalletCommand::Show { agent } => {
            let keys = agent.keys()?;
            let wallet = client.wallet(&credentials(&keys)).await?;
            api.print(&wallet, describe_wallet);
        }
        WalletCommand::History { agent, limit, before } => {
            let keys = agent.keys()?;
            let page = client.wallet_history(&credentials(&keys), HistoryPage { limit, before }).await?;
            let wallet = wallet_account(keys.agent_id);
            api.print(&page, |page| {
                let mut text: String = page.items.iter().map(|entry| history_line(entry, &wallet)).collect();
                if page.items.is_empty() {
                    text.push_str("no entries\n");
                }
                if let Some(before) = page.next_before {
                    text.push_str(&format!("more: add --before {before}\n"));
                }
                text
            });
        }
        WalletCommand::Transfer { agent, id } => {
            let keys = agent.keys()?;
            let lookup = client.transfer(&credentials(&keys), &id).await?;
            api.print(&lookup, describe_lookup);
        }
    }
    Ok(())
}

// ---- molt pay ----

#[derive(Debug, Args)]
#[command(
    about = "Pay another agent from the agent's wallet (signed by the agent)",
    long_about = pay_long_about()
)]
pub struct PayArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub agent: AgentDirArgs,
    /// The recipient (`agent-…`); its wallet must be open.
    #[arg(long, value_name = "AGENT_ID", required_unless_present = "batch", conflicts_with = "batch")]
    pub to: Option<AgentId>,
    #[arg(
        value_name = "AMOUNT",
        value_parser = positive_amount,
        allow_hyphen_values = true,
        help = AMOUNT_HELP,
        required_unless_present = "batch",
        conflicts_with = "batch"
    )]
    pub amount: Option<Credits>,
    /// The payment's idempotency key; a fresh one is made (and printed) without it.
    #[arg(long, value_name = "ID", conflicts_with = "batch")]
    pub id: Option<TransferKey>,
    /// Pay many in one transaction: a JSON array of {"to", "amount", "id", "linked"} (1 to
    /// 1000 payments; `-` reads standard input). Each payment gets its own result; a
    /// `linked` one succeeds or fails together with the next.
    #[arg(long, value_name = "FILE")]
    pub batch: Option<std::path::PathBuf>,
}

/// Largest payments in one `--batch` (the server's limit).
pub const PAY_BATCH_MAX: usize = 1000;
/// Largest `--batch` file read.
const PAY_BATCH_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// One payment of a `--batch` file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    to: AgentId,
    amount: String,
    id: Option<String>,
    #[serde(default)]
    linked: bool,
}

/// Reads and checks a `--batch` file completely before anything is sent.
fn read_batch(path: &std::path::Path) -> anyhow::Result<Vec<Payment>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    let reader: Box<dyn std::io::Read> = if path == std::path::Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(path).with_context(|| format!("while opening {}", path.display()))?)
    };
    reader.take(PAY_BATCH_FILE_BYTES_MAX + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > PAY_BATCH_FILE_BYTES_MAX {
        bail!("{} is larger than {PAY_BATCH_FILE_BYTES_MAX} bytes", path.display());
    }
    let lines: Vec<BatchLine> =
        serde_json::from_slice(&bytes).with_context(|| format!("while reading the batch {}", path.display()))?;
    if lines.is_empty() || lines.len() > PAY_BATCH_MAX {
        bail!("a batch has 1 to {PAY_BATCH_MAX} payments, {} has {}", path.display(), lines.len());
    }
    lines
        .into_iter()
        .enumerate()
        .map(|(index, line)| {
            let amount = positive_amount(&line.amount).map_err(|error| anyhow::anyhow!("payment {index}: {error}"))?;
            let key = match line.id {
                Some(id) => id.parse().map_err(|error| anyhow::anyhow!("payment {index}: id {id:?}: {error}"))?,
                None => TransferKey::random(),
            };
            Ok(Payment { key, to: line.to, amount, linked: line.linked })
        })
        .collect()
}

fn pay_long_about() -> String {
    format!(
        "Pay another agent from the agent's wallet. The recipient pays the fee, if the ledger has one.

{IDEMPOTENCY_HELP}

AMOUNT: {AMOUNT_HELP}.

Examples:
  molt pay --agent-dir alice --to agent-… 1.5
  molt pay --agent-dir alice --to agent-… 250u --id invoice-42
  molt pay --agent-dir alice --to agent-… 250u --id invoice-42   # same answer, paid once
  molt pay --agent-dir alice --batch payroll.json   # [{{\"to\": \"agent-…\", \"amount\": \"1.5\", \"id\": \"p-1\"}}, …]"
    )
}

pub async fn run_pay(args: PayArgs) -> anyhow::Result<()> {
    let api = &args.api;
    let client = api.client()?;
    let keys = args.agent.keys()?;
    if let Some(path) = &args.batch {
        return run_pay_batch(api, &client, &credentials(&keys), path).await;
    }
    // Invariant: clap requires --to and AMOUNT without --batch.
    let (to, amount) = args.to.zip(args.amount).expect("clap requires --to and AMOUNT without --batch");
    let (key, generated) = key_or_random(args.id);
    let payment = Payment { key: key.clone(), to, amount, linked: false };
    let transfer = client.pay(&credentials(&keys), &payment).await.with_context(|| retry_hint(&key, generated))?;
    api.print(&transfer, |transfer| {
        format!("paid {} credits to {to} (id {key}, journal entry {})", transfer.amount, transfer.seq)
    });
    Ok(())
}

/// Sends a batch; prints every result; fails (exit 1) if any payment was refused.
async fn run_pay_batch(
    api: &ApiArgs,
    client: &molt_sdk::api::ApiClient,
    agent: &AgentCredentials,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let payments = read_batch(path)?;
    let results = client
        .pay_batch(agent, &payments)
        .await
        .context("the batch may or may not have been applied; the payments and their ids are listed below")
        .inspect_err(|_| {
            for payment in &payments {
                eprintln!("  {} -> {}: id {}", payment.amount, payment.to, payment.key);
            }
        })?;
    let refused = results.results.iter().filter(|item| item.transfer.is_none()).count();
    api.print(&results, |results| {
        let mut text = String::new();
        for (item, payment) in results.results.iter().zip(&payments) {
            match (&item.transfer, &item.code) {
                (Some(transfer), _) => text.push_str(&format!(
                    "paid {} credits to {} (id {}, journal entry {})\n",
                    transfer.amount, payment.to, payment.key, transfer.seq
                )),
                (None, code) => text.push_str(&format!(
                    "refused {} credits to {} (id {}): {}\n",
                    payment.amount,
                    payment.to,
                    payment.key,
                    code.as_deref().unwrap_or("refused")
                )),
            }
        }
        text.push_str(&format!("{} paid, {refused} refused\n", results.results.len() - refused));
        text
    });
    if refused > 0 {
        bail!("{refused} of {} payments were refused", results.results.len());
    }
    Ok(())
}

// ---- molt escrow ----

#[derive(Debug, Args)]
#[command(
    about = "Lock credits for a payee, then release, refund, dispute; admins rule on disputes",
    long_about = escrow_long_about()
)]
pub struct EscrowArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: EscrowCommand,
}

fn escrow_long_about() -> String {
    format!(
        "Escrows: credits locked from the payer's wallet for a payee. The payer releases all or part \
(the rest returns to the payer), the payee refunds everything, either party disputes (expiry \
then waits for an admin's ruling), or the escrow expires (refund by default, or release).

create, show, release, refund and dispute are signed with the key in --agent-dir; rule needs \
an admin key with the scope ledger:admin. An escrow's id is `<payer agent>:<id>`; the payer \
may give just its own <id>.

{IDEMPOTENCY_HELP}

AMOUNT: {AMOUNT_HELP}.

Examples:
  molt escrow create --agent-dir alice --payee agent-… 10 --expires-in 7d --id job-7
  molt escrow show --agent-dir bob agent-…:job-7
  molt escrow release --agent-dir alice job-7 --amount 8     # 8 to the payee, 2 back
  molt escrow refund --agent-dir bob agent-…:job-7
  molt escrow dispute --agent-dir bob agent-…:job-7
  molt escrow rule agent-…:job-7 --release 5                  # admin"
    )
}

#[derive(Debug, Subcommand)]
pub enum EscrowCommand {
    /// Lock credits from the agent's wallet for a payee.
    Create {
        #[command(flatten)]
        agent: AgentDirArgs,
        /// Who gets the credits when released (`agent-…`).
        #[arg(long, value_name = "AGENT_ID")]
        payee: AgentId,
        #[arg(value_name = "AMOUNT", value_parser = positive_amount, allow_hyphen_values = true, help = AMOUNT_HELP)]
        amount: Credits,
        /// When the escrow expires: a number with s, m, h or d (90m, 7d), at most 366d.
        #[arg(long, value_name = "DURATION", value_parser = parse_lifetime, default_value = "24h")]
        expires_in: Duration,
        /// What expiry does unless disputed: refund to the payer, or release to the payee.
        #[arg(long, value_enum, default_value_t = ExpiryArg::Refund)]
        on_expiry: ExpiryArg,
        /// The escrow's idempotency key; a fresh one is made (and printed) without it.
        #[arg(long, value_name = "ID")]
        id: Option<TransferKey>,
    },
    /// Show an escrow the agent is a party to.
    Show {
        #[command(flatten)]
        agent: AgentDirArgs,
        /// `<payer agent>:<id>`, or the payer's own <id>.
        escrow: String,
    },
    /// Release an escrow to the payee (payer only): all of it, or --amount and the rest
    /// back to the payer.
    Release {
        #[command(flatten)]
        agent: AgentDirArgs,
        /// `<payer agent>:<id>`, or the payer's own <id>.
        escrow: String,
        /// Release only this much. Credits with up to 6 decimals, or micro-credits with a
        /// `u` suffix.
        #[arg(long, value_name = "AMOUNT", value_parser = positive_amount, allow_hyphen_values = true)]
        amount: Option<Credits>,
    },
    /// Return everything to the payer (payee only).
    Refund {
        #[command(flatten)]
        agent: AgentDirArgs,
        /// `<payer agent>:<id>`.
        escrow: String,
    },
    /// Dispute an escrow (either party): it no longer expires, an admin rules.
    Dispute {
        #[command(flatten)]
        agent: AgentDirArgs,
        /// `<payer agent>:<id>`, or the payer's own <id>.
        escrow: String,
    },
    /// Decide a disputed escrow (admin, ledger:admin): --release goes to the payee, the
    /// rest to the payer.
    Rule {
        /// `<payer agent>:<id>`.
        escrow: String,
        /// What the payee gets; 0 refunds everything. Credits with up to 6 decimals, or
        /// micro-credits with a `u` suffix.
        #[arg(long, value_name = "AMOUNT", value_parser = any_amount, allow_hyphen_values = true)]
        release: Credits,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExpiryArg {
    Refund,
    Release,
}

pub async fn run_escrow(args: EscrowArgs) -> anyhow::Result<()> {
    let api = &args.api;
    let client = api.client()?;
    let escrow = match args.command {
        EscrowCommand::Create { agent, payee, amount, expires_in, on_expiry, id } => {
            let keys = agent.keys()?;
            let (key, generated) = key_or_random(id);
            let expires_in_ms = u64::try_from(expires_in.as_millis()).unwrap_or(u64::MAX);
            let on_expiry = match on_expiry {
                ExpiryArg::Refund => OnExpiry::Refund,
                ExpiryArg::Release => OnExpiry::Release,
            };
            let new = NewEscrow { key: key.clone(), payee, amount, expires_at_ms: now().0 + expires_in_ms, on_expiry };
            client.create_escrow(&credentials(&keys), &new).await.with_context(|| retry_hint(&key, generated))?
        }
        EscrowCommand::Show { agent, escrow } => {
            let credentials = credentials(&agent.keys()?);
            client.escrow(&credentials, &escrow_id(&escrow, &credentials)).await?
        }
        EscrowCommand::Release { agent, escrow, amount } => {
            let credentials = credentials(&agent.keys()?);
            client.release_escrow(&credentials, &escrow_id(&escrow, &credentials), amount).await?
        }
        EscrowCommand::Refund { agent, escrow } => {
            let credentials = credentials(&agent.keys()?);
            client.refund_escrow(&credentials, &escrow_id(&escrow, &credentials)).await?
        }
        EscrowCommand::Dispute { agent, escrow } => {
            let credentials = credentials(&agent.keys()?);
            client.dispute_escrow(&credentials, &escrow_id(&escrow, &credentials)).await?
        }
        EscrowCommand::Rule { escrow, release } => client.rule_escrow(&escrow, release).await?,
    };
    api.print(&escrow, describe_escrow);
    Ok(())
}

// ---- molt stake ----

#[derive(Debug, Args)]
#[command(
    about = "Lock, unlock and show an agent's stake (signed by the agent); admins slash",
    long_about = stake_long_about()
)]
pub struct StakeArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: StakeCommand,
}

fn stake_long_about() -> String {
    format!(
        "Stake: credits an agent locks from its wallet, by kind (trust, governance, job). Unlocking \
starts unbonding: the credits return to the wallet after the kind's period (trust 7 days, \
governance 14 days, job 1 day). Admins (ledger:admin) slash locked stake to the treasury.

lock, unlock and show are signed with the key in --agent-dir.

{IDEMPOTENCY_HELP}

AMOUNT: {AMOUNT_HELP}.

Examples:
  molt stake lock --agent-dir alice --kind trust 100
  molt stake show --agent-dir alice
  molt stake unlock --agent-dir alice --kind trust 40
  molt stake slash --agent agent-… --kind trust 10 --id case-12   # admin"
    )
}

#[derive(Debug, Subcommand)]
pub enum StakeCommand {
    /// Move credits from the agent's wallet into its stake of a kind.
    Lock {
        #[command(flatten)]
        agent: AgentDirArgs,
        #[command(flatten)]
        stake: StakeChange,
    },
    /// Start unbonding stake of a kind back to the wallet.
    Unlock {
        #[command(flatten)]
        agent: AgentDirArgs,
        #[command(flatten)]
        stake: StakeChange,
    },
    /// Show the agent's stake accounts and unbondings.
    Show {
        #[command(flatten)]
        agent: AgentDirArgs,
    },
    /// Move an agent's locked stake to the treasury (admin, ledger:admin).
    Slash {
        /// The agent whose stake is slashed (`agent-…`).
        #[arg(long, value_name = "AGENT_ID")]
        agent: AgentId,
        #[command(flatten)]
        stake: StakeChange,
    },
}

/// The kind, amount and id of a stake change.
#[derive(Debug, Args)]
pub struct StakeChange {
    /// Which stake.
    #[arg(long, value_enum)]
    pub kind: StakeKindArg,
    #[arg(value_name = "AMOUNT", value_parser = positive_amount, allow_hyphen_values = true, help = AMOUNT_HELP)]
    pub amount: Credits,
    /// The change's idempotency key; a fresh one is made (and printed) without it.
    #[arg(long, value_name = "ID")]
    pub id: Option<TransferKey>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StakeKindArg {
    /// Unbonds in 7 days.
    Trust,
    /// Unbonds in 14 days.
    Governance,
    /// Unbonds in 1 day.
    Job,
}

impl StakeKindArg {
    fn kind(self) -> StakeKind {
        match self {
            StakeKindArg::Trust => StakeKind::Trust,
            StakeKindArg::Governance => StakeKind::Governance,
            StakeKindArg::Job => StakeKind::Job,
        }
    }
}

pub async fn run_stake(args: StakeArgs) -> anyhow::Result<()> {
    let api = &args.api;
    let client = api.client()?;
    match args.command {
        StakeCommand::Lock { agent, stake } => {
            let keys = agent.keys()?;
            let (key, generated) = key_or_random(stake.id);
            let locked = client
                .lock_stake(&credentials(&keys), &key, stake.kind.kind(), stake.amount)
                .await
                .with_context(|| retry_hint(&key, generated))?;
            api.print(&locked, |transfer| {
                let kind = stake.kind.kind().as_str();
                format!("locked {} credits as {kind} stake (id {key}, journal entry {})", transfer.amount, transfer.seq)
            });
        }
        StakeCommand::Unlock { agent, stake } => {
            let keys = agent.keys()?;
            let (key, generated) = key_or_random(stake.id);
            let unbonding = client
                .unlock_stake(&credentials(&keys), &key, stake.kind.kind(), stake.amount)
                .await
                .with_context(|| retry_hint(&key, generated))?;
            api.print(&unbonding, |unbonding| format!("unlocking (id {key}): {}", unbonding_line(unbonding)));
        }
        StakeCommand::Show { agent } => {
            let keys = agent.keys()?;
            let stakes = client.stakes(&credentials(&keys)).await?;
            api.print(&stakes, describe_stakes);
        }
        StakeCommand::Slash { agent, stake } => {
            let (key, generated) = key_or_random(stake.id);
            let slash = Slash { key: key.clone(), agent, kind: stake.kind.kind(), amount: stake.amount };
            let slashed = client.slash_stake(&slash).await.with_context(|| retry_hint(&key, generated))?;
            api.print(&slashed, |transfer| {
                format!(
                    "slashed {} credits of {agent}'s {} stake to the treasury (id {key}, journal entry {})",
                    transfer.amount,
                    stake.kind.kind().as_str(),
                    transfer.seq
                )
            });
        }
    }
    Ok(())
}

// ---- molt ledger ----

#[derive(Debug, Args)]
#[command(
    about = "Mint credits, read and set the fee, read any account, audit the journal (admin)",
    long_about = ledger_long_about()
)]
pub struct LedgerArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: LedgerCommand,
}

fn ledger_long_about() -> String {
    format!(
        "The credits ledger's admin commands. Need an admin key (--token or MOLT_ADMIN_TOKEN) with \
the scope ledger:admin.

Minting debits the issuance account (whose negative balance is the money supply) and credits \
the treasury or an agent's wallet (which must be open). The fee, in basis points, is paid by \
the recipient of payments and escrow releases. The audit replays the whole journal (hash \
chain, totals, debits = credits) and exits with status 1 if it finds a problem.

{IDEMPOTENCY_HELP}

AMOUNT: {AMOUNT_HELP}.

Examples:
  molt ledger mint 1000 --to agent-… --id grant-1
  molt ledger mint 1000000                    # into the treasury
  molt ledger fee; molt ledger fee-set 25     # 0.25 %
  molt ledger account treasury; molt ledger account wallet:agent-…
  molt ledger audit"
    )
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Mint new credits into the treasury or an agent's wallet.
    Mint {
        #[arg(value_name = "AMOUNT", value_parser = positive_amount, allow_hyphen_values = true, help = AMOUNT_HELP)]
        amount: Credits,
        /// `treasury` (the default) or an agent id, whose wallet is credited.
        #[arg(long, value_name = "AGENT_ID|treasury", value_parser = parse_mint_target, default_value = "treasury")]
        to: MintTarget,
        /// The mint's idempotency key; a fresh one is made (and printed) without it.
        #[arg(long, value_name = "ID")]
        id: Option<TransferKey>,
    },
    /// Show the transfer fee.
    Fee,
    /// Set the transfer fee for transfers from now on.
    FeeSet {
        /// Basis points, 0 to 10000 (25 = 0.25 %).
        #[arg(value_name = "BPS", value_parser = clap::value_parser!(u32).range(0..=10_000))]
        fee_bps: u32,
    },
    /// Show any account: treasury, issuance, wallet:<agent>, stake:<agent>:<kind>, …
    Account {
        /// The account id; an agent id alone means its wallet.
        account: String,
    },
    /// Replay the journal and check it; exits with status 1 on a problem.
    Audit,
}

pub async fn run_ledger(args: LedgerArgs) -> anyhow::Result<()> {
    let api = &args.api;
    let client = api.client()?;
    match args.command {
        LedgerCommand::Mint { amount, to, id } => {
            let (key, generated) = key_or_random(id);
            let mint = Mint { key: key.clone(), amount, to };
            let minted = client.mint(&mint).await.with_context(|| retry_hint(&key, generated))?;
            api.print(&minted, |transfer| {
                format!(
                    "minted {} credits into {} (id {key}, journal entry {})",
                    transfer.amount, transfer.credit_account, transfer.seq
                )
            });
        }
        LedgerCommand::Fee => {
            let fee = client.fee().await?;
            api.print(&fee, |fee| format!("fee: {}, paid by the recipient", format_bps(fee.fee_bps)));
        }
        LedgerCommand::FeeSet { fee_bps } => {
            let fee = client.set_fee(fee_bps).await?;
            api.print(&fee, |fee| format!("fee set to {}", format_bps(fee.fee_bps)));
        }
        LedgerCommand::Account { account } => {
            let account = match account.parse::<AgentId>() {
                Ok(agent) => wallet_account(agent),
                Err(_) => account,
            };
            let account = client.ledger_account(&account).await?;
            api.print(&account, describe_account);
        }
        LedgerCommand::Audit => {
            let report = client.ledger_audit().await?;
            api.print(&report, describe_audit);
            if !report.ok {
                bail!("the ledger audit found {} problems", report.problem_count);
            }
        }
    }
    Ok(())
}

// ---- parsing ----

/// A positive amount (clap value parser).
fn positive_amount(text: &str) -> Result<Credits, String> {
    Credits::parse_positive(text).map_err(|error| error.to_string())
}

/// An amount, zero allowed (clap value parser).
fn any_amount(text: &str) -> Result<Credits, String> {
    text.parse::<Credits>().map_err(|error| error.to_string())
}

/// `treasury` or an agent id.
fn parse_mint_target(text: &str) -> Result<MintTarget, String> {
    if text == "treasury" {
        return Ok(MintTarget::Treasury);
    }
    let agent = text.strip_prefix("wallet:").unwrap_or(text);
    agent.parse().map(MintTarget::Wallet).map_err(|error| format!("expected `treasury` or an agent id: {error}"))
}

/// `NUMBER` followed by `s`, `m`, `h` or `d`, positive and at most [`ESCROW_LIFETIME_MAX`].
fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let malformed = || format!("{text:?} is not a duration: give a number and s, m, h or d, e.g. 90m or 7d");
    let split = text.len().saturating_sub(1);
    let (digits, unit) = (text.get(..split).ok_or_else(malformed)?, text.get(split..).ok_or_else(malformed)?);
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        _ => return Err(malformed()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    let too_long = || format!("an escrow lasts at most {} days", ESCROW_LIFETIME_MAX.as_secs() / 86_400);
    let count: u64 = digits.parse().map_err(|_| too_long())?;
    let secs = count.checked_mul(unit_secs).ok_or_else(too_long)?;
    if secs == 0 {
        return Err("the duration must be positive".to_owned());
    }
    if secs > ESCROW_LIFETIME_MAX.as_secs() {
        return Err(too_long());
    }
    Ok(Duration::from_secs(secs))
}

/// The given key, or a fresh random one; `true` if it was made here.
fn key_or_random(key: Option<TransferKey>) -> (TransferKey, bool) {
    match key {
        Some(key) => (key, false),
        None => (TransferKey::random(), true),
    }
}

/// Context for a failed call that moves credits: its id, so that the user can repeat it
/// safely.
fn retry_hint(key: &TransferKey, generated: bool) -> String {
    if generated {
        format!("request id {key} (generated; to repeat the request safely, pass --id {key})")
    } else {
        format!("request id {key}")
    }
}

/// An escrow id: `<payer>:<key>` as given, or the signer's own key.
fn escrow_id(text: &str, signer: &AgentCredentials) -> String {
    if text.contains(':') { text.to_owned() } else { format!("{}:{text}", signer.agent_id) }
}

// ---- output ----

fn describe_wallet(wallet: &Wallet) -> String {
    let account = &wallet.wallet;
    let mut text = format!("wallet of {}\n", wallet.agent);
    text.push_str(&format!("  balance    {} credits\n", account.balance));
    text.push_str(&format!("  available  {} credits", account.available));
    if !account.debits_pending.is_zero() {
        text.push_str(&format!(" ({} in escrow)", account.debits_pending));
    }
    text.push('\n');
    if !account.credits_pending.is_zero() {
        text.push_str(&format!("  incoming   {} credits in escrow\n", account.credits_pending));
    }
    for stake in &wallet.stakes {
        text.push_str(&format!("  {}  {} credits\n", stake.id, stake.balance));
    }
    text
}

/// One entry as the wallet sees it: `+` in, `-` out.
fn history_line(entry: &LedgerTransfer, wallet: &str) -> String {
    let (sign, other) =
        if entry.credit_account == wallet { ('+', &entry.debit_account) } else { ('-', &entry.credit_account) };
    let amount = format!("{sign}{}", entry.amount);
    // Pending entries hold credits without moving them; the balance changes only when the
    // hold is posted.
    let purpose = match entry.kind {
        TransferKind::Pending => format!("{} (held)", entry.purpose.as_str()),
        TransferKind::VoidPending => format!("{} (hold released)", entry.purpose.as_str()),
        _ => entry.purpose.as_str().to_owned(),
    };
    format!(
        "{:>6}  {}  {amount:>21}  {purpose:<14}  {other}  {}\n",
        entry.seq,
        format_time(entry.created_at_ms),
        entry.id
    )
}

fn describe_lookup(lookup: &TransferLookup) -> String {
    match (lookup.status, &lookup.transfer, &lookup.code) {
        (TransferStatus::Applied, Some(transfer), _) => format!(
            "{}: applied, {} credits from {} to {} (journal entry {})",
            lookup.id, transfer.amount, transfer.debit_account, transfer.credit_account, transfer.seq
        ),
        (TransferStatus::Rejected, _, Some(code)) => {
            format!("{}: refused ({code}); repeating it with this id gets the same answer", lookup.id)
        }
        _ => format!("{}: {:?}", lookup.id, lookup.status),
    }
}

fn describe_escrow(escrow: &Escrow) -> String {
    let (state, on_expiry) = (escrow.state.as_str(), escrow.on_expiry.as_str());
    let mut text = format!("escrow {}  [{state}]\n", escrow.id);
    text.push_str(&format!("  {} credits from {} to {}\n", escrow.amount, escrow.payer, escrow.payee));
    if escrow.state.is_resolved() {
        text.push_str(&format!("  released to the payee: {} credits\n", escrow.released));
    } else {
        text.push_str(&format!("  expires {} ({on_expiry})\n", format_time(escrow.expires_at_ms)));
    }
    text.push_str(&format!(
        "  created {}, updated {}\n",
        format_time(escrow.created_at_ms),
        format_time(escrow.updated_at_ms)
    ));
    text
}

fn describe_stakes(stakes: &Stakes) -> String {
    let mut text = String::new();
    for account in &stakes.stakes {
        text.push_str(&format!("{}  {} credits\n", account.id, account.balance));
    }
    for unbonding in &stakes.unbondings {
        text.push_str(&format!("unbonding {}\n", unbonding_line(unbonding)));
    }
    if text.is_empty() {
        text.push_str("no stake\n");
    }
    text
}

fn unbonding_line(unbonding: &Unbonding) -> String {
    let when = match unbonding.state {
        UnbondingState::Released => "back in the wallet".to_owned(),
        _ => format!("back in the wallet at {}", format_time(unbonding.matures_at_ms)),
    };
    format!("{} credits of {} stake, {when} ({})", unbonding.amount, unbonding.kind.as_str(), unbonding.id)
}

fn describe_account(account: &LedgerAccount) -> String {
    format!(
        "{}\n  balance    {} credits\n  available  {} credits\n  posted     {} in, {} out\n  pending    {} in, {} out\n",
        account.id,
        account.balance,
        account.available,
        account.credits_posted,
        account.debits_posted,
        account.credits_pending,
        account.debits_pending
    )
}

fn describe_audit(report: &LedgerAudit) -> String {
    let verdict = if report.ok { "ok" } else { "PROBLEMS FOUND" };
    let mut text = format!(
        "audit: {verdict}\n  {} journal entries, {} accounts\n  posted debits {} = credits {} credits\n  head hash {}\n",
        report.transfers, report.accounts, report.debits_posted, report.credits_posted, report.head_hash
    );
    for problem in &report.problems {
        text.push_str(&format!("  problem: {problem}\n"));
    }
    if report.problem_count > report.problems.len() as u64 {
        text.push_str(&format!("  … {} problems in all\n", report.problem_count));
    }
    text
}

/// Basis points as a percentage: 25 → `25 bps (0.25 %)`.
fn format_bps(bps: u32) -> String {
    format!("{bps} bps ({}.{:02} %)", bps / 100, bps % 100)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{Cli, Command};

    const AGENT: &str = "agent-aaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("molt").chain(args.iter().copied())).map_err(|error| error.to_string())
    }

    fn paid_amount(amount: &str) -> Result<u64, String> {
        match parse(&["pay", "--agent-dir", "a", "--to", AGENT, amount])?.command {
            Command::Pay(args) => Ok(args.amount.expect("an amount").micros()),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn amounts_on_the_command_line_are_exact() {
        assert_eq!(paid_amount("1.5"), Ok(1_500_000));
        assert_eq!(paid_amount("1500000u"), Ok(1_500_000));
        assert_eq!(paid_amount("0.000001"), Ok(1));
        let cases = [
            ("-1", "must not be negative"),
            ("0", "must be positive"),
            ("0u", "must be positive"),
            ("1.0000001", "at most 6 decimals"),
            ("1e3", "not an amount"),
            ("", "empty"),
            ("9223372036855", "too large"),
        ];
        for (amount, expected) in cases {
            let error = paid_amount(amount).unwrap_err();
            assert!(error.contains(expected), "{amount:?}: {error}");
        }
    }

    #[test]
    fn a_ruling_may_release_nothing() {
        let parsed = parse(&["escrow", "rule", &format!("{AGENT}:job"), "--release", "0"]).unwrap();
        let Command::Escrow(EscrowArgs { command: EscrowCommand::Rule { release, .. }, .. }) = parsed.command else {
            panic!("not a ruling");
        };
        assert!(release.is_zero());
        assert!(parse(&["escrow", "rule", "x:y", "--release", "-1"]).unwrap_err().contains("negative"));
    }

    #[test]
    fn ids_and_targets_are_checked() {
        let error = parse(&["pay", "--agent-dir", "a", "--to", AGENT, "1", "--id", "a:b"]).unwrap_err();
        assert!(error.contains("invalid id"), "{error}");
        assert!(parse(&["pay", "--agent-dir", "a", "--to", "bob", "1"]).is_err());
        assert_eq!(parse_mint_target("treasury"), Ok(MintTarget::Treasury));
        let agent: AgentId = AGENT.parse().unwrap();
        assert_eq!(parse_mint_target(AGENT), Ok(MintTarget::Wallet(agent)));
        assert_eq!(parse_mint_target(&format!("wallet:{AGENT}")), Ok(MintTarget::Wallet(agent)));
        assert!(parse_mint_target("issuance").is_err());
        assert!(parse(&["ledger", "fee-set", "10001"]).is_err());
    }

    #[test]
    fn escrow_lifetimes_parse() {
        assert_eq!(parse_lifetime("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_lifetime("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_lifetime("366d"), Ok(ESCROW_LIFETIME_MAX));
        for text in ["", "d", "7", "7w", "-1h", "1.5h", "é", "0s"] {
            assert!(parse_lifetime(text).is_err(), "{text:?}");
        }
        assert!(parse_lifetime("367d").unwrap_err().contains("at most 366 days"));
        assert!(parse_lifetime("99999999999999999999d").unwrap_err().contains("at most"));
    }

    #[test]
    fn escrow_ids_default_to_the_signers() {
        let signer = AgentCredentials::from_inception_key(molt_protocol::keys::SigningKey::from_bytes(&[7; 32]));
        assert_eq!(escrow_id("job-7", &signer), format!("{}:job-7", signer.agent_id));
        assert_eq!(escrow_id(&format!("{AGENT}:job-7"), &signer), format!("{AGENT}:job-7"));
    }

    #[test]
    fn fees_print_as_percentages() {
        assert_eq!(format_bps(25), "25 bps (0.25 %)");
        assert_eq!(format_bps(10_000), "10000 bps (100.00 %)");
    }
}

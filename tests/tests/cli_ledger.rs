//! The `molt` credits commands end to end, against a real `molt-control-plane` process on
//! its embedded SQLite default: an admin mints into an agent's wallet, the agent pays
//! another (a retry with the same id returns the first answer, the same id with other
//! fields is refused), escrows are released, refunded and ruled on, stake is locked,
//! unlocked and slashed, overspending fails with a clear error and exit status 1, and the
//! audit of the journal passes at the end.

use anyhow::{Context as _, ensure};
use molt_tests::control_plane::{Cli, ControlPlane, text};
use serde_json::Value;

const MICROS_PER_CREDIT: i64 = 1_000_000;

#[test]
fn credits_flow_through_the_cli() -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let control_plane = ControlPlane::start(temp.path())?;
    let admin = Cli { api: control_plane.url(), token: Some(control_plane.token.clone()), dir: temp.path().to_owned() };
    // Agent commands run without the admin token: their signature is their credential.
    let agents = Cli { token: None, ..admin.clone() };
    let alice = new_agent(&agents, "alice")?;
    let bob = new_agent(&agents, "bob")?;

    // Wallets: none before opening; minting into one.
    let missing = agents.fails(&["wallet", "show", "--agent-dir", "alice"])?;
    ensure!(missing.contains("wallet_not_found") && missing.contains("404"), "{missing}");
    for name in ["alice", "bob"] {
        let opened = agents.json(&["wallet", "open", "--agent-dir", name])?;
        ensure!(opened["wallet"]["balance"] == 0, "{opened}");
    }
    let minted = admin.json(&["ledger", "mint", "100", "--to", &alice, "--id", "grant-1"])?;
    ensure!(minted["amount"] == 100 * MICROS_PER_CREDIT && minted["purpose"] == "mint", "{minted}");
    ensure!(minted["credit_account"] == format!("wallet:{alice}").as_str(), "{minted}");
    let needs_token = agents.fails(&["ledger", "mint", "1", "--to", &alice])?;
    ensure!(needs_token.contains("an admin token is needed"), "{needs_token}");

    // A payment, its retry (same answer, paid once) and a conflicting reuse of its id.
    let pay = ["pay", "--agent-dir", "alice", "--to", bob.as_str(), "1.5", "--id", "invoice-1"];
    let paid = agents.json(&pay)?;
    ensure!(paid["amount"] == 1_500_000 && paid["id"] == format!("{alice}:invoice-1").as_str(), "{paid}");
    ensure!(agents.json(&pay)? == paid, "a retry with the same id returns the original transfer");
    let reused = agents.fails(&["pay", "--agent-dir", "alice", "--to", &bob, "2", "--id", "invoice-1"])?;
    ensure!(reused.contains("id_reused") && reused.contains("409") && reused.contains("invoice-1"), "{reused}");
    let human = agents.stdout(&["pay", "--agent-dir", "alice", "--to", &bob, "250000u"])?;
    ensure!(human.starts_with(&format!("paid 0.250000 credits to {bob} (id t-")), "a generated id is printed: {human}");
    ensure!(balance(&agents, "bob")? == 1_750_000, "bob was paid once per id");

    // Escrow: released by the payer (by its own id), then a second release is refused.
    let escrow = agents.json(&["escrow", "create", "--agent-dir", "alice", "--payee", &bob, "10", "--id", "job-1"])?;
    let escrow_id = text(&escrow, "id")?;
    ensure!(escrow["state"] == "locked" && escrow_id == format!("{alice}:job-1"), "{escrow}");
    let wallet = agents.json(&["wallet", "show", "--agent-dir", "alice"])?;
    ensure!(wallet["wallet"]["available"] == wallet["wallet"]["balance"].as_i64().context("balance")? - 10_000_000);
    ensure!(agents.json(&["escrow", "show", "--agent-dir", "bob", &escrow_id])?["state"] == "locked");
    let released = agents.json(&["escrow", "release", "--agent-dir", "alice", "job-1"])?;
    ensure!(released["state"] == "released" && released["released"] == 10 * MICROS_PER_CREDIT, "{released}");
    let again = agents.fails(&["escrow", "release", "--agent-dir", "alice", "job-1"])?;
    ensure!(again.contains("escrow_resolved") && again.contains("409"), "{again}");

    // Escrow: refunded by the payee; disputed, then ruled on by an admin.
    agents.json(&["escrow", "create", "--agent-dir", "alice", "--payee", &bob, "5", "--id", "job-2"])?;
    let refunded = agents.json(&["escrow", "refund", "--agent-dir", "bob", &format!("{alice}:job-2")])?;
    ensure!(refunded["state"] == "refunded" && refunded["released"] == 0, "{refunded}");
    let refused = agents.fails(&["escrow", "refund", "--agent-dir", "alice", "job-2"])?;
    ensure!(refused.contains("escrow_resolved"), "{refused}");
    agents.json(&[
        "escrow",
        "create",
        "--agent-dir",
        "alice",
        "--payee",
        &bob,
        "4",
        "--id",
        "job-3",
        "--expires-in",
        "1h",
    ])?;
    let job_3 = format!("{alice}:job-3");
    ensure!(agents.json(&["escrow", "dispute", "--agent-dir", "bob", &job_3])?["state"] == "disputed");
    let ruled = admin.json(&["escrow", "rule", &job_3, "--release", "1"])?;
    ensure!(ruled["state"] == "released" && ruled["released"] == MICROS_PER_CREDIT, "{ruled}");
    let shown = agents.stdout(&["escrow", "show", "--agent-dir", "alice", "job-3"])?;
    ensure!(shown.contains("[released]") && shown.contains("1.000000 credits"), "{shown}");

    // Stake: lock, show, unlock, slash.
    let locked = agents.json(&["stake", "lock", "--agent-dir", "alice", "--kind", "trust", "20", "--id", "stake-1"])?;
    ensure!(locked["purpose"] == "stake_lock" && locked["amount"] == 20 * MICROS_PER_CREDIT, "{locked}");
    let stake_account = format!("stake:{alice}:trust");
    ensure!(stake_balance(&agents, &stake_account)? == 20 * MICROS_PER_CREDIT);
    let unbonding =
        agents.json(&["stake", "unlock", "--agent-dir", "alice", "--kind", "trust", "5", "--id", "unstake-1"])?;
    ensure!(unbonding["state"] == "unbonding" && unbonding["amount"] == 5 * MICROS_PER_CREDIT, "{unbonding}");
    admin.json(&["stake", "slash", "--agent", &alice, "--kind", "trust", "2", "--id", "case-1"])?;
    ensure!(stake_balance(&agents, &stake_account)? == 13 * MICROS_PER_CREDIT, "20 locked, 5 unbonding, 2 slashed");
    let human = agents.stdout(&["stake", "show", "--agent-dir", "alice"])?;
    ensure!(human.contains(&format!("{stake_account}  13.000000 credits")), "{human}");

    // Balances: 100 − 1.5 − 0.25 − 10 (released) − 1 (ruled) − 20 (staked).
    let expected_alice = 67_250_000;
    ensure!(balance(&agents, "alice")? == expected_alice);
    let account = admin.json(&["ledger", "account", &alice])?;
    ensure!(account["balance"] == expected_alice && account["id"] == format!("wallet:{alice}").as_str(), "{account}");
    ensure!(balance(&agents, "bob")? == 12_750_000, "1.5 + 0.25 + 10 + 1");
    let shown = agents.stdout(&["wallet", "show", "--agent-dir", "alice"])?;
    ensure!(shown.contains("balance    67.250000 credits"), "{shown}");

    // Overspending: a clear error and exit status 1; the refusal is remembered under its id.
    let broke = agents.fails(&["pay", "--agent-dir", "alice", "--to", &bob, "1000", "--id", "too-much"])?;
    ensure!(broke.contains("insufficient funds") && broke.contains("insufficient_funds"), "{broke}");
    let lookup = agents.json(&["wallet", "transfer", "--agent-dir", "alice", "too-much"])?;
    ensure!(lookup["status"] == "rejected" && lookup["code"] == "insufficient_funds", "{lookup}");
    ensure!(balance(&agents, "alice")? == expected_alice, "nothing moved");

    // Amounts are checked before anything is sent: usage errors, exit status 2.
    for (amount, expected) in [("-1", "negative"), ("0", "positive"), ("0.0000001", "6 decimals"), ("1e3", "1500000u")]
    {
        let error = agents.fails_with(2, &["pay", "--agent-dir", "alice", "--to", &bob, amount])?;
        ensure!(error.contains(expected), "{amount}: {error}");
    }

    // History, newest first, signed as the wallet sees it.
    let history = agents.json(&["wallet", "history", "--agent-dir", "alice", "--limit", "2"])?;
    ensure!(history["items"].as_array().is_some_and(|items| items.len() == 2) && history["next_before"].is_u64());
    let human = agents.stdout(&["wallet", "history", "--agent-dir", "alice", "--limit", "1000"])?;
    ensure!(human.contains("+100.000000") && human.contains("-1.500000") && human.contains("payment"), "{human}");

    // A batch: one transaction, a result per payment, idempotent as a whole.
    let batch = temp.path().join("batch.json");
    let lines =
        format!(r#"[{{"to": "{bob}", "amount": "1", "id": "b-1"}}, {{"to": "{bob}", "amount": "2u", "id": "b-2"}}]"#);
    std::fs::write(&batch, lines)?;
    let batch_arg = batch.to_str().context("utf-8 path")?;
    let paid = agents.json(&["pay", "--agent-dir", "alice", "--batch", batch_arg])?;
    let results = paid["results"].as_array().context("results")?;
    ensure!(results.len() == 2 && results.iter().all(|item| item["transfer"].is_object()), "{paid}");
    ensure!(agents.json(&["pay", "--agent-dir", "alice", "--batch", batch_arg])? == paid, "a resent batch pays once");
    ensure!(balance(&agents, "bob")? == 13_750_002, "bob was paid the batch once");
    std::fs::write(&batch, format!(r#"[{{"to": "{bob}", "amount": "1u"}}, {{"to": "{bob}", "amount": "1000000"}}]"#))?;
    let partly = agents.fails(&["pay", "--agent-dir", "alice", "--batch", batch_arg])?;
    ensure!(partly.contains("1 of 2 payments were refused"), "{partly}");
    std::fs::write(&batch, format!(r#"[{{"to": "{bob}", "amount": "-1"}}]"#))?;
    let malformed = agents.fails(&["pay", "--agent-dir", "alice", "--batch", batch_arg])?;
    ensure!(malformed.contains("payment 0"), "{malformed}");
    ensure!(balance(&agents, "bob")? == 13_750_003, "only the valid payment of the partial batch was paid");
    let both = agents.fails_with(2, &["pay", "--agent-dir", "alice", "--to", &bob, "1", "--batch", batch_arg])?;
    ensure!(both.contains("cannot be used with"), "{both}");

    // The fee, and the audit of everything above.
    ensure!(admin.json(&["ledger", "fee-set", "25"])?["fee_bps"] == 25);
    ensure!(admin.stdout(&["ledger", "fee"])?.contains("25 bps (0.25 %)"));
    let audit = admin.json(&["ledger", "audit"])?;
    ensure!(audit["ok"] == true && audit["problem_count"] == 0, "{audit}");
    ensure!(audit["debits_posted"] == audit["credits_posted"], "{audit}");
    ensure!(admin.stdout(&["ledger", "audit"])?.starts_with("audit: ok"));
    Ok(())
}

/// A registered agent with its keys in `dir/name`; its id.
fn new_agent(cli: &Cli, name: &str) -> anyhow::Result<String> {
    let id = cli.stdout(&["keygen", "--dir", name])?.trim().to_owned();
    let registered = cli.json(&["agent", "register", "--agent-dir", name, "--name", name])?;
    ensure!(registered["id"] == id.as_str(), "{registered}");
    Ok(id)
}

/// The agent's wallet balance in micro-credits.
fn balance(cli: &Cli, name: &str) -> anyhow::Result<i64> {
    let wallet = cli.json(&["wallet", "show", "--agent-dir", name])?;
    wallet["wallet"]["balance"].as_i64().with_context(|| format!("no balance in {wallet}"))
}

/// The balance of one of alice's stake accounts, from `molt stake show`.
fn stake_balance(cli: &Cli, account: &str) -> anyhow::Result<i64> {
    let stakes = cli.json(&["stake", "show", "--agent-dir", "alice"])?;
    let found = stakes["stakes"].as_array().and_then(|accounts| accounts.iter().find(|a| a["id"] == account));
    found.and_then(|account: &Value| account["balance"].as_i64()).with_context(|| format!("no {account} in {stakes}"))
}

//! Key rotation and social recovery through `molt`, against a real `molt-control-plane`
//! process (embedded SQLite, a 3-second recovery time lock): the agent directory keeps
//! its id while its key and certificate change, guardians recover a lost key only after
//! the time lock, and the lost key stops working.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use molt_sdk::dev::{AgentFiles, PREVIOUS_AGENT_KEY_FILE};
use molt_tests::control_plane::{Cli, ControlPlane, text};

const TIME_LOCK_SECS: u64 = 3;

#[test]
fn keys_rotate_and_guardians_recover_through_the_cli() -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let lock = TIME_LOCK_SECS.to_string();
    let control_plane =
        ControlPlane::start_with_env(temp.path(), &[("MOLT_CP_RECOVERY_TIME_LOCK_SECS", lock.as_str())])?;
    let admin = Cli { api: control_plane.url(), token: Some(control_plane.token.clone()), dir: temp.path().to_owned() };
    let agents = Cli { token: None, ..admin.clone() };
    let org = text(&admin.json(&["org", "create", "acme"])?, "id")?;
    let alice = new_agent(&agents, "alice")?;
    admin.json(&["cert", "issue-agent", "--org", &org, "--agent-dir", "alice"])?;
    let inception = public_key(temp.path(), "alice")?;

    // Rotation: same id, new key and certificate on disk, the old key kept aside.
    let rotation = agents.json(&["agent", "rotate-key", "--agent-dir", "alice", "--overlap", "0"])?;
    ensure!(rotation["epoch"] == 1 && rotation["agent_id"] == alice.as_str(), "{rotation}");
    let rotated = AgentFiles::load(&temp.path().join("alice")).context("the rotated directory loads")?;
    ensure!(rotated.agent_id.to_string() == alice, "the id did not change");
    ensure!(rotated.chain[0].serial().to_string() == text(&rotation["certificate"], "serial")?);
    ensure!(public_key(temp.path(), "alice")? != inception, "agent.key holds the new key");
    ensure!(temp.path().join("alice").join(PREVIOUS_AGENT_KEY_FILE).exists(), "the old key is kept");
    let history = agents.json(&["agent", "keys", &alice])?;
    ensure!(history["current_public_key"] == public_key(temp.path(), "alice")?.as_str(), "{history}");
    agents.json(&["agent", "heartbeat", "--agent-dir", "alice"])?;
    let human = agents.stdout(&["agent", "keys", &alice])?;
    ensure!(human.contains("rotation #1"), "{human}");

    // Guardians, then a recovery to a key prepared in a new directory.
    let g1 = new_agent(&agents, "g1")?;
    let g2 = new_agent(&agents, "g2")?;
    let too_many =
        agents.fails(&["agent", "guardians", "set", "--agent-dir", "alice", "--threshold", "3", &g1, &g2])?;
    ensure!(too_many.contains("invalid_guardians"), "{too_many}");
    let set = agents.json(&["agent", "guardians", "set", "--agent-dir", "alice", "--threshold", "2", &g1, &g2])?;
    ensure!(set["threshold"] == 2, "{set}");
    let prepared = agents.json(&["agent", "recovery", "prepare", "--agent-dir", "alice-new", "--agent", &alice])?;
    let new_key = text(&prepared, "new_public_key")?;
    let bad_key = agents
        .fails_with(2, &["agent", "recovery", "open", "--agent-dir", "g1", "--agent", &alice, "--new-key", "zz"])?;
    ensure!(bad_key.contains("64 hexadecimal digits"), "{bad_key}");
    let opened =
        agents.json(&["agent", "recovery", "open", "--agent-dir", "g1", "--agent", &alice, "--new-key", &new_key])?;
    ensure!(opened["state"] == "collecting", "{opened}");
    let recovery = text(&opened, "id")?;
    let early =
        agents.fails(&["agent", "recovery", "complete", "--agent-dir", "alice-new", "--recovery", &recovery])?;
    ensure!(early.contains("recovery_not_approved"), "{early}");
    let approve = ["agent", "recovery", "approve", "--agent-dir", "g2", "--agent", &alice, "--recovery", &recovery];
    let approved = agents.json(&[&approve[..], &["--new-key", &new_key]].concat())?;
    ensure!(approved["state"] == "time_locked", "{approved}");
    let locked =
        agents.fails(&["agent", "recovery", "complete", "--agent-dir", "alice-new", "--recovery", &recovery])?;
    ensure!(locked.contains("recovery_time_locked"), "{locked}");
    let shown = agents.stdout(&["agent", "recovery", "show", "--agent", &alice, "--recovery", &recovery])?;
    ensure!(shown.contains("time_locked (2 of 2 guardians approved)"), "{shown}");

    std::thread::sleep(Duration::from_secs(TIME_LOCK_SECS) + Duration::from_millis(500));
    let completed =
        agents.json(&["agent", "recovery", "complete", "--agent-dir", "alice-new", "--recovery", &recovery])?;
    ensure!(completed["recovery"]["state"] == "completed", "{completed}");
    let recovered = AgentFiles::load(&temp.path().join("alice-new")).context("the recovered directory loads")?;
    ensure!(recovered.agent_id.to_string() == alice && public_key(temp.path(), "alice-new")? == new_key);
    agents.json(&["agent", "heartbeat", "--agent-dir", "alice-new"])?;
    let lost = agents.fails(&["agent", "heartbeat", "--agent-dir", "alice"])?;
    ensure!(lost.contains("invalid_signature"), "the lost key is refused: {lost}");
    Ok(())
}

/// A registered agent with its keys in `dir/name`; its id.
fn new_agent(cli: &Cli, name: &str) -> anyhow::Result<String> {
    let id = cli.stdout(&["keygen", "--dir", name])?.trim().to_owned();
    let registered = cli.json(&["agent", "register", "--agent-dir", name, "--name", name])?;
    ensure!(registered["id"] == id.as_str(), "{registered}");
    Ok(id)
}

/// The public key of `dir/name/agent.key`, in hex.
fn public_key(dir: &Path, name: &str) -> anyhow::Result<String> {
    let keys = AgentFiles::load_keys(&dir.join(name))?;
    Ok(hex::encode(keys.signing_key.public_key().as_bytes()))
}

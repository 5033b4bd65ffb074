//! The `molt` admin and registry commands end to end, against a real `molt-control-plane`
//! process on its embedded SQLite default: the admin reads the bootstrap credential the
//! control plane prints once, creates an org and its CA, issues an agent certificate
//! with proof of possession, the agent registers and is found by search, and after the
//! admin revokes it its signed requests are refused.

use anyhow::{Context as _, ensure};
use molt_tests::control_plane::{Cli, ControlPlane, text};

#[test]
fn admin_and_agent_flows_through_the_cli() -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let control_plane = ControlPlane::start(temp.path())?;
    let cli = Cli { api: control_plane.url(), token: Some(control_plane.token.clone()), dir: temp.path().to_owned() };

    // Orgs and the org CA.
    let org = cli.json(&["org", "create", "acme"])?;
    let org_id = text(&org, "id")?;
    ensure!(org["name"] == "acme", "{org}");
    let duplicate = cli.fails(&["org", "create", "acme"])?;
    ensure!(duplicate.contains("org_name_taken") && duplicate.contains("409"), "{duplicate}");
    let listed = cli.json(&["org", "list"])?;
    ensure!(listed["items"][0]["id"] == org_id.as_str(), "{listed}");
    ensure!(cli.json(&["org", "show", &org_id])?["name"] == "acme");
    let ca = cli.json(&["org", "ca", "create", &org_id])?;
    ensure!(ca["created"] == true && ca["org_id"] == org_id.as_str(), "{ca}");
    ensure!(cli.json(&["org", "ca", "create", &org_id])?["created"] == false, "the second call finds the CA");

    // An agent certificate, with proof of possession of the agent's key.
    let agent_id = cli.stdout(&["keygen", "--dir", "alice"])?.trim().to_owned();
    let issued = cli.json(&["cert", "issue-agent", "--org", &org_id, "--agent-dir", "alice"])?;
    ensure!(issued["subject_id"] == agent_id.as_str() && issued["kind"] == "agent", "{issued}");
    let serial = text(&issued, "serial")?;
    for file in ["agent.pem", "card.json"] {
        ensure!(temp.path().join("alice").join(file).exists(), "issue-agent wrote {file}");
    }

    // Registration, search, heartbeat, card round trip.
    let registered = cli.json(&[
        "agent",
        "register",
        "--agent-dir",
        "alice",
        "--name",
        "Alice Translator",
        "--description",
        "translates between forty languages",
        "--capability",
        "translate.text@1.2#nlp,text",
    ])?;
    ensure!(registered["id"] == agent_id.as_str() && registered["health"] == "online", "{registered}");
    ensure!(registered["key_binding"].is_string(), "the encryption key is published by default: {registered}");
    let found = cli.json(&["agent", "search", "translator"])?;
    ensure!(found["items"][0]["agent"]["id"] == agent_id.as_str(), "{found}");
    let by_capability = cli.json(&["agent", "search", "--capability", "translate.text", "--tag", "nlp"])?;
    ensure!(by_capability["items"][0]["agent"]["id"] == agent_id.as_str(), "{by_capability}");
    let human = cli.stdout(&["agent", "search", "translater"])?;
    ensure!(human.contains(&agent_id) && human.contains("Alice Translator"), "typo-tolerant, human output: {human}");
    ensure!(cli.json(&["agent", "heartbeat", "--agent-dir", "alice"])?["health"] == "online");
    cli.stdout(&["agent", "export-card", &agent_id, "--out", "card-a2a.json"])?;
    let imported = cli.json(&["agent", "import-card", "--agent-dir", "alice", "card-a2a.json"])?;
    ensure!(imported["revision"] == 2 && imported["capabilities"] == registered["capabilities"], "{imported}");
    let shown = cli.json(&["agent", "show", &agent_id])?;
    ensure!(shown["name"] == "Alice Translator", "{shown}");

    // Admin keys: a read-only key cannot create orgs.
    let reader = cli.json(&["admin-key", "create", "--name", "reader", "--scope", "read"])?;
    let reader_cli = Cli { token: Some(text(&reader, "token")?), ..cli.clone() };
    ensure!(reader_cli.json(&["org", "list"])?["items"].as_array().is_some_and(|items| items.len() == 1));
    let refused = reader_cli.fails(&["org", "create", "other"])?;
    ensure!(refused.contains("missing_scope") && refused.contains("403"), "{refused}");
    let keys = cli.json(&["admin-key", "list"])?;
    ensure!(keys["items"].as_array().is_some_and(|items| items.len() == 2), "{keys}");
    let revoked_key = cli.json(&["admin-key", "revoke", &text(&reader["key"], "id")?])?;
    ensure!(revoked_key["revoked_at_ms"].is_u64(), "{revoked_key}");
    ensure!(reader_cli.fails(&["org", "list"])?.contains("revoked_credentials"));

    // Revocation: the agent leaves search and its signed requests are refused.
    let before = cli.json(&["cert", "trust-bundle"])?["sequence"].as_u64().context("sequence")?;
    let revoked = cli.json(&["agent", "revoke", &agent_id])?;
    ensure!(revoked["id"] == agent_id.as_str(), "{revoked}");
    ensure!(cli.json(&["agent", "revoke", &agent_id])? == revoked, "revoking again changes nothing");
    let refused = cli.fails(&["agent", "heartbeat", "--agent-dir", "alice"])?;
    ensure!(refused.contains("revoked_agent") && refused.contains("401"), "{refused}");
    let refused = cli.fails(&["agent", "update", "--agent-dir", "alice", "--name", "Alice Again"])?;
    ensure!(refused.contains("revoked_agent"), "{refused}");
    let after = cli.json(&["agent", "search", "translator"])?;
    ensure!(after["items"].as_array().is_some_and(Vec::is_empty), "{after}");
    ensure!(cli.fails(&["agent", "show", &agent_id])?.contains("not_found"));

    // Revoking the agent revoked its certificate, which shows in the trust bundle;
    // revoking the certificate again returns that first revocation.
    let revocation = cli.json(&["cert", "revoke", &serial, "--reason", "key_compromise"])?;
    ensure!(revocation["reason"] == "cessation_of_operation", "{revocation}");
    let bundle = cli.json(&["cert", "trust-bundle"])?;
    ensure!(bundle["sequence"].as_u64() > Some(before), "{bundle}");
    Ok(())
}

#[test]
fn the_cli_reports_problems_and_missing_credentials() -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let control_plane = ControlPlane::start(temp.path())?;
    let anonymous = Cli { api: control_plane.url(), token: None, dir: temp.path().to_owned() };

    let missing = anonymous.fails(&["org", "list"])?;
    ensure!(missing.contains("an admin token is needed"), "{missing}");
    let forged = Cli { token: Some("molt_admin_not-a-real-token".to_owned()), ..anonymous.clone() };
    ensure!(forged.fails(&["org", "list"])?.contains("invalid_credentials"));
    let admin = Cli { token: Some(control_plane.token.clone()), ..anonymous.clone() };
    let invalid = admin.fails(&["org", "create", "Not A Label"])?;
    ensure!(invalid.starts_with("error: creating an org: ") && invalid.contains("HTTP 422"), "{invalid}");
    let unknown = admin.fails(&["cert", "issue-agent", "--org", "org_nope", "--agent-dir", "nobody"])?;
    ensure!(unknown.contains("agent keys"), "no keys yet: {unknown}");

    // Unregistered agents cannot heartbeat; a foreign card is refused with the server's detail.
    anonymous.stdout(&["keygen", "--dir", "bob"])?;
    ensure!(anonymous.fails(&["agent", "heartbeat", "--agent-dir", "bob"])?.contains("unknown_agent"));
    let card = temp.path().join("foreign.json");
    std::fs::write(
        &card,
        r#"{"name": "Foreign", "url": "https://agent.example/a2a", "version": "1", "skills": [],
            "defaultInputModes": ["application/json"], "defaultOutputModes": ["application/json"]}"#,
    )?;
    let refused = anonymous.fails(&["agent", "import-card", "--agent-dir", "bob", "foreign.json"])?;
    ensure!(refused.contains("unmappable_card") && refused.contains("url"), "{refused}");
    let unreachable = Cli { api: "http://127.0.0.1:9".to_owned(), ..anonymous.clone() };
    ensure!(unreachable.fails(&["agent", "search"])?.contains("searching agents"));
    Ok(())
}

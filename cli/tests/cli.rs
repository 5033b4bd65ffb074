//! Runs the built `molt` binary through the development PKI workflow and its error paths.
//! Sending and listening through a real edge are tested end to end in `molt-tests`.

use std::path::Path;
use std::process::{Command, Output};

use molt_protocol::UnixMillis;
use molt_protocol::cert::{Certificate, Revocations, Role, TrustAnchors};
use molt_protocol::{AgentId, EdgeId};
use molt_sdk::dev::{self, AgentCard, DevError};

fn molt(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_molt")).args(args).current_dir(dir).output().expect("molt runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[track_caller]
fn succeeds(args: &[&str], dir: &Path) -> String {
    let output = molt(args, dir);
    assert!(output.status.success(), "molt {args:?} failed: {}", stderr(&output));
    stdout(&output)
}

/// Exit code 1 and exactly one line on stderr, starting with `error:`; returns that line.
#[track_caller]
fn fails(args: &[&str], dir: &Path) -> String {
    let output = molt(args, dir);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "molt {args:?}: {message}");
    assert!(message.starts_with("error: "), "{message}");
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");
    assert!(!message.contains("panicked"), "{message}");
    message
}

fn new_agent(name: &str, dir: &Path) -> (AgentId, String) {
    let agent_id: AgentId = succeeds(&["keygen", "--dir", name], dir).trim().parse().unwrap();
    let serial = succeeds(&["dev-ca", "issue-agent", "--ca", "ca", "--agent-dir", name], dir).trim().to_owned();
    (agent_id, serial)
}

fn trust(dir: &Path) -> (TrustAnchors, Revocations) {
    let anchors = TrustAnchors::from_pem(&std::fs::read_to_string(dir.join("ca/root.pem")).unwrap()).unwrap();
    let org = dev::read_certificate(&dir.join("ca/org.pem")).unwrap();
    let mut revocations = Revocations::default();
    revocations.extend_from(&dev::read_revocation_list(&dir.join("ca/revoked.crl"), &org).unwrap());
    (anchors, revocations)
}

#[test]
fn keygen_issue_show_card_issue_edge_and_revoke() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    succeeds(&["dev-ca", "init", "--dir", "ca"], dir);

    let (alice, serial) = new_agent("alice", dir);
    assert_eq!(std::fs::read_to_string(dir.join("alice/agent.id")).unwrap().trim(), alice.to_string());
    assert_eq!(serial.len(), 32, "{serial}");
    assert!(serial.chars().all(|c| c.is_ascii_hexdigit()), "{serial}");

    let card_json = succeeds(&["card", "show", "--agent-dir", "alice"], dir);
    let card: AgentCard = serde_json::from_str(&card_json).unwrap();
    assert_eq!(card.agent_id, alice);
    let chain = Certificate::chain_from_pem(&card.certificate_chain).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0].serial().to_string(), serial);
    let now = UnixMillis::now_from_system();
    let (anchors, revocations) = trust(dir);
    assert_eq!(card.verify(&anchors, &revocations, now).unwrap().0, alice);

    let edge_id: EdgeId =
        succeeds(&["dev-ca", "issue-edge", "--ca", "ca", "--out", "edge"], dir).trim().parse().unwrap();
    let edge_leaf = dev::read_certificate(&dir.join("edge/edge.pem")).unwrap();
    assert_eq!(edge_leaf.role(), Role::Edge(edge_id));
    assert_eq!(edge_leaf.dns_names(), ["localhost".to_owned()]);
    for name in ["edge.key", "root.pem", "org.pem", "revoked.crl"] {
        assert!(dir.join("edge").join(name).is_file(), "{name}");
    }
    let named: EdgeId = succeeds(
        &["dev-ca", "issue-edge", "--ca", "ca", "--out", "edge-eu", "--dns", "eu.example.net", "--dns", "localhost"],
        dir,
    )
    .trim()
    .parse()
    .unwrap();
    assert_ne!(named, edge_id);
    let named_leaf = dev::read_certificate(&dir.join("edge-eu/edge.pem")).unwrap();
    assert_eq!(named_leaf.dns_names(), ["eu.example.net".to_owned(), "localhost".to_owned()]);

    // Revoking by certificate file makes alice's card fail against the new CRL.
    let revoked = succeeds(&["dev-ca", "revoke", "--ca", "ca", "--cert", "alice/agent.pem"], dir);
    assert!(revoked.contains(&serial) && revoked.contains("CRL number 2"), "{revoked}");
    let (anchors, revocations) = trust(dir);
    assert!(matches!(card.verify(&anchors, &revocations, now), Err(DevError::CardVerify(_))));

    // Revoking by serial, as issue-agent printed it.
    let (bob, bob_serial) = new_agent("bob", dir);
    let bob_card = AgentCard::load(&dir.join("bob/card.json")).unwrap();
    assert_eq!(bob_card.verify(&anchors, &revocations, now).unwrap().0, bob);
    let revoked = succeeds(&["dev-ca", "revoke", "--ca", "ca", "--serial", &bob_serial], dir);
    assert!(revoked.contains("CRL number 3") && revoked.contains("2 serial(s)"), "{revoked}");
    let (_, revocations) = trust(dir);
    assert!(bob_card.verify(&anchors, &revocations, now).is_err());
}

#[test]
fn existing_ca_and_agent_keys_are_not_overwritten() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    succeeds(&["dev-ca", "init", "--dir", "ca"], dir);
    let root = std::fs::read(dir.join("ca/root.key")).unwrap();
    let message = fails(&["dev-ca", "init", "--dir", "ca"], dir);
    assert!(message.contains("root.pem already exists; refusing to overwrite it"), "{message}");
    assert_eq!(std::fs::read(dir.join("ca/root.key")).unwrap(), root);

    succeeds(&["keygen", "--dir", "alice"], dir);
    let message = fails(&["keygen", "--dir", "alice"], dir);
    assert!(message.contains("already exists"), "{message}");

    succeeds(&["dev-ca", "issue-edge", "--ca", "ca", "--out", "edge"], dir);
    let message = fails(&["dev-ca", "issue-edge", "--ca", "ca", "--out", "edge"], dir);
    assert!(message.contains("edge.key already exists"), "{message}");
}

#[test]
fn user_mistakes_fail_with_one_clear_line() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    succeeds(&["dev-ca", "init", "--dir", "ca"], dir);

    let message = fails(&["dev-ca", "revoke", "--ca", "ca", "--serial", "not-hex"], dir);
    assert!(message.contains("--serial") && message.contains("32 hexadecimal digits"), "{message}");
    let message = fails(&["dev-ca", "revoke", "--ca", "ca", "--cert", "missing.pem"], dir);
    assert!(message.contains("--cert") && message.contains("missing.pem"), "{message}");
    let message = fails(&["dev-ca", "issue-agent", "--ca", "no-such-ca", "--agent-dir", "alice"], dir);
    assert!(message.contains("molt dev-ca init"), "{message}");
    let message = fails(&["dev-ca", "issue-agent", "--ca", "ca", "--agent-dir", "nobody"], dir);
    assert!(message.contains("no agent keys"), "{message}");

    succeeds(&["keygen", "--dir", "alice"], dir);
    let message = fails(&["card", "show", "--agent-dir", "alice"], dir);
    assert!(message.contains("molt dev-ca issue-agent"), "{message}");
    let message = fails(
        &["send", "--agent-dir", "alice", "--edge", "localhost:4433", "--ca-root", "ca/root.pem", "--to", "x", "hi"],
        dir,
    );
    assert!(message.contains("no certificate"), "{message}");

    succeeds(&["dev-ca", "issue-agent", "--ca", "ca", "--agent-dir", "alice"], dir);
    let send = |edge: &str, extra: &[&str]| {
        let mut args =
            vec!["send", "--agent-dir", "alice", "--edge", edge, "--ca-root", "ca/root.pem", "--to", "alice/card.json"];
        args.extend_from_slice(extra);
        args.push("hello");
        fails(&args, dir)
    };
    let message = send("no-port", &[]);
    assert!(message.contains("HOST:PORT"), "{message}");
    let message = send("localhost:4433", &["--ttl-secs", "0"]);
    assert!(message.contains("--ttl-secs"), "{message}");
    let message = fails(
        &[
            "listen",
            "--agent-dir",
            "alice",
            "--edge",
            "localhost:4433",
            "--ca-root",
            "ca/org.pem",
            "--peer",
            "alice/card.json",
        ],
        dir,
    );
    assert!(message.contains("--ca-root"), "{message}");

    // A usage error is clap's: exit status 2 with usage help.
    let output = molt(&["dev-ca", "revoke", "--ca", "ca"], dir);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--serial"));
    // Without --edge, send and listen need the control plane whose edge map they choose from.
    let output = Command::new(env!("CARGO_BIN_EXE_molt"))
        .args(["send", "--agent-dir", "alice", "--ca-root", "ca/root.pem", "--to", "alice/card.json", "hi"])
        .current_dir(dir)
        .env_remove("MOLT_API")
        .output()
        .expect("molt runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--edge"), "{}", stderr(&output));
}

#[test]
fn every_command_explains_itself_with_an_example() {
    let temp = tempfile::tempdir().unwrap();
    let top = succeeds(&["--help"], temp.path());
    assert!(top.contains("Quick start"), "{top}");
    let commands: [&[&str]; 11] = [
        &["up"],
        &["demo"],
        &["keygen"],
        &["dev-ca"],
        &["dev-ca", "init"],
        &["dev-ca", "issue-agent"],
        &["dev-ca", "issue-edge"],
        &["dev-ca", "revoke"],
        &["card", "show"],
        &["send"],
        &["listen"],
    ];
    for command in commands {
        let mut args = command.to_vec();
        args.push("--help");
        let help = succeeds(&args, temp.path());
        assert!(help.contains("Example"), "molt {command:?} --help:\n{help}");
    }
}

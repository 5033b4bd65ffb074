//! The `molt-edge` binary's configuration commands, run as a user would.

use std::process::Command;

fn molt_edge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_molt-edge"))
}

#[test]
fn reference_config_is_printed_and_passes_check() {
    let output = molt_edge().args(["config", "reference"]).output().unwrap();
    assert!(output.status.success());
    let reference = String::from_utf8(output.stdout).unwrap();
    assert!(reference.contains("[limits]") && reference.contains("messages_per_minute"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, &reference).unwrap();
    let output = molt_edge().args(["config", "check"]).arg(&path).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok"));
}

#[test]
fn check_reports_every_problem_with_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(
        &path,
        "[edge]\nlisten_addr = \"not an address\"\n\n[identity]\ncertificate_chain = \"edge.pem\"\n\n\
         [trust]\nanchors = \"root.pem\"\n\n[limits]\nmessages_per_minute = 0\nmesages_per_hour = 5\n",
    )
    .unwrap();
    let output = molt_edge().args(["config", "check"]).arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    for expected in
        ["edge.listen_addr", ":2:", "identity.private_key", "limits.messages_per_minute", "mesages_per_hour"]
    {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
}

#[test]
fn running_without_a_usable_config_fails_clearly() {
    let output = molt_edge().output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--config"));
    let output = molt_edge().args(["--config", "/nonexistent/edge.toml"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/edge.toml"));
}

#[test]
fn unreadable_identity_files_stop_the_edge_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(
        &path,
        "[edge]\nlisten_addr = \"127.0.0.1:0\"\nadmin_addr = \"127.0.0.1:0\"\n[identity]\ncertificate_chain = \"missing.pem\"\n\
         private_key = \"missing.key\"\n[trust]\nanchors = \"root.pem\"\n",
    )
    .unwrap();
    let output = molt_edge().arg("--config").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("edge identity") && stderr.contains("missing.pem"), "{stderr}");
}

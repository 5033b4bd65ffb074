//! `molt-provision` against a real control plane: enrolling a device (key in a file or in
//! a SoftHSM2 token), re-running it, refusing to clobber another identity, and every kind
//! of failure (wrong, expired or unspendable token, unreachable control plane, read-only
//! and full directories) leaving the previous identity exactly as it was; then a batch
//! with one bad device.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use molt_tests::control_plane::{ControlPlane, run};
use molt_tests::{binary, free_ports, http_json};
use serde_json::{Value, json};

/// Identity files an enrollment writes into its directory.
const IDENTITY_FILES: &[&str] =
    &["edge.key", "edge.pem", "trust-anchors.pem", "trust-bundle.json", "edge.toml", "provisioned.json"];

struct Setup {
    dir: tempfile::TempDir,
    cp: ControlPlane,
    org: String,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cp")).unwrap();
        let cp = ControlPlane::start_with_grpc(&dir.path().join("cp")).unwrap();
        let (status, org) =
            http_json(cp.addr(), "POST", "/v1/orgs", Some(&cp.token), Some(&json!({"name": "acme"}))).unwrap();
        assert_eq!(status, 201, "{org}");
        let org = org["id"].as_str().unwrap().to_owned();
        Setup { dir, cp, org }
    }

    /// A new enrollment token for eu-west: (id, secret).
    fn token(&self) -> (String, String) {
        let body = json!({"org_id": self.org, "region": "eu-west"});
        let (status, created) =
            http_json(self.cp.addr(), "POST", "/v1/admin/enrollment-tokens", Some(&self.cp.token), Some(&body))
                .unwrap();
        assert_eq!(status, 201, "{created}");
        (created["id"].as_str().unwrap().to_owned(), created["token"].as_str().unwrap().to_owned())
    }

    fn token_status(&self, id: &str) -> String {
        let (status, page) =
            http_json(self.cp.addr(), "GET", "/v1/admin/enrollment-tokens", Some(&self.cp.token), None).unwrap();
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        let token = items.iter().find(|item| item["id"] == id).unwrap_or_else(|| panic!("{id} not in {page}"));
        token["status"].as_str().unwrap().to_owned()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `molt-provision enroll` for `dir` with `token` and extra arguments.
    fn enroll_command(&self, url: &str, token: &str, dir: &Path, extra: &[&str]) -> Command {
        let mut command = Command::new(binary("molt-provision"));
        command.args(["enroll", "--json", "--control-plane", url, "--token", token]);
        command.args(["--grpc-addr", &self.cp.grpc_addr.unwrap().to_string()]);
        command.arg("--dir").arg(dir).args(extra);
        command.env_remove("MOLT_ENROLLMENT_TOKEN");
        command
    }

    /// Runs `molt-provision enroll`: (exit code, stdout, stderr).
    fn enroll(&self, token: &str, dir: &Path, extra: &[&str]) -> (i32, String, String) {
        let (status, stdout, stderr) = run(self.enroll_command(&self.cp.url(), token, dir, extra)).unwrap();
        (status.code().unwrap_or(-1), stdout, stderr)
    }

    /// Enrolls `dir` and expects success: the JSON answer.
    fn enrolled(&self, token: &str, dir: &Path, extra: &[&str]) -> Value {
        let (code, stdout, stderr) = self.enroll(token, dir, extra);
        assert_eq!(code, 0, "molt-provision enroll failed: {stdout}{stderr}");
        serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("not JSON: {stdout}"))
    }
}

/// Every file of a directory with its contents and modification time.
fn snapshot(dir: &Path) -> BTreeMap<String, (Vec<u8>, std::time::SystemTime)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| entry.file_type().unwrap().is_file())
        .map(|entry| {
            let metadata = entry.metadata().unwrap();
            (
                entry.file_name().into_string().unwrap(),
                (std::fs::read(entry.path()).unwrap(), metadata.modified().unwrap()),
            )
        })
        .collect()
}

fn config_check(config: &Path) {
    let mut check = Command::new(binary("molt-edge"));
    check.args(["config", "check"]).arg(config);
    let (status, stdout, stderr) = run(check).unwrap();
    assert!(status.success(), "config check: {stdout}{stderr}");
}

#[test]
fn enroll_is_idempotent_and_refuses_another_identity_without_force() {
    use std::os::unix::fs::PermissionsExt as _;
    let setup = Setup::new();
    let device = setup.path("device");
    let (first_id, first) = setup.token();
    let answer = setup.enrolled(&first, &device, &[]);
    assert_eq!(answer["status"], "enrolled", "{answer}");
    assert_eq!(answer["region"], "eu-west");
    for name in IDENTITY_FILES {
        assert!(device.join(name).is_file(), "{name} was not written");
    }
    assert_eq!(std::fs::metadata(device.join("edge.key")).unwrap().permissions().mode() & 0o777, 0o600);
    config_check(&device.join("edge.toml"));
    assert_eq!(setup.token_status(&first_id), "used");
    let before = snapshot(&device);
    assert_eq!(before.len(), IDENTITY_FILES.len(), "no temporary file is left: {:?}", before.keys());

    // The same token again: nothing is sent, nothing changes.
    let again = setup.enrolled(&first, &device, &[]);
    assert_eq!(again["status"], "already_provisioned", "{again}");
    assert_eq!(again["edge_id"], answer["edge_id"]);
    assert_eq!(snapshot(&device), before);

    // Another token means another identity: refused, and that token stays unspent.
    let (second_id, second) = setup.token();
    let (code, _, stderr) = setup.enroll(&second, &device, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("already holds a different edge identity") && stderr.contains("--force"), "{stderr}");
    assert_eq!(snapshot(&device), before);
    assert_eq!(setup.token_status(&second_id), "active");

    // With --force it replaces the identity.
    let replaced = setup.enrolled(&second, &device, &["--force"]);
    assert_eq!(replaced["status"], "enrolled");
    assert_ne!(replaced["edge_id"], answer["edge_id"]);
    assert_ne!(std::fs::read(device.join("edge.key")).unwrap(), before["edge.key"].0);
    config_check(&device.join("edge.toml"));
}

#[test]
fn the_provisioned_edge_starts_and_registers() {
    let setup = Setup::new();
    let device = setup.path("device");
    let (_, token) = setup.token();
    let answer = setup.enrolled(&token, &device, &[]);
    let config = device.join("edge.toml");
    let (quic_port, admin_port) = free_ports();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[edge]\n",
        &format!("[edge]\nlisten_addr = \"127.0.0.1:{quic_port}\"\nadmin_addr = \"127.0.0.1:{admin_port}\"\n"),
    );
    std::fs::write(&config, text).unwrap();
    let edge = molt_tests::EdgeSetup {
        config,
        quic_addr: ([127, 0, 0, 1], quic_port).into(),
        admin_addr: ([127, 0, 0, 1], admin_port).into(),
    };
    let _process = edge.spawn().unwrap();
    let edge_id = answer["edge_id"].as_str().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let registered = setup.cp.sql(&format!("SELECT region FROM edges WHERE id = '{edge_id}'")).unwrap();
        if registered.trim() == "eu-west" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the edge did not register: {registered:?}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn failed_enrollments_leave_the_previous_identity_intact() {
    let setup = Setup::new();
    let device = setup.path("device");
    let (_, token) = setup.token();
    setup.enrolled(&token, &device, &[]);
    let before = snapshot(&device);

    // A token the control plane never issued.
    let (code, _, stderr) = setup.enroll("molt_enroll_0000000000000000000000000000000000000000", &device, &["--force"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("refused the enrollment"), "{stderr}");
    assert_eq!(snapshot(&device), before);

    // An expired token.
    let (expired_id, expired) = setup.token();
    setup.cp.sql(&format!("UPDATE enrollment_tokens SET expires_at_ms = 1 WHERE id = '{expired_id}'")).unwrap();
    let (code, _, stderr) = setup.enroll(&expired, &device, &["--force"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("enrollment_token_expired"), "{stderr}");
    assert_eq!(snapshot(&device), before);

    // A token already spent.
    let (code, _, stderr) = setup.enroll(&token, &device, &["--force"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("refused the enrollment"), "{stderr}");
    assert_eq!(snapshot(&device), before);

    // A control plane that does not answer.
    let (_, port) = free_ports();
    let (fresh_id, fresh) = setup.token();
    let command = setup.enroll_command(&format!("http://127.0.0.1:{port}"), &fresh, &device, &["--force"]);
    let (status, _, stderr) = run(command).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("failed to reach the control plane"), "{stderr}");
    assert_eq!(snapshot(&device), before);
    assert_eq!(setup.token_status(&fresh_id), "active");

    // A key file that no longer parses: the re-run says so and touches nothing.
    std::fs::write(device.join("edge.key"), "not a key").unwrap();
    let damaged = snapshot(&device);
    let (code, _, stderr) = setup.enroll(&token, &device, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no longer usable") && stderr.contains("edge.key"), "{stderr}");
    assert_eq!(snapshot(&device), damaged);

    // A fresh directory keeps no half-written identity after a failure.
    let empty = setup.path("empty");
    let (code, _, stderr) = setup.enroll("molt_enroll_0000000000000000000000000000000000000000", &empty, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(snapshot(&empty).is_empty(), "{:?}", snapshot(&empty).keys());
}

/// `molt-provision enroll --force` run in a private mount namespace after `setup` (a
/// shell snippet that mounts something on the device directory); then the SHA-256 of the
/// identity files as the namespace sees them.
fn enroll_in_namespace(setup: &Setup, token: &str, device: &Path, mount: &str) -> (i32, String, String) {
    let enroll = setup.enroll_command(&setup.cp.url(), token, device, &["--force"]);
    let program = enroll.get_program().to_string_lossy().into_owned();
    let args: Vec<String> = enroll.get_args().map(|arg| format!("'{}'", arg.to_string_lossy())).collect();
    let files: Vec<String> = IDENTITY_FILES.iter().map(|name| format!("'{}'", device.join(name).display())).collect();
    let script = format!(
        "set -e; {mount}\nset +e; '{program}' {args}; code=$?; sha256sum {files} >&2; exit $code",
        args = args.join(" "),
        files = files.join(" "),
    );
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let (status, stdout, stderr) = run(command).unwrap();
    (status.code().unwrap_or(-1), stdout, stderr)
}

fn sha256sums(device: &Path) -> String {
    let mut command = Command::new("sha256sum");
    command.args(IDENTITY_FILES.iter().map(|name| device.join(name)));
    let (status, stdout, stderr) = run(command).unwrap();
    assert!(status.success(), "{stderr}");
    stdout
}

#[test]
fn a_read_only_or_full_directory_fails_before_the_token_is_spent() {
    let setup = Setup::new();
    let device = setup.path("device");
    let (_, token) = setup.token();
    setup.enrolled(&token, &device, &[]);
    let before = snapshot(&device);
    let sums = sha256sums(&device);

    let (new_id, new) = setup.token();
    let dir = device.display();
    let read_only = format!("mount --bind '{dir}' '{dir}'; mount -o remount,bind,ro '{dir}'");
    let (code, _, stderr) = enroll_in_namespace(&setup, &new, &device, &read_only);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot write to") && stderr.contains("Read-only file system"), "{stderr}");
    assert!(stderr.contains(&sums), "the identity changed inside the namespace:\n{stderr}\nexpected\n{sums}");
    assert_eq!(snapshot(&device), before);
    assert_eq!(setup.token_status(&new_id), "active", "the token must not be spent");

    // A full file system: a small tmpfs holding a copy of the identity, filled up.
    let copy = setup.path("copy");
    std::fs::create_dir(&copy).unwrap();
    for name in IDENTITY_FILES {
        std::fs::copy(device.join(name), copy.join(name)).unwrap();
    }
    let full = format!(
        "mount -t tmpfs -o size=256k tmpfs '{dir}'; cp -p '{copy}'/* '{dir}'/; \
         dd if=/dev/zero of='{dir}/filler' bs=4k 2>/dev/null || true",
        copy = copy.display(),
    );
    let (code, _, stderr) = enroll_in_namespace(&setup, &new, &device, &full);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(stderr.contains(&sums), "the identity changed inside the namespace:\n{stderr}\nexpected\n{sums}");
    assert_eq!(setup.token_status(&new_id), "active", "the token must not be spent");

    // The unspent token still works.
    let answer = setup.enrolled(&new, &device, &["--force"]);
    assert_eq!(answer["status"], "enrolled");
}

#[test]
fn enroll_with_the_key_in_a_softhsm_token() {
    let setup = Setup::new();
    let tokens = setup.path("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = setup.path("softhsm2.conf");
    std::fs::write(&conf, format!("directories.tokendir = {}\nobjectstore.backend = file\n", tokens.display()))
        .unwrap();
    let mut init = Command::new("softhsm2-util");
    init.args(["--init-token", "--free", "--label", "edge-token", "--so-pin", "12345678", "--pin", "87654321"]);
    init.env("SOFTHSM2_CONF", &conf);
    let (status, stdout, stderr) = run(init).unwrap();
    assert!(status.success(), "softhsm2-util: {stdout}{stderr}");

    let device = setup.path("device");
    let hsm_args = [
        "--pkcs11-module",
        "/usr/lib/softhsm/libsofthsm2.so",
        "--token-label",
        "edge-token",
        "--pin-env",
        "MOLT_TEST_EDGE_PIN",
    ];
    let enroll = |token: &str| {
        let mut command = setup.enroll_command(&setup.cp.url(), token, &device, &hsm_args);
        command.env("SOFTHSM2_CONF", &conf).env("MOLT_TEST_EDGE_PIN", "87654321");
        let (status, stdout, stderr) = run(command).unwrap();
        assert!(status.success(), "molt-provision enroll: {stdout}{stderr}");
        serde_json::from_str::<Value>(stdout.trim()).unwrap()
    };
    let (_, token) = setup.token();
    let answer = enroll(&token);
    assert_eq!(answer["status"], "enrolled", "{answer}");
    assert!(!device.join("edge.key").exists(), "the key stays in the token");
    let config = std::fs::read_to_string(device.join("edge.toml")).unwrap();
    assert!(
        config.contains("key_source = \"pkcs11\"") && config.contains("pin_env = \"MOLT_TEST_EDGE_PIN\""),
        "{config}"
    );
    config_check(&device.join("edge.toml"));
    let before = snapshot(&device);

    // Re-running opens the token to check the key against the certificate, then does nothing.
    let again = enroll(&token);
    assert_eq!(again["status"], "already_provisioned", "{again}");
    assert_eq!(snapshot(&device), before);

    // A failed replacement destroys the key it generated in the token: one key is left.
    let mut failed = setup.enroll_command(&setup.cp.url(), &token, &device, &hsm_args);
    failed.arg("--force").env("SOFTHSM2_CONF", &conf).env("MOLT_TEST_EDGE_PIN", "87654321");
    let (status, _, stderr) = run(failed).unwrap();
    assert_eq!(status.code(), Some(1), "a spent token: {stderr}");
    assert_eq!(snapshot(&device), before);
    let mut list = Command::new("pkcs11-tool");
    list.args(["--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "edge-token"]);
    list.args(["--login", "--pin", "87654321", "--list-objects", "--type", "privkey"]);
    list.env("SOFTHSM2_CONF", &conf);
    let (status, stdout, stderr) = run(list).unwrap();
    assert!(status.success(), "pkcs11-tool: {stderr}");
    assert_eq!(stdout.matches("Private Key Object").count(), 1, "{stdout}");
}

#[test]
fn a_batch_with_one_bad_device_provisions_the_others() {
    let setup = Setup::new();
    let batch = setup.path("fleet.toml");
    let text = format!(
        "control_plane = \"{url}\"\ngrpc_addr = \"{grpc}\"\norg = \"{org}\"\n\n\
         [[device]]\nname = \"fra-01\"\ndir = \"fra-01\"\nregion = \"eu-central\"\n\n\
         [[device]]\nname = \"nowhere\"\ndir = \"nowhere\"\nregion = \"eu-central\"\norg = \"org-that-does-not-exist\"\n\n\
         [[device]]\nname = \"ams-01\"\ndir = \"ams-01\"\nregion = \"eu-west\"\n",
        url = setup.cp.url(),
        grpc = setup.cp.grpc_addr.unwrap(),
        org = setup.org,
    );
    std::fs::write(&batch, text).unwrap();
    let report = setup.path("report.json");
    let run_batch = || {
        let mut command = Command::new(binary("molt-provision"));
        command.arg("batch").arg(&batch).arg("--report").arg(&report).env("MOLT_ADMIN_TOKEN", &setup.cp.token);
        let (status, stdout, stderr) = run(command).unwrap();
        let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        (status.code(), stdout, stderr, report)
    };

    let (code, stdout, stderr, summary) = run_batch();
    assert_eq!(code, Some(1), "one device failed: {stdout}{stderr}");
    assert!(stdout.contains("3 devices: 2 enrolled, 0 already provisioned, 1 failed"), "{stdout}");
    assert!(stdout.contains("failed: nowhere"), "{stdout}");
    let statuses: Vec<&str> =
        summary["devices"].as_array().unwrap().iter().map(|d| d["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["enrolled", "failed", "enrolled"], "{summary}");
    for name in ["fra-01", "ams-01"] {
        config_check(&setup.path(name).join("edge.toml"));
    }
    assert!(!setup.path("nowhere").join("edge.pem").exists());
    let fra = snapshot(&setup.path("fra-01"));

    // Re-running creates no token for the provisioned devices and changes nothing there.
    let (code, stdout, _, summary) = run_batch();
    assert_eq!(code, Some(1));
    assert!(stdout.contains("3 devices: 0 enrolled, 2 already provisioned, 1 failed"), "{stdout}");
    assert_eq!(summary["devices"][0]["status"], "already_provisioned");
    assert_eq!(snapshot(&setup.path("fra-01")), fra);
}

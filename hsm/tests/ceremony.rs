//! Ceremonies end to end: the real `molt-hsm` binary against SoftHSM2 tokens, outputs
//! checked with `openssl`, transcripts verified and tampered with, and every bad input
//! refused with nothing left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use molt_hsm::softhsm::{SOFTHSM2_MODULE, SoftHsm};
use molt_protocol::cert::{Certificate, Role, Serial, Validity, issue_leaf};
use molt_protocol::keys::SigningKey;
use molt_protocol::{AgentId, UnixMillis};

const PIN: &str = "2468-user";
const PIN_VAR: &str = "MOLT_HSM_TEST_PIN";

struct Bench {
    dir: tempfile::TempDir,
    softhsm: SoftHsm,
}

impl Bench {
    fn new(tokens: &[&str]) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let softhsm = SoftHsm::create(&dir.path().join("hsm"), SOFTHSM2_MODULE.as_ref())
            .unwrap_or_else(|error| panic!("the HSM tests need SoftHSM2: {error}"));
        for label in tokens {
            softhsm.init_token(label, PIN, "1357-so").unwrap();
        }
        Bench { dir, softhsm }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn molt_hsm(&self, args: &[&str]) -> Output {
        self.molt_hsm_with_pin(args, PIN)
    }

    fn molt_hsm_with_pin(&self, args: &[&str], pin: &str) -> Output {
        self.softhsm
            .command(env!("CARGO_BIN_EXE_molt-hsm"))
            .current_dir(self.dir.path())
            .env(PIN_VAR, pin)
            .args(args)
            .output()
            .unwrap()
    }

    fn ceremony(&self, file: &str) -> Output {
        self.molt_hsm(&["ceremony", file, "--pin-env", PIN_VAR])
    }

    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name != "hsm")
            .collect();
        names.sort();
        names
    }
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[track_caller]
fn succeeded(output: &Output) -> String {
    assert!(output.status.success(), "{}", text(output));
    text(output)
}

#[track_caller]
fn failed(output: &Output, needle: &str) -> String {
    let all = text(output);
    assert!(!output.status.success(), "expected failure, got:\n{all}");
    assert!(all.contains(needle), "expected {needle:?} in:\n{all}");
    all
}

fn openssl(args: &[&str], dir: &Path) -> Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|error| panic!("openssl is needed (apt-get install openssl): {error}"))
}

fn root_file(token: &str, label: &str, cert: &str, transcript: &str) -> String {
    format!(
        r#"kind = "root"
transcript = "{transcript}"
operators = ["Ada", "Grace"]

[hsm]
module = "{SOFTHSM2_MODULE}"
token_label = "{token}"

[root]
key_label = "{label}"
common_name = "Molt Test Root"
not_before = 2025-01-01T00:00:00Z
not_after = 2045-01-01T00:00:00Z
certificate_out = "{cert}"
"#
    )
}

fn org_file(token: &str, root_label: &str, root_cert: &str, subject: &str, out: &str, transcript: &str) -> String {
    format!(
        r#"kind = "org-ca"
transcript = "{transcript}"

[hsm]
module = "{SOFTHSM2_MODULE}"
token_label = "{token}"

[org_ca]
root_key_label = "{root_label}"
root_certificate = "{root_cert}"
{subject}
common_name = "Molt Org Acme"
not_before = 2025-06-01T00:00:00Z
not_after = 2035-06-01T00:00:00Z
certificate_out = "{out}"
"#
    )
}

fn spki_pem(key: &SigningKey) -> String {
    let mut der = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    der.extend_from_slice(key.public_key().as_bytes());
    molt_protocol::cert::pem_encode("PUBLIC KEY", &der)
}

fn csr_pem(key: &SigningKey) -> String {
    let key_pair = rcgen::KeyPair::try_from(key.to_pkcs8_der().as_slice()).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, "Molt Org Acme");
    params.serialize_request(&key_pair).unwrap().pem().unwrap()
}

#[test]
fn root_org_crl_and_rotation_ceremonies_verify_with_openssl() {
    let bench = Bench::new(&["root-token"]);
    bench.write("root.toml", &root_file("root-token", "root-2025", "root.pem", "root.transcript"));
    let output = succeeded(&bench.ceremony("root.toml"));
    assert!(output.contains("wrote") && output.contains("root.pem"), "{output}");
    let root = Certificate::from_pem(&std::fs::read_to_string(bench.path("root.pem")).unwrap()).unwrap();
    assert_eq!(root.role(), Role::Root);
    assert_eq!(root.common_name(), "Molt Test Root");
    succeeded(&openssl(
        &["verify", "-x509_strict", "-check_ss_sig", "-CAfile", "root.pem", "root.pem"],
        bench.dir.path(),
    ));
    succeeded(&bench.molt_hsm(&["transcript", "verify", "root.transcript", "--signer-certificate", "root.pem"]));

    // Org CA from a bare public key, then from a CSR.
    let org_key = SigningKey::from_bytes(&[11; 32]);
    bench.write("org.pub.pem", &spki_pem(&org_key));
    let subject = r#"subject_public_key = "org.pub.pem""#;
    bench.write("org.toml", &org_file("root-token", "root-2025", "root.pem", subject, "org.pem", "org.transcript"));
    succeeded(&bench.ceremony("org.toml"));
    let org = Certificate::from_pem(&std::fs::read_to_string(bench.path("org.pem")).unwrap()).unwrap();
    assert_eq!((org.role(), org.public_key()), (Role::OrgCa, org_key.public_key()));
    succeeded(&bench.molt_hsm(&["transcript", "verify", "org.transcript", "--signer-certificate", "root.pem"]));

    let csr_key = SigningKey::from_bytes(&[12; 32]);
    bench.write("org2.csr.pem", &csr_pem(&csr_key));
    let subject = r#"csr = "org2.csr.pem""#;
    bench.write("org2.toml", &org_file("root-token", "root-2025", "root.pem", subject, "org2.pem", "org2.transcript"));
    succeeded(&bench.ceremony("org2.toml"));
    let org2 = Certificate::from_pem(&std::fs::read_to_string(bench.path("org2.pem")).unwrap()).unwrap();
    assert_eq!(org2.public_key(), csr_key.public_key());

    // A leaf under the ceremony's org CA verifies with openssl up to the HSM root.
    let agent_key = SigningKey::from_bytes(&[13; 32]);
    let agent_id = AgentId::from_inception_key(&agent_key.public_key());
    let now = UnixMillis::now_from_system();
    let validity = Validity { not_before: UnixMillis(now.0 - 60_000), not_after: UnixMillis(now.0 + 86_400_000) };
    let leaf =
        issue_leaf(&org, &org_key, &agent_key.public_key(), Role::Agent(agent_id), &[], validity, Serial([5; 16]))
            .unwrap();
    bench.write("agent.pem", &leaf.to_pem());
    succeeded(&openssl(
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "org.pem",
            "-purpose",
            "sslclient",
            "agent.pem",
        ],
        bench.dir.path(),
    ));

    // The root revokes the second org CA.
    let crl = format!(
        r#"kind = "crl"
transcript = "crl.transcript"
[hsm]
module = "{SOFTHSM2_MODULE}"
token_label = "root-token"
[crl]
issuer_key_label = "root-2025"
issuer_certificate = "root.pem"
crl_number = 1
this_update = 2026-01-01T00:00:00Z
next_update = 2036-01-01T00:00:00Z
revoked = ["{}"]
crl_out = "root.crl.pem"
"#,
        org2.serial()
    );
    bench.write("crl.toml", &crl);
    succeeded(&bench.ceremony("crl.toml"));
    succeeded(&openssl(&["crl", "-in", "root.crl.pem", "-CAfile", "root.pem", "-noout"], bench.dir.path()));
    succeeded(&openssl(
        &["verify", "-crl_check", "-CRLfile", "root.crl.pem", "-CAfile", "root.pem", "org.pem"],
        bench.dir.path(),
    ));
    failed(
        &openssl(
            &["verify", "-crl_check", "-CRLfile", "root.crl.pem", "-CAfile", "root.pem", "org2.pem"],
            bench.dir.path(),
        ),
        "revoked",
    );

    // Rotation: a new root, cross-signed by the old one; an org CA under the new root
    // reaches the old root through the cross-certificate.
    let rotation = format!(
        r#"kind = "root-rotation"
transcript = "rotation.transcript"
[hsm]
module = "{SOFTHSM2_MODULE}"
token_label = "root-token"
[rotation]
old_key_label = "root-2025"
old_root_certificate = "root.pem"
new_key_label = "root-2030"
common_name = "Molt Test Root 2030"
not_before = 2025-01-01T00:00:00Z
not_after = 2050-01-01T00:00:00Z
certificate_out = "root-2030.pem"
cross_certificate_out = "root-2030.cross.pem"
"#
    );
    bench.write("rotation.toml", &rotation);
    succeeded(&bench.ceremony("rotation.toml"));
    succeeded(&bench.molt_hsm(&["transcript", "verify", "rotation.transcript", "--signer-certificate", "root.pem"]));
    let dir = bench.dir.path();
    succeeded(&openssl(&["verify", "-x509_strict", "-check_ss_sig", "-CAfile", "root-2030.pem", "root-2030.pem"], dir));
    succeeded(&openssl(&["verify", "-x509_strict", "-CAfile", "root.pem", "root-2030.cross.pem"], dir));
    bench.write("org3.pub.pem", &spki_pem(&SigningKey::from_bytes(&[14; 32])));
    let subject = r#"subject_public_key = "org3.pub.pem""#;
    bench.write(
        "org3.toml",
        &org_file("root-token", "root-2030", "root-2030.pem", subject, "org3.pem", "org3.transcript"),
    );
    succeeded(&bench.ceremony("org3.toml"));
    succeeded(&openssl(&["verify", "-CAfile", "root.pem", "-untrusted", "root-2030.cross.pem", "org3.pem"], dir));
    succeeded(&openssl(&["verify", "-x509_strict", "-CAfile", "root-2030.pem", "org3.pem"], dir));
}

#[test]
fn tampered_transcripts_and_outputs_are_detected() {
    let bench = Bench::new(&["t"]);
    bench.write("root.toml", &root_file("t", "root", "root.pem", "root.transcript"));
    succeeded(&bench.ceremony("root.toml"));
    let original = std::fs::read_to_string(bench.path("root.transcript")).unwrap();
    succeeded(&bench.molt_hsm(&["transcript", "verify", "root.transcript"]));

    let edited = original.replacen("Grace", "Mallory", 1);
    assert_ne!(edited, original);
    std::fs::write(bench.path("root.transcript"), &edited).unwrap();
    failed(&bench.molt_hsm(&["transcript", "verify", "root.transcript"]), "signature does not verify");

    let lines: Vec<&str> = original.lines().collect();
    let dropped: String = lines.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, l)| format!("{l}\n")).collect();
    std::fs::write(bench.path("root.transcript"), dropped).unwrap();
    failed(&bench.molt_hsm(&["transcript", "verify", "root.transcript"]), "sequence number");

    let truncated: String = lines[..lines.len() - 1].iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(bench.path("root.transcript"), truncated).unwrap();
    failed(&bench.molt_hsm(&["transcript", "verify", "root.transcript"]), "does not end");

    std::fs::write(bench.path("root.transcript"), &original).unwrap();
    let pem = std::fs::read_to_string(bench.path("root.pem")).unwrap();
    std::fs::write(bench.path("root.pem"), pem.replacen('A', "B", 1)).unwrap();
    failed(&bench.molt_hsm(&["transcript", "verify", "root.transcript"]), "output root.pem");
}

#[test]
fn bad_ceremony_files_are_refused_before_anything_happens() {
    let bench = Bench::new(&["bad"]);
    let good = root_file("bad", "root", "root.pem", "root.transcript");

    bench.write("unknown.toml", &good.replace("[root]\n", "[root]\ncolour = \"blue\"\n"));
    failed(&bench.ceremony("unknown.toml"), "unknown field `colour`");
    bench.write("pin.toml", &good.replace("[hsm]\n", "[hsm]\npin = \"1234\"\n"));
    failed(&bench.ceremony("pin.toml"), "unknown field `pin`");
    bench.write("missing.toml", &good.replace("common_name = \"Molt Test Root\"\n", ""));
    failed(&bench.ceremony("missing.toml"), "missing field `common_name`");
    bench.write("section.toml", &good.replace("[root]", "[crl]"));
    failed(&bench.ceremony("section.toml"), "unknown field `certificate_out`");
    bench.write("kind.toml", &good.replace("kind = \"root\"", "kind = \"org-ca\""));
    failed(&bench.ceremony("kind.toml"), "missing section [org_ca]");
    bench.write("times.toml", &good.replace("2045-01-01T00:00:00Z", "2024-01-01T00:00:00Z"));
    failed(&bench.ceremony("times.toml"), "end time is not after");
    bench.write("local.toml", &good.replace("2045-01-01T00:00:00Z", "2045-01-01T00:00:00"));
    failed(&bench.ceremony("local.toml"), "full date-time with offset");
    assert!(!bench.path("root.pem").exists() && !bench.path("root.transcript").exists());

    // Wrong PIN, missing token, missing module: no output.
    bench.write("root.toml", &good);
    failed(&bench.molt_hsm_with_pin(&["ceremony", "root.toml", "--pin-env", PIN_VAR], "0000"), "wrong pin");
    bench.write("notoken.toml", &good.replace("token_label = \"bad\"", "token_label = \"absent\""));
    failed(&bench.ceremony("notoken.toml"), "no initialised token is labelled \"absent\"");
    bench.write("nomodule.toml", &good.replace(SOFTHSM2_MODULE, "/nonexistent/libpkcs11.so"));
    failed(&bench.ceremony("nomodule.toml"), "no such file");
    assert_eq!(bench.files().iter().filter(|f| f.starts_with("root.") && *f != "root.toml").count(), 0);

    // An existing output: refused before the key is generated, so the label stays free.
    bench.write("root.pem", "placeholder");
    failed(&bench.ceremony("root.toml"), "already exists");
    assert_eq!(std::fs::read_to_string(bench.path("root.pem")).unwrap(), "placeholder");
    assert!(!bench.path("root.transcript").exists());
    std::fs::remove_file(bench.path("root.pem")).unwrap();
    succeeded(&bench.ceremony("root.toml"));

    // The label is now taken: a second root ceremony with it is refused, writes nothing.
    bench.write("again.toml", &root_file("bad", "root", "again.pem", "again.transcript"));
    failed(&bench.ceremony("again.toml"), "already holds an object with this label");
    assert!(!bench.path("again.pem").exists() && !bench.path("again.transcript").exists());

    // An org CA ceremony whose root certificate does not match the key: refused.
    let other = SigningKey::from_bytes(&[3; 32]);
    let other_root = molt_protocol::cert::issue_root(
        &other,
        "Other",
        Validity { not_before: UnixMillis(1_735_689_600_000), not_after: UnixMillis(2_366_841_600_000) },
        Serial([1; 16]),
    )
    .unwrap();
    bench.write("other.pem", &other_root.to_pem());
    bench.write("org.pub.pem", &spki_pem(&SigningKey::from_bytes(&[4; 32])));
    let subject = r#"subject_public_key = "org.pub.pem""#;
    bench.write("org.toml", &org_file("bad", "root", "other.pem", subject, "org.pem", "org.transcript"));
    failed(&bench.ceremony("org.toml"), "does not match the public key");
    let both = format!("{subject}\ncsr = \"org.pub.pem\"");
    bench.write("both.toml", &org_file("bad", "root", "root.pem", &both, "org.pem", "org.transcript"));
    failed(&bench.ceremony("both.toml"), "exactly one of subject_public_key and csr");
    assert!(!bench.path("org.pem").exists() && !bench.path("org.transcript").exists());
}

#[test]
fn dry_run_rehearses_on_a_throw_away_token() {
    let bench = Bench::new(&[]);
    // The real token does not exist here: a dry run never opens it.
    bench.write("root.toml", &root_file("offline-root", "root", "root.pem", "root.transcript"));
    let output = succeeded(&bench.molt_hsm(&["ceremony", "root.toml", "--dry-run"]));
    assert!(output.contains("dry run passed"), "{output}");
    assert!(!bench.path("root.pem").exists() && !bench.path("root.transcript").exists());
    let out_dir = output.lines().find_map(|l| l.strip_prefix("dry run passed; rehearsal outputs are in ")).unwrap();
    let out_dir = PathBuf::from(out_dir.split(" (").next().unwrap());
    assert!(out_dir.join("root.pem").exists());
    let verified = molt_hsm::transcript::verify_file(&out_dir.join("root.transcript"), None).unwrap();
    assert!(verified.outputs.iter().all(|(_, _, found)| *found));
    assert!(!out_dir.join("softhsm").exists(), "the rehearsal token is removed");

    // An org CA rehearsal stands in for the root key and certificate.
    std::fs::copy(out_dir.join("root.pem"), bench.path("root.pem")).unwrap();
    std::fs::remove_dir_all(&out_dir).unwrap();
    bench.write("org.pub.pem", &spki_pem(&SigningKey::from_bytes(&[4; 32])));
    let subject = r#"subject_public_key = "org.pub.pem""#;
    bench.write("org.toml", &org_file("offline-root", "root", "root.pem", subject, "org.pem", "org.transcript"));
    let output = succeeded(&bench.molt_hsm(&["ceremony", "org.toml", "--dry-run"]));
    assert!(output.contains("stood in"), "{output}");
    assert!(!bench.path("org.pem").exists());
    let out_dir = output.lines().find_map(|l| l.strip_prefix("dry run passed; rehearsal outputs are in ")).unwrap();
    std::fs::remove_dir_all(out_dir.split(" (").next().unwrap()).unwrap();

    // A dry run fails like the real ceremony on an existing output.
    bench.write("org.pem", "x");
    failed(&bench.molt_hsm(&["ceremony", "org.toml", "--dry-run"]), "already exists");
}

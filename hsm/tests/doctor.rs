//! `molt-hsm doctor` against SoftHSM2: lists, exercises Ed25519 for real, reports the
//! known quirks in plain words and leaves no key behind.

use molt_hsm::softhsm::{SOFTHSM2_MODULE, SoftHsm};

#[test]
fn doctor_checks_softhsm_for_real_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let softhsm = SoftHsm::create(dir.path(), SOFTHSM2_MODULE.as_ref())
        .unwrap_or_else(|error| panic!("the HSM tests need SoftHSM2: {error}"));
    softhsm.init_token("doctor", "1111-user", "2222-so").unwrap();
    let doctor = |args: &[&str]| {
        let output = softhsm
            .command(env!("CARGO_BIN_EXE_molt-hsm"))
            .env("MOLT_DOCTOR_PIN", "1111-user")
            .arg("doctor")
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    };

    let (ok, listing) = doctor(&["--module", SOFTHSM2_MODULE]);
    assert!(ok, "{listing}");
    assert!(listing.contains("token \"doctor\""), "{listing}");
    assert!(listing.contains("Ed25519 key generation: yes, EdDSA signing: yes"), "{listing}");
    assert!(listing.contains("not tried for real"), "{listing}");

    let (ok, report) = doctor(&["--module", SOFTHSM2_MODULE, "--token", "doctor", "--pin-env", "MOLT_DOCTOR_PIN"]);
    assert!(ok, "{report}");
    for expected in [
        "generated Ed25519 key",
        "sensitive and not extractable",
        "verifies in software",
        "ignores EdDSA parameters",
        "X25519 key generation is refused",
        "cleaned up",
    ] {
        assert!(report.contains(expected), "missing {expected:?} in:\n{report}");
    }
    let objects = softhsm
        .command("pkcs11-tool")
        .args([
            "--module",
            SOFTHSM2_MODULE,
            "--token-label",
            "doctor",
            "--login",
            "--pin",
            "1111-user",
            "--list-objects",
        ])
        .output()
        .unwrap();
    let objects = String::from_utf8_lossy(&objects.stdout);
    assert!(!objects.contains("molt-doctor"), "{objects}");

    let (ok, text) = doctor(&["--module", SOFTHSM2_MODULE, "--token", "doctor", "--pin-env", "UNSET_DOCTOR_PIN"]);
    assert!(!ok && text.contains("UNSET_DOCTOR_PIN is not set"), "{text}");
    let (ok, text) = doctor(&["--module", "/nonexistent/module.so"]);
    assert!(!ok && text.contains("no such file"), "{text}");
}

#[test]
fn key_generate_and_show_print_the_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let softhsm = SoftHsm::create(dir.path(), SOFTHSM2_MODULE.as_ref())
        .unwrap_or_else(|error| panic!("the HSM tests need SoftHSM2: {error}"));
    softhsm.init_token("keys", "1111-user", "2222-so").unwrap();
    let key = |command: &str, label: &str| {
        let output = softhsm
            .command(env!("CARGO_BIN_EXE_molt-hsm"))
            .env("MOLT_KEY_PIN", "1111-user")
            .args(["key", command, "--module", SOFTHSM2_MODULE, "--token", "keys", "--label", label])
            .args(["--pin-env", "MOLT_KEY_PIN"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    };
    let (ok, generated) = key("generate", "edge-tls");
    assert!(ok && generated.starts_with("-----BEGIN PUBLIC KEY-----"), "{generated}");
    let (ok, shown) = key("show", "edge-tls");
    assert!(ok, "{shown}");
    assert_eq!(shown, generated);
    // openssl reads it as an Ed25519 key.
    std::fs::write(dir.path().join("edge.pub.pem"), &shown).unwrap();
    let openssl = std::process::Command::new("openssl")
        .args(["pkey", "-pubin", "-noout", "-text", "-in"])
        .arg(dir.path().join("edge.pub.pem"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&openssl.stdout).contains("ED25519"), "{openssl:?}");
    let (ok, text) = key("generate", "edge-tls");
    assert!(!ok && text.contains("already holds an object with this label"), "{text}");
    let (ok, text) = key("show", "absent");
    assert!(!ok && text.contains("no Ed25519 private key"), "{text}");
}

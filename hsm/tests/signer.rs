//! The same suite runs against a software key and against a key inside SoftHSM2: raw
//! signatures, key bindings, certificate issuance and verification, revocation lists,
//! and real QUIC handshakes (ALPN `molt/1`) with the key on either side.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use molt_hsm::key::KeyName;
use molt_hsm::{
    FindKeyError, GenerateKeyError, KeyProtection, OpenError, PinSource, Token, TokenConfig, TokenSelector,
};
use molt_protocol::cert::{
    Certificate, ExpectedRole, RevocationList, Revocations, Role, Serial, TrustAnchors, Validity, issue_leaf,
    issue_org_ca, issue_root, verify_chain,
};
use molt_protocol::keys::{EncryptionSecret, KeyBinding, Signer, SigningKey};
use molt_protocol::tls::{self, SignerTlsIdentity, TlsIdentity};
use molt_protocol::{AgentId, EdgeId, UnixMillis};
use support::{softhsm_child, software_signer, token};

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn suite_with_a_software_key() {
    suite(software_signer(42));
}

#[test]
fn suite_with_a_softhsm_key() {
    let Some(softhsm) = softhsm_child("suite_with_a_softhsm_key") else { return };
    let token = token(&softhsm, "suite", 2);
    let key = token.generate_ed25519("suite-key").unwrap();
    suite(Arc::new(key.clone()));
    // The key is found again by label and by id, with the same public key.
    let by_label = token.find_ed25519(KeyName::Label("suite-key")).unwrap();
    let by_id = token.find_ed25519(KeyName::Id(key.id())).unwrap();
    assert_eq!(by_label.public_key(), key.public_key());
    assert_eq!(by_id.public_key(), key.public_key());
}

/// Everything a Molt signer is used for.
fn suite(signer: Arc<dyn Signer>) {
    let public = signer.public_key();
    let signature = signer.try_sign(b"hello").unwrap();
    public.verify(b"hello", &signature).unwrap();
    assert!(public.verify(b"hellO", &signature).is_err());
    // Ed25519 is deterministic, whatever holds the key.
    assert_eq!(signer.try_sign(b"hello").unwrap(), signature);

    let agent = AgentId::from_inception_key(&public);
    let binding =
        KeyBinding::sign(agent, EncryptionSecret::from_bytes([9; 32]).public_key(), UnixMillis(1), signer.as_ref())
            .unwrap();
    binding.verify(&public).unwrap();

    let now = UnixMillis::now_from_system();
    let validity = Validity { not_before: now.saturating_sub(HOUR), not_after: now.saturating_add(HOUR * 24) };
    // The signer as a root: issues an org CA and a CRL.
    let root = issue_root(signer.as_ref(), "Suite Root", validity, Serial([1; 16])).unwrap();
    let org_key = SigningKey::from_bytes(&[2; 32]);
    let org =
        issue_org_ca(&root, signer.as_ref(), &org_key.public_key(), "Suite Org", validity, Serial([2; 16])).unwrap();
    let crl =
        RevocationList::issue(&root, signer.as_ref(), 1, now, now.saturating_add(HOUR), &[Serial([7; 16])]).unwrap();
    RevocationList::from_der_verified(crl.der(), &root).unwrap();

    // The signer as an edge leaf and as an agent leaf, in real handshakes.
    let edge_id = EdgeId::from_inception_key(&public);
    let dns = ["localhost".to_owned()];
    let edge_leaf = issue_leaf(&org, &org_key, &public, Role::Edge(edge_id), &dns, validity, Serial([3; 16])).unwrap();
    let agent_leaf = issue_leaf(&org, &org_key, &public, Role::Agent(agent), &[], validity, Serial([4; 16])).unwrap();
    let anchors = Arc::new(TrustAnchors::new(vec![root.clone()]).unwrap());
    verify_chain(&[edge_leaf.der(), org.der()], &anchors, &Revocations::default(), now, ExpectedRole::AnyEdge).unwrap();

    let software_agent_key = SigningKey::from_bytes(&[5; 32]);
    let software_agent_id = AgentId::from_inception_key(&software_agent_key.public_key());
    let software_agent = issue_leaf(
        &org,
        &org_key,
        &software_agent_key.public_key(),
        Role::Agent(software_agent_id),
        &[],
        validity,
        Serial([5; 16]),
    )
    .unwrap();
    let software_edge_key = SigningKey::from_bytes(&[6; 32]);
    let software_edge_id = EdgeId::from_inception_key(&software_edge_key.public_key());
    let software_edge = issue_leaf(
        &org,
        &org_key,
        &software_edge_key.public_key(),
        Role::Edge(software_edge_id),
        &dns,
        validity,
        Serial([6; 16]),
    )
    .unwrap();

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        // Signer on the server side (the edge), software agent.
        let server = tls::server_config_with_signer(
            &SignerTlsIdentity { chain: vec![edge_leaf, org.clone()], signer: signer.clone() },
            anchors.clone(),
            no_revocations(),
            ExpectedRole::AnyAgent,
            tls::ALPN_AGENT,
        )
        .unwrap();
        let client = tls::client_config(
            &TlsIdentity { chain: vec![software_agent, org.clone()], key: software_agent_key },
            anchors.clone(),
            no_revocations(),
            ExpectedRole::AnyEdge,
            tls::ALPN_AGENT,
        )
        .unwrap();
        let (seen_by_server, seen_by_client) = handshake(server, client).await;
        assert_eq!(seen_by_server, Role::Agent(software_agent_id));
        assert_eq!(seen_by_client, Role::Edge(edge_id));

        // Signer on the client side (an agent), software edge.
        let server = tls::server_config(
            &TlsIdentity { chain: vec![software_edge, org.clone()], key: software_edge_key },
            anchors.clone(),
            no_revocations(),
            ExpectedRole::AnyAgent,
            tls::ALPN_AGENT,
        )
        .unwrap();
        let client = tls::client_config_with_signer(
            &SignerTlsIdentity { chain: vec![agent_leaf, org.clone()], signer: signer.clone() },
            anchors.clone(),
            no_revocations(),
            ExpectedRole::AnyEdge,
            tls::ALPN_AGENT,
        )
        .unwrap();
        let (seen_by_server, seen_by_client) = handshake(server, client).await;
        assert_eq!(seen_by_server, Role::Agent(agent));
        assert_eq!(seen_by_client, Role::Edge(software_edge_id));
    });
}

fn no_revocations() -> tls::SharedRevocations {
    Arc::new(RwLock::new(Revocations::default()))
}

/// One QUIC connection over loopback; returns the role each side saw in the other's
/// certificate, after a round trip on a stream.
async fn handshake(server: rustls::ServerConfig, client: rustls::ClientConfig) -> (Role, Role) {
    let server = quinn::crypto::rustls::QuicServerConfig::try_from(server).unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(server)),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .unwrap();
    let address = endpoint.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let connection = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, mut receive) = connection.accept_bi().await.unwrap();
        let request = receive.read_to_end(64).await.unwrap();
        send.write_all(&request).await.unwrap();
        send.finish().unwrap();
        let role = peer_role(&connection);
        connection.closed().await;
        role
    });
    let client = quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap();
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(client)));
    let connection = endpoint.connect(address, "localhost").unwrap().await.unwrap();
    let (mut send, mut receive) = connection.open_bi().await.unwrap();
    send.write_all(b"ping").await.unwrap();
    send.finish().unwrap();
    assert_eq!(receive.read_to_end(64).await.unwrap(), b"ping");
    let seen_by_client = peer_role(&connection);
    connection.close(0u32.into(), b"done");
    let seen_by_server = accept.await.unwrap();
    endpoint.wait_idle().await;
    (seen_by_server, seen_by_client)
}

fn peer_role(connection: &quinn::Connection) -> Role {
    let chain =
        connection.peer_identity().unwrap().downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().unwrap();
    tls::peer_identity(&chain).unwrap().role()
}

/// Two threads share one key through a pool of one session and a pool of two.
#[test]
fn session_pool_serves_many_threads() {
    let Some(softhsm) = softhsm_child("session_pool_serves_many_threads") else { return };
    support::init_tokens(&softhsm, &["pool-one", "pool-two"]);
    for (label, pool_size) in [("pool-one", 1), ("pool-two", 2)] {
        let token = support::open(&softhsm, label, pool_size).unwrap();
        let key = Arc::new(token.generate_ed25519("pool-key").unwrap());
        let workers: Vec<_> = (0..4u8)
            .map(|worker| {
                let key = key.clone();
                std::thread::spawn(move || {
                    for round in 0..25u8 {
                        let message = [worker, round];
                        let signature = key.try_sign(&message).unwrap();
                        key.public_key().verify(&message, &signature).unwrap();
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
    }
}

#[test]
fn bad_inputs_get_clear_errors() {
    let Some(softhsm) = softhsm_child("bad_inputs_get_clear_errors") else { return };
    support::init_tokens(&softhsm, &["bad-inputs", "wrong-pin"]);
    let token = support::open(&softhsm, "bad-inputs", 1).unwrap();
    let dir = softhsm.conf().parent().unwrap().to_owned();
    let config = |module: &std::path::Path, selector: TokenSelector, pin: &str| {
        let path = dir.join(format!("pin-{}", pin.len()));
        support::write_private(&path, pin);
        TokenConfig { module: module.to_owned(), token: selector, pin: PinSource::File(path), pool_size: 1 }
    };

    let missing = Token::open(&config("/nonexistent/libpkcs11.so".as_ref(), TokenSelector::SlotIndex(0), "x"));
    let error = missing.unwrap_err();
    assert!(matches!(error, OpenError::ModuleNotFound { .. }));
    assert!(error.to_string().contains("no such file"), "{error}");

    let not_a_module = dir.join("softhsm2.conf");
    assert!(matches!(
        Token::open(&config(&not_a_module, TokenSelector::SlotIndex(0), "x")).unwrap_err(),
        OpenError::ModuleLoad { .. }
    ));

    let error =
        Token::open(&config(softhsm.module(), TokenSelector::Label("absent".into()), support::USER_PIN)).unwrap_err();
    assert!(matches!(error, OpenError::TokenNotFound { .. }));
    assert!(error.to_string().contains("\"bad-inputs\""), "{error}");

    assert!(matches!(
        Token::open(&config(softhsm.module(), TokenSelector::SlotIndex(7), support::USER_PIN)).unwrap_err(),
        OpenError::SlotIndexOutOfRange { index: 7, count: 2 }
    ));

    // Login is per application and token, so the wrong PIN goes to a token nobody here
    // has logged into.
    let error =
        Token::open(&config(softhsm.module(), TokenSelector::Label("wrong-pin".into()), "0000-wrong")).unwrap_err();
    assert!(matches!(error, OpenError::WrongPin { .. }));
    assert!(error.to_string().contains("CKR_PIN_INCORRECT"), "{error}");

    let error = Token::open(&TokenConfig {
        module: softhsm.module().to_owned(),
        token: TokenSelector::Label("bad-inputs".into()),
        pin: PinSource::Env("MOLT_HSM_TEST_NO_SUCH_VARIABLE".into()),
        pool_size: 1,
    })
    .unwrap_err();
    assert!(matches!(error, OpenError::Pin(_)));

    token.generate_ed25519("taken").unwrap();
    let error = token.generate_ed25519("taken").unwrap_err();
    assert!(matches!(error, GenerateKeyError::LabelExists { .. }), "{error}");
    assert_eq!(token.objects_labelled("taken").unwrap().len(), 2, "no second key pair was created");
    assert!(matches!(token.generate_ed25519("").unwrap_err(), GenerateKeyError::InvalidLabel { .. }));
    assert!(matches!(token.find_ed25519(KeyName::Label("nothing")).unwrap_err(), FindKeyError::NotFound { .. }));
}

/// Keys destroyed are gone; the private half is not extractable.
#[test]
fn keys_are_sensitive_and_can_be_destroyed() {
    let Some(softhsm) = softhsm_child("keys_are_sensitive_and_can_be_destroyed") else { return };
    let token = token(&softhsm, "destroy", 1);
    let key = token.generate_ed25519("short-lived").unwrap();
    let output = softhsm
        .command("pkcs11-tool")
        .args(["--module"])
        .arg(softhsm.module())
        .args([
            "--token-label",
            "destroy",
            "--login",
            "--pin",
            support::USER_PIN,
            "--list-objects",
            "--type",
            "privkey",
        ])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&output.stdout);
    assert!(listing.contains("short-lived"), "{listing}");
    assert!(listing.contains("never extractable") || listing.contains("sensitive"), "{listing}");
    let protection = key.protection().unwrap();
    let expected =
        KeyProtection { sensitive: true, extractable: false, always_sensitive: true, never_extractable: true };
    assert_eq!(protection, expected);
    let kept = token.generate_ed25519("kept").unwrap();
    let mut labels = token.private_key_labels().unwrap();
    labels.sort();
    assert_eq!(labels, ["kept", "short-lived"]);
    key.destroy().unwrap();
    assert!(token.objects_labelled("short-lived").unwrap().is_empty());
    assert_eq!(token.private_key_labels().unwrap(), ["kept"], "only the destroyed key is gone");
    kept.destroy().unwrap();
    assert!(token.private_key_labels().unwrap().is_empty());
    assert!(Certificate::from_der(b"").is_err());
}

/// Key creation and destruction from many threads and two logins to one token all
/// succeed: SoftHSM2 fails concurrent object creation at random unless the calls are
/// serialised, which the token does.
#[test]
fn concurrent_key_creation_and_destruction_succeed() {
    let Some(softhsm) = softhsm_child("concurrent_key_creation_and_destruction_succeed") else { return };
    support::init_tokens(&softhsm, &["busy"]);
    let replicas = [support::open(&softhsm, "busy", 2).unwrap(), support::open(&softhsm, "busy", 2).unwrap()];
    let workers: Vec<_> = (0..6usize)
        .map(|worker| {
            let token = replicas[worker % 2].clone();
            std::thread::spawn(move || {
                for round in 0..8 {
                    let key = token.generate_ed25519(&format!("busy-{worker}-{round}")).unwrap();
                    if round % 2 == 1 {
                        key.destroy().unwrap();
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let mut labels = replicas[0].private_key_labels().unwrap();
    labels.sort();
    let mut expected: Vec<_> =
        (0..6).flat_map(|worker| (0..8).step_by(2).map(move |round| format!("busy-{worker}-{round}"))).collect();
    expected.sort();
    assert_eq!(labels, expected);
}

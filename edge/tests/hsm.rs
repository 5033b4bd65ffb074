//! `molt-edge` with its TLS key inside SoftHSM2: the edge signs every handshake on the
//! token, and an agent connects and completes the session handshake. Also: a wrong PIN
//! or a missing key stops the edge with a clear error.
//!
//! SoftHSM2 finds its tokens through `SOFTHSM2_CONF`, read once per process, and tests
//! may not set environment variables; so the test re-runs itself in a child process that
//! has the variable set (the edge it starts inherits it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use molt_hsm::key::KeyName;
use molt_hsm::softhsm::{SOFTHSM2_MODULE, SoftHsm};
use molt_hsm::{PinSource, Token, TokenConfig, TokenSelector};
use molt_protocol::cert::{ExpectedRole, Role, Serial, TrustAnchors, Validity, issue_leaf, issue_org_ca, issue_root};
use molt_protocol::frame::{Frame, FrameReader};
use molt_protocol::keys::SigningKey;
use molt_protocol::tls::{self, TlsIdentity};
use molt_protocol::{AgentId, EdgeId, UnixMillis};

const CHILD_VAR: &str = "MOLT_EDGE_HSM_TEST_DIR";
const PIN: &str = "9753-user";

#[test]
fn edge_serves_agents_with_its_key_in_softhsm() {
    let Ok(dir) = std::env::var(CHILD_VAR) else {
        run_in_child("edge_serves_agents_with_its_key_in_softhsm");
        return;
    };
    let dir = PathBuf::from(dir);
    let softhsm = SoftHsm::existing(dir.join("softhsm2.conf"), SOFTHSM2_MODULE.into());
    softhsm.init_token("edge", PIN, "8642-so").unwrap();
    write_private(&dir.join("hsm.pin"), PIN);
    write_private(&dir.join("wrong.pin"), "0000");
    let hsm_public_key = {
        let token = Token::open(&TokenConfig {
            module: SOFTHSM2_MODULE.into(),
            token: TokenSelector::Label("edge".into()),
            pin: PinSource::File(dir.join("hsm.pin")),
            pool_size: 1,
        })
        .unwrap();
        let key = token.generate_ed25519("edge-tls").unwrap();
        assert_eq!(token.find_ed25519(KeyName::Label("edge-tls")).unwrap().public_key(), key.public_key());
        key.public_key()
    };

    let now = UnixMillis::now_from_system();
    let validity = Validity { not_before: UnixMillis(now.0 - 60_000), not_after: UnixMillis(now.0 + 3_600_000) };
    let root_key = SigningKey::from_bytes(&[1; 32]);
    let root = issue_root(&root_key, "Edge HSM Test Root", validity, Serial([1; 16])).unwrap();
    let org_key = SigningKey::from_bytes(&[2; 32]);
    let org = issue_org_ca(&root, &root_key, &org_key.public_key(), "Org", validity, Serial([2; 16])).unwrap();
    let edge_id = EdgeId::from_inception_key(&hsm_public_key);
    let edge = issue_leaf(
        &org,
        &org_key,
        &hsm_public_key,
        Role::Edge(edge_id),
        &["localhost".to_owned()],
        validity,
        Serial([3; 16]),
    )
    .unwrap();
    std::fs::write(dir.join("edge.pem"), format!("{}{}", edge.to_pem(), org.to_pem())).unwrap();
    std::fs::write(dir.join("root.pem"), root.to_pem()).unwrap();

    let (quic_addr, config) = write_config(&dir, "edge.toml", "edge-tls", "hsm.pin");
    let mut edge_process = spawn_edge(&config);
    let agent_key = SigningKey::from_bytes(&[4; 32]);
    let agent_id = AgentId::from_inception_key(&agent_key.public_key());
    let agent =
        issue_leaf(&org, &org_key, &agent_key.public_key(), Role::Agent(agent_id), &[], validity, Serial([4; 16]))
            .unwrap();
    let identity = TlsIdentity { chain: vec![agent, org.clone()], key: agent_key };
    let anchors = Arc::new(TrustAnchors::new(vec![root]).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let seen = runtime.block_on(connect_with_retries(&identity, anchors, quic_addr));
    let _ = edge_process.kill();
    let _ = edge_process.wait();
    assert_eq!(seen, Role::Edge(edge_id), "the agent saw the certificate of the HSM key");

    // A wrong PIN, or a key label the token does not hold, stops the edge clearly.
    let (_, config) = write_config(&dir, "wrong-pin.toml", "edge-tls", "wrong.pin");
    let stderr = failed_start(&config);
    assert!(stderr.contains("wrong pin") && stderr.contains("\"edge\""), "{stderr}");
    let (_, config) = write_config(&dir, "no-key.toml", "absent-key", "hsm.pin");
    let stderr = failed_start(&config);
    assert!(stderr.contains("absent-key") && stderr.contains("no Ed25519 private key"), "{stderr}");
}

fn run_in_child(test: &str) {
    let dir = tempfile::tempdir().unwrap();
    let softhsm = SoftHsm::create(dir.path(), SOFTHSM2_MODULE.as_ref())
        .unwrap_or_else(|error| panic!("the HSM tests need SoftHSM2: {error}"));
    let output = softhsm
        .command(std::env::current_exe().unwrap())
        .env(CHILD_VAR, dir.path())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "child did not run {test}:\n{stdout}\n{stderr}");
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

fn write_config(dir: &Path, name: &str, key_label: &str, pin_file: &str) -> (SocketAddr, PathBuf) {
    let quic_port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "[edge]\nlisten_addr = \"127.0.0.1:{quic_port}\"\nadmin_addr = \"127.0.0.1:{admin_port}\"\n\
         data_dir = \"data-{name}\"\n\n[identity]\ncertificate_chain = \"edge.pem\"\nkey_source = \"pkcs11\"\n\n\
         [identity.pkcs11]\nmodule = \"{SOFTHSM2_MODULE}\"\ntoken_label = \"edge\"\nkey_label = \"{key_label}\"\n\
         pin_file = \"{pin_file}\"\n\n[trust]\nanchors = \"root.pem\"\n"
    );
    let path = dir.join(name);
    std::fs::write(&path, config).unwrap();
    (SocketAddr::from(([127, 0, 0, 1], quic_port)), path)
}

fn spawn_edge(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_molt-edge"))
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn failed_start(config: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_molt-edge")).arg("--config").arg(config).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Connects as an agent until the edge is up, completes the Ping/Pong session
/// handshake, and returns the role in the edge's certificate.
async fn connect_with_retries(identity: &TlsIdentity, anchors: Arc<TrustAnchors>, edge: SocketAddr) -> Role {
    let tls =
        tls::client_config(identity, anchors, Default::default(), ExpectedRole::AnyEdge, tls::ALPN_AGENT).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_millis(500).try_into().unwrap()));
    client.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    let connection = loop {
        match endpoint.connect(edge, "localhost").unwrap().await {
            Ok(connection) => break connection,
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("the edge never accepted a connection: {error}"),
        }
    };
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&Frame::Ping(7).encode()).await.unwrap();
    let mut reader = FrameReader::new();
    loop {
        let chunk = recv.read_chunk(65536, true).await.unwrap().expect("stream ended before the pong");
        reader.extend(&chunk.bytes);
        if let Some(frame) = reader.next_frame().unwrap() {
            assert_eq!(frame, Frame::Pong(7));
            break;
        }
    }
    let chain =
        connection.peer_identity().unwrap().downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().unwrap();
    let role = tls::peer_identity(&chain).unwrap().role();
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    role
}

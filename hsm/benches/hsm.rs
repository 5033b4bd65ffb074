//! HSM benchmark (not a timed test): Ed25519 signatures per second through the session
//! pool (1 and 2 threads) against software signing, and QUIC/TLS handshakes per second
//! with the edge key in SoftHSM2 against a key from a file.
//!
//! Run with `cargo bench -p molt-hsm --bench hsm`. The benchmark re-runs itself in a
//! child process that sees a throw-away SoftHSM2 token directory (`SOFTHSM2_CONF`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use molt_hsm::softhsm::{SOFTHSM2_MODULE, SoftHsm};
use molt_hsm::{PinSource, Token, TokenConfig, TokenSelector};
use molt_protocol::cert::{ExpectedRole, Role, Serial, TrustAnchors, Validity, issue_leaf, issue_org_ca, issue_root};
use molt_protocol::keys::{Signer, SigningKey};
use molt_protocol::tls::{self, SignerTlsIdentity, TlsIdentity};
use molt_protocol::{AgentId, EdgeId, UnixMillis};

const CHILD_VAR: &str = "MOLT_HSM_BENCH_DIR";
const PIN_VAR: &str = "MOLT_HSM_BENCH_PIN";
const PIN: &str = "1234-bench";
const SOFTWARE_SIGNATURES: u32 = 50_000;
const HSM_SIGNATURES: u32 = 4_000;
const HANDSHAKES: usize = 400;

fn main() {
    let Ok(dir) = std::env::var(CHILD_VAR) else {
        let dir = tempfile::tempdir().unwrap();
        let softhsm = SoftHsm::create(dir.path(), SOFTHSM2_MODULE.as_ref())
            .unwrap_or_else(|error| panic!("the HSM benchmark needs SoftHSM2: {error}"));
        for label in ["bench-1", "bench-2", "bench-tls"] {
            softhsm.init_token(label, PIN, "5678-so").unwrap();
        }
        let status = softhsm
            .command(std::env::current_exe().unwrap())
            .env(CHILD_VAR, dir.path())
            .env(PIN_VAR, PIN)
            .status()
            .unwrap();
        std::process::exit(status.code().unwrap_or(1));
    };
    let _ = dir;
    signatures();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(handshakes());
}

fn token(label: &str, pool_size: usize) -> Token {
    Token::open(&TokenConfig {
        module: SOFTHSM2_MODULE.into(),
        token: TokenSelector::Label(label.into()),
        pin: PinSource::Env(PIN_VAR.into()),
        pool_size,
    })
    .unwrap()
}

fn signatures() {
    let software = SigningKey::from_bytes(&[7; 32]);
    let rate = signing_rate(Arc::new(software), 1, SOFTWARE_SIGNATURES);
    println!("software Ed25519 (ed25519-dalek), 1 thread: {rate:.0} signatures/s");
    for threads in [1usize, 2] {
        let token = token(&format!("bench-{threads}"), threads);
        let key = Arc::new(token.generate_ed25519("bench-key").unwrap());
        let rate = signing_rate(key, threads, HSM_SIGNATURES);
        println!("SoftHSM2 CKM_EDDSA through the pool, {threads} thread(s), pool of {threads}: {rate:.0} signatures/s");
    }
}

/// Signatures per second over `total` signatures split across `threads`.
fn signing_rate(signer: Arc<dyn Signer>, threads: usize, total: u32) -> f64 {
    let per_thread = total / threads as u32;
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|thread| {
            let signer = signer.clone();
            std::thread::spawn(move || {
                for round in 0..per_thread {
                    let message = [thread as u8, (round & 0xff) as u8, (round >> 8) as u8];
                    std::hint::black_box(signer.try_sign(&message).unwrap());
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    f64::from(per_thread * threads as u32) / started.elapsed().as_secs_f64()
}

async fn handshakes() {
    let now = UnixMillis::now_from_system();
    let validity = Validity { not_before: UnixMillis(now.0 - 60_000), not_after: UnixMillis(now.0 + 3_600_000) };
    let root_key = SigningKey::from_bytes(&[1; 32]);
    let root = issue_root(&root_key, "Bench Root", validity, Serial([1; 16])).unwrap();
    let org_key = SigningKey::from_bytes(&[2; 32]);
    let org = issue_org_ca(&root, &root_key, &org_key.public_key(), "Org", validity, Serial([2; 16])).unwrap();
    let anchors = Arc::new(TrustAnchors::new(vec![root]).unwrap());
    let agent_key = SigningKey::from_bytes(&[3; 32]);
    let agent_id = AgentId::from_inception_key(&agent_key.public_key());
    let agent =
        issue_leaf(&org, &org_key, &agent_key.public_key(), Role::Agent(agent_id), &[], validity, Serial([3; 16]))
            .unwrap();
    let client = tls::client_config(
        &TlsIdentity { chain: vec![agent, org.clone()], key: agent_key },
        anchors.clone(),
        Default::default(),
        ExpectedRole::AnyEdge,
        tls::ALPN_AGENT,
    )
    .unwrap();
    let client = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap()));

    let token = token("bench-tls", 2);
    let hsm_key: Arc<dyn Signer> = Arc::new(token.generate_ed25519("edge-tls").unwrap());
    let file_key: Arc<dyn Signer> = Arc::new(SigningKey::from_bytes(&[4; 32]));
    for (name, signer) in [("key from a file", file_key), ("key in SoftHSM2", hsm_key)] {
        let edge_id = EdgeId::from_inception_key(&signer.public_key());
        let leaf = issue_leaf(
            &org,
            &org_key,
            &signer.public_key(),
            Role::Edge(edge_id),
            &["localhost".to_owned()],
            validity,
            Serial([5; 16]),
        )
        .unwrap();
        let server = tls::server_config_with_signer(
            &SignerTlsIdentity { chain: vec![leaf, org.clone()], signer },
            anchors.clone(),
            Default::default(),
            ExpectedRole::AnyAgent,
            tls::ALPN_AGENT,
        )
        .unwrap();
        for in_flight in [1usize, 8] {
            let rate = handshake_rate(&server, &client, in_flight).await;
            println!("QUIC/TLS 1.3 mutual handshakes, edge {name}, {in_flight} in flight: {rate:.0} handshakes/s");
        }
    }
}

async fn handshake_rate(server: &rustls::ServerConfig, client: &quinn::ClientConfig, in_flight: usize) -> f64 {
    let server = quinn::crypto::rustls::QuicServerConfig::try_from(server.clone()).unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(server)),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .unwrap();
    let address = endpoint.local_addr().unwrap();
    let acceptor = endpoint.clone();
    let accept = tokio::spawn(async move {
        while let Some(incoming) = acceptor.accept().await {
            tokio::spawn(async move {
                if let Ok(connection) = incoming.await {
                    connection.closed().await;
                }
            });
        }
    });
    let mut dialer = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    dialer.set_default_client_config(client.clone());
    let started = Instant::now();
    let per_task = HANDSHAKES / in_flight;
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let dialer = dialer.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    let connection = dialer.connect(address, "localhost").unwrap().await.unwrap();
                    connection.close(0u32.into(), b"");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let rate = (per_task * in_flight) as f64 / started.elapsed().as_secs_f64();
    endpoint.close(0u32.into(), b"");
    accept.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), dialer.wait_idle()).await;
    rate
}

//! The Molt control plane: the central service that will host the registry, the
//! certificate authority, trust, credits, jobs and governance. This crate holds its
//! foundation:
//!
//! - [`config`]: defaults, a TOML file, `MOLT_CP_*` variables and flags, validated at once;
//! - [`db`]: the [`db::Database`] handle over SQLite (default) or PostgreSQL, migrations,
//!   and leases for singleton background work across replicas;
//! - [`auth`]: admin tokens (stored as SHA-256 only), scopes, the bootstrap credential;
//! - [`ca`]: the certificate authority: root, org CAs with keys sealed at rest or in a
//!   PKCS#11 token, agent and edge certificates on proof of possession, revocation, CRLs
//!   and the trust bundle;
//! - [`keys`]: agent key rotation with an overlap window, guardians and social recovery;
//! - [`edge_map`]: the edges agents choose from (recently seen, with admin-set weights);
//! - [`grpc`]: the tonic gRPC service for edges over mutual TLS (registration, trust
//!   stream, presence, agent lookup);
//! - [`api`]: the axum HTTP API with problem+json errors and its OpenAPI document;
//! - [`metrics`]: a private Prometheus registry.
//!
//! Processes are stateless: everything lives in the database, so several replicas can
//! serve one PostgreSQL. The binary (`src/main.rs`) only parses arguments and calls
//! [`start`] and [`api::serve`].

#![forbid(unsafe_code)]

pub mod a2a;
pub mod agent_auth;
pub mod api;
pub mod auth;
pub mod batch;
pub mod ca;
pub mod clock;
pub mod config;
pub mod db;
pub mod edge_map;
pub mod enrollment;
pub mod grpc;
pub mod ids;
pub mod keys;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod signatures;

use std::sync::Arc;

use crate::auth::AdminToken;
use crate::clock::Clock;
use crate::db::{ConnectError, Database, QueryError};

/// A control plane ready to serve: its state and, on the first start against this
/// database, the bootstrap credential to show the operator once.
#[derive(Debug)]
pub struct Started {
    pub state: api::AppState,
    pub bootstrap_token: Option<AdminToken>,
    /// The gRPC service for edges, if an address was given; stops when dropped.
    pub grpc: Option<grpc::GrpcServer>,
    /// The ledger's escrow-expiry and unbonding work (runs while this replica holds the
    /// lease); stops when dropped.
    pub ledger_expiry: ledger::service::ExpiryWorker,
    /// Revokes certificates replaced by key rotations once their overlap ends (while
    /// this replica holds the lease); stops when dropped.
    pub key_revocations: keys::RevocationWorker,
}

/// Why [`start`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("failed to start the control plane")]
    Connect(#[from] ConnectError),
    #[error("failed to start the control plane: creating the bootstrap admin key")]
    Bootstrap(#[from] QueryError),
    #[error("failed to start the control plane: building the search index")]
    Index(#[from] registry::RegistryQueryError),
    #[error("failed to start the control plane: loading the certificate authority")]
    Ca(#[from] ca::LoadAuthorityError),
    #[error("failed to start the control plane: starting the gRPC service")]
    Grpc(#[from] grpc::GrpcStartError),
}

/// Connects to the database, applies migrations, creates the bootstrap credential if the
/// database has no admin key, builds this replica's search index, and loads the certificate authority (creating the
/// development root and the KEK file on the first start, as [`ca`] describes), then, if
/// `grpc_listen_addr` is given, serves the edge gRPC service there ([`grpc`]).
pub async fn start(
    options: &db::DatabaseOptions,
    ca_options: &ca::CaOptions,
    grpc_listen_addr: Option<std::net::SocketAddr>,
    clock: Arc<dyn Clock>,
) -> Result<Started, StartError> {
    let db = Database::connect(options).await?;
    let bootstrap_token = db.bootstrap_admin_key(clock.now()).await?;
    let authority = ca::Authority::load(&db, ca_options, &options.url, clock.now()).await?;
    let authority = Arc::new(authority);
    let grpc = match grpc_listen_addr {
        Some(addr) => {
            let identity = grpc::issue_server_identity(&db, &authority, clock.now()).await?;
            Some(grpc::serve(addr, &identity, db.clone(), Arc::clone(&authority), Arc::clone(&clock)).await?)
        }
        None => None,
    };
    let state = api::AppState::new(db, clock, Arc::new(metrics::Metrics::new())).with_ca(authority);
    let building = std::time::Instant::now();
    let built = state.search.refresh().await?;
    tracing::info!(agents = built.agents, seconds = building.elapsed().as_secs_f64(), "search index built");
    let replica = format!("replica-{:016x}", rand::random::<u64>());
    let ledger_expiry = state.ledger.spawn_expiry_worker(replica.clone());
    let key_revocations = keys::spawn_revocation_worker(state.db.clone(), Arc::clone(&state.clock), replica);
    Ok(Started { state, bootstrap_token, grpc, ledger_expiry, key_revocations })
}

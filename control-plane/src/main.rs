//! `molt-control-plane`: runs the control plane. With no arguments it uses a SQLite file
//! in the working directory and listens on 127.0.0.1:8080.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use molt_control_plane::clock::SystemClock;
use molt_control_plane::config::{self, LogFormat, Overrides};

/// mimalloc instead of glibc's allocator, for Rust and (its `override` feature) for SQLite's
/// C code: the SQLite threads allocate the row values the runtime's threads free, which
/// glibc's arenas turned into lock contention (ARCHITECTURE.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Molt control plane: admin API, orgs and (soon) the registry and CA.
#[derive(Debug, Parser)]
#[command(
    version,
    long_about = "The Molt control plane.\n\nWith no arguments it stores its data in ./molt-control-plane.db (SQLite, \
created on first start) and serves the admin API on 127.0.0.1:8080. On the first start it prints a bootstrap admin \
credential once, on stderr.\n\nSettings: a TOML file (--config), MOLT_CP_* environment variables, then the flags \
below, each overriding the one before.\n\nExamples:\n  molt-control-plane\n  molt-control-plane --database-url \
postgres://molt@db.internal/molt --listen 0.0.0.0:8080\n  molt-control-plane --config /etc/molt/control-plane.toml"
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, short, value_name = "FILE", env = "MOLT_CP_CONFIG")]
    config: Option<PathBuf>,
    /// Database: sqlite:PATH or postgres://USER@HOST/DATABASE (MOLT_CP_DATABASE_URL).
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// HTTP address of the API (MOLT_CP_LISTEN).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let overrides = Overrides { database_url: cli.database_url, listen_addr: cli.listen };
    let mut environment = config::process_environment();
    // Read by clap above, not by the config module.
    environment.remove("MOLT_CP_CONFIG");
    let config =
        config::load(cli.config.as_deref(), &environment, &overrides).context("while loading the configuration")?;
    init_logging(&config.log);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("while starting the runtime")?;
    runtime.block_on(async {
        let started = molt_control_plane::start(&config.database, &config.ca, config.grpc_listen_addr, Arc::new(SystemClock))
            .await
            .context("while opening the database")?;
        if let Some(token) = &started.bootstrap_token {
            eprintln!(
                "\nBootstrap admin credential (all scopes). It is shown only this once and stored only as a hash:\n\n    \
                 {}\n\nUse it as `Authorization: Bearer <token>` to create scoped keys, then revoke it.\n",
                token.expose()
            );
        }
        let listener = tokio::net::TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("while binding {}", config.listen_addr))?;
        let state = started.state.with_key_policy(config.keys);
        let db = state.db.clone();
        molt_control_plane::api::serve(listener, state, shutdown_signal()).await.context("while serving")?;
        db.close().await;
        Ok(())
    })
}

fn init_logging(log: &config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::new(&log.level);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only ctrl-c stops the control plane");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}

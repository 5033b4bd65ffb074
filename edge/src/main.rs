//! `molt-edge`: runs the relay from a TOML file, or checks and documents that file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use molt_edge::config::{self, LogFormat};

/// The Molt edge relay: agents connect to it over QUIC with mutual TLS; it verifies,
/// rate-limits, routes and durably buffers their messages.
#[derive(Debug, Parser)]
#[command(
    version,
    long_about = "The Molt edge relay.\n\nAgents connect over QUIC (ALPN molt/1) with mutual TLS. The edge verifies every \
message's signature, enforces rate limits, forwards messages to connected recipients and buffers them durably (redb) for \
offline ones.\n\nExamples:\n  molt-edge --config /etc/molt/edge.toml\n  molt-edge config check /etc/molt/edge.toml\n  \
molt-edge config reference > edge.toml"
)]
struct Cli {
    /// Configuration file to run with.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Enroll this edge with a control plane: generate its key, present an enrollment
    /// token, and write the certificate chain, trust bundle and a config stub to DIR.
    Enroll {
        /// Base URL of the control plane's HTTP API, e.g. http://10.0.0.1:8080.
        #[arg(long, value_name = "URL")]
        control_plane: String,
        /// The enrollment token from `molt enrollment-token create`.
        #[arg(long, value_name = "TOKEN", env = "MOLT_ENROLLMENT_TOKEN", hide_env_values = true)]
        token: String,
        /// The control plane's gRPC address (IP:port), written into the config stub.
        #[arg(long, value_name = "ADDR")]
        grpc_addr: std::net::SocketAddr,
        /// Directory for the key, chain, trust bundle and config.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Replace an edge identity already in DIR.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file and report every problem with its key and line.
    Check { file: PathBuf },
    /// Print the documented reference configuration with every key and its default.
    Reference,
    /// Bring a configuration file to the current `config_version`, keeping the original
    /// as FILE.v<N>.bak; the file is replaced atomically, and only with a valid result.
    Migrate { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Config(ConfigCommand::Check { file })) => check(&file),
        Some(Command::Config(ConfigCommand::Reference)) => {
            print!("{}", config::reference());
            Ok(())
        }
        Some(Command::Config(ConfigCommand::Migrate { file })) => migrate(&file),
        Some(Command::Enroll { control_plane, token, grpc_addr, dir, force }) => {
            enroll(molt_edge::enroll::EnrollOptions {
                control_plane,
                token,
                grpc_addr,
                dir,
                config: None,
                key: molt_edge::enroll::KeyPlan::File,
                force,
            })
        }
        None => match cli.config {
            Some(path) => run(&path),
            None => Err(anyhow::anyhow!("--config FILE is required")),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(file: &std::path::Path) -> anyhow::Result<()> {
    config::load(file).with_context(|| format!("{} is not valid", file.display()))?;
    println!("{}: ok", file.display());
    Ok(())
}

fn migrate(file: &std::path::Path) -> anyhow::Result<()> {
    use molt_edge::migrate::Migrated;
    match molt_edge::migrate::migrate_file(file).with_context(|| format!("while migrating {}", file.display()))? {
        Migrated::AlreadyCurrent => {
            println!("{}: already at config_version {}", file.display(), config::CONFIG_VERSION_CURRENT)
        }
        Migrated::Rewritten { from, backup } => println!(
            "{}: migrated from config_version {from} to {}; the original is in {}",
            file.display(),
            config::CONFIG_VERSION_CURRENT,
            backup.display()
        ),
    }
    Ok(())
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let config = config::load(path).with_context(|| format!("while loading {}", path.display()))?;
    let set_log_level = init_logging(&config.log);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("while starting the runtime")?;
    runtime.block_on(async {
        // Before the edge starts: from then on a SIGHUP reloads instead of terminating.
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("while listening for SIGHUP")?;
        let edge = molt_edge::Edge::start(config).await?;
        let reloads =
            tokio::spawn(molt_edge::reload::reload_on_hangup(hangups, path.to_owned(), edge.reloader(), set_log_level));
        let result = edge.run_until(shutdown_signal()).await;
        reloads.abort();
        result
    })
}

fn enroll(options: molt_edge::enroll::EnrollOptions) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("while starting the runtime")?;
    let enrolled = runtime.block_on(molt_edge::enroll::enroll(&options)).context("while enrolling")?;
    let verb = match enrolled.outcome {
        molt_edge::enroll::Outcome::Enrolled => "enrolled",
        molt_edge::enroll::Outcome::AlreadyEnrolled => "already enrolled as",
    };
    println!("{verb} {} in org {} (region {})", enrolled.edge_id, enrolled.org_id, enrolled.region);
    println!("run it with: molt-edge --config {}", enrolled.config.display());
    Ok(())
}

/// Installs the subscriber; the answer changes its level (on a config reload).
fn init_logging(log: &config::LogConfig) -> std::sync::Arc<molt_edge::reload::LogLevelSetter> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(log.level.to_env_filter());
    let registry = tracing_subscriber::registry().with(filter);
    let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => registry.with(output.json()).init(),
        LogFormat::Text => registry.with(output).init(),
    }
    std::sync::Arc::new(move |level: &config::LogFilter| {
        handle.reload(level.to_env_filter()).map_err(|error| error.to_string())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only ctrl-c stops the edge");
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

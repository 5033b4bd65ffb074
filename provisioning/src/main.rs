//! `molt-provision`: enrolls edge devices with the control plane, one or a fleet.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use molt_edge::enroll::{self, EnrollOptions, Outcome};
use molt_provision::batch::{self, BatchFile, DevicePkcs11, DeviceStatus};

/// Provision Molt edge devices: generate the edge key (in the device's PKCS#11 token or a
/// 0600 file), enroll it with a single-use token, and write the certificate chain, trust
/// bundle and config atomically.
#[derive(Debug, Parser)]
#[command(
    version,
    long_about = "Provision Molt edge devices.\n\nExamples:\n  molt-provision enroll --control-plane http://10.0.0.1:8080 \
--grpc-addr 10.0.0.1:7443 --token molt_enroll_… --dir /var/lib/molt-edge --config /etc/molt-edge/edge.toml\n  \
molt-provision batch fleet.toml --report report.json\n\nRe-running enroll with the same token on a provisioned \
device changes nothing; a different identity is replaced only with --force."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Provision this device with an enrollment token.
    Enroll(EnrollArgs),
    /// Provision every device a batch file lists, creating a token for each through the
    /// admin API.
    Batch(BatchArgs),
}

#[derive(Debug, Args)]
struct EnrollArgs {
    /// Base URL of the control plane's HTTP API, e.g. http://10.0.0.1:8080.
    #[arg(long, value_name = "URL")]
    control_plane: String,
    /// The enrollment token from `molt enrollment-token create`.
    #[arg(long, value_name = "TOKEN", env = "MOLT_ENROLLMENT_TOKEN", hide_env_values = true)]
    token: String,
    /// The control plane's gRPC address (IP:port), written into the config.
    #[arg(long, value_name = "ADDR")]
    grpc_addr: SocketAddr,
    /// Directory for the key, chain, trust anchors, trust bundle and provisioning record.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Where to write the config [default: DIR/edge.toml].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    pkcs11: Pkcs11Args,
    /// Replace a different edge identity already in DIR.
    #[arg(long)]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct Pkcs11Args {
    /// Generate the key in a PKCS#11 token through this module (e.g.
    /// /usr/lib/softhsm/libsofthsm2.so) instead of a file.
    #[arg(long, value_name = "PATH", requires = "token_label")]
    pkcs11_module: Option<PathBuf>,
    /// Label of the token to generate the key in.
    #[arg(long, value_name = "LABEL", requires = "pkcs11_module")]
    token_label: Option<String>,
    /// Environment variable holding the token's user PIN, now and when the edge runs.
    #[arg(long, value_name = "VAR", requires = "pkcs11_module", conflicts_with = "pin_file")]
    pin_env: Option<String>,
    /// File holding the token's user PIN (mode 0600), now and when the edge runs.
    #[arg(long, value_name = "FILE", requires = "pkcs11_module")]
    pin_file: Option<PathBuf>,
    /// Prefix of the new key's label; a random suffix is added.
    #[arg(long, value_name = "PREFIX", requires = "pkcs11_module")]
    key_label_prefix: Option<String>,
}

#[derive(Debug, Args)]
struct BatchArgs {
    /// The batch file (TOML): control_plane, grpc_addr, org, and one [[device]] table per
    /// device with name, dir, region and optionally org, config, force, [device.pkcs11].
    file: PathBuf,
    /// Admin credential with the scope ca:write, to create the devices' tokens.
    #[arg(long, value_name = "TOKEN", env = "MOLT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Enroll(args) => enroll_one(args),
        Command::Batch(args) => run_batch(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("while starting the runtime")
}

fn enroll_one(args: EnrollArgs) -> anyhow::Result<ExitCode> {
    let pkcs11 = args.pkcs11.pkcs11_module.map(|module| DevicePkcs11 {
        module,
        token_label: args.pkcs11.token_label.unwrap_or_default(),
        pin_env: args.pkcs11.pin_env,
        pin_file: args.pkcs11.pin_file,
        key_label_prefix: args.pkcs11.key_label_prefix,
    });
    if pkcs11.as_ref().is_some_and(|pkcs11| pkcs11.pin_env.is_none() && pkcs11.pin_file.is_none()) {
        anyhow::bail!("--pkcs11-module needs --pin-env VAR or --pin-file FILE: the edge reads its PIN from there");
    }
    let options = EnrollOptions {
        control_plane: args.control_plane,
        token: args.token,
        grpc_addr: args.grpc_addr,
        dir: args.dir,
        config: args.config,
        key: batch::key_plan(pkcs11.as_ref()),
        force: args.force,
    };
    let enrolled = runtime()?.block_on(enroll::enroll(&options)).context("while provisioning")?;
    let status = match enrolled.outcome {
        Outcome::Enrolled => "enrolled",
        Outcome::AlreadyEnrolled => "already_provisioned",
    };
    if args.json {
        let answer = serde_json::json!({
            "status": status,
            "edge_id": enrolled.edge_id.to_string(),
            "org_id": enrolled.org_id,
            "region": enrolled.region,
            "config": enrolled.config,
        });
        println!("{answer}");
    } else {
        let verb = if enrolled.outcome == Outcome::Enrolled { "enrolled" } else { "already provisioned as" };
        println!("{verb} {} in org {} (region {})", enrolled.edge_id, enrolled.org_id, enrolled.region);
        println!("run it with: molt-edge --config {}", enrolled.config.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn run_batch(args: &BatchArgs) -> anyhow::Result<ExitCode> {
    let file = BatchFile::load(&args.file)?;
    let admin = molt_sdk::api::ApiClient::new(&file.control_plane)
        .context("while setting up the admin API client")?
        .with_admin_token(args.admin_token.clone());
    let bar = indicatif::ProgressBar::new(file.devices.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} devices {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let summary = runtime()?.block_on(batch::run(&file, &admin, |report| {
        let line = match (&report.status, &report.edge_id, &report.error) {
            (DeviceStatus::Failed, _, Some(error)) => format!("{}: failed: {error}", report.name),
            (DeviceStatus::Enrolled, Some(id), _) => format!("{}: enrolled as {id}", report.name),
            (_, Some(id), _) => format!("{}: already provisioned as {id}", report.name),
            _ => format!("{}: {:?}", report.name, report.status),
        };
        // Through the bar, so the line does not tear it; plain when stderr is no terminal.
        if bar.is_hidden() {
            eprintln!("{line}")
        } else {
            bar.println(line)
        }
        bar.inc(1);
    }));
    bar.finish_and_clear();
    println!(
        "{} devices: {} enrolled, {} already provisioned, {} failed",
        summary.devices.len(),
        summary.enrolled,
        summary.already_provisioned,
        summary.failed
    );
    for report in summary.devices.iter().filter(|report| report.status == DeviceStatus::Failed) {
        println!("  failed: {}: {}", report.name, report.error.as_deref().unwrap_or("unknown error"));
    }
    if let Some(path) = &args.report {
        write_report(path, &summary)?;
    }
    Ok(if summary.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn write_report(path: &Path, summary: &batch::Summary) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(summary).context("while encoding the report")?;
    molt_edge::trust::write_atomically(path, &json, 0o644)
        .with_context(|| format!("while writing the report to {}", path.display()))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MOLT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}

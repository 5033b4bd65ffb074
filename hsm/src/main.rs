//! `molt-hsm`: key ceremonies, transcript verification and module checks. Thin: parses
//! arguments and calls the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use molt_hsm::ceremony::{Ceremony, Mode};
use molt_hsm::softhsm::SOFTHSM2_MODULE;
use molt_hsm::{
    PinSource, SESSION_POOL_SIZE_DEFAULT, Token, TokenConfig, TokenSelector, doctor, rehearsal, transcript,
};

#[derive(Parser, Debug)]
#[command(name = "molt-hsm", version, about = "Molt HSM keys: ceremonies, transcripts, module doctor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the key ceremony a ceremony file describes.
    Ceremony {
        file: PathBuf,
        /// Rehearse on a throw-away SoftHSM2 token; the real token is not touched.
        #[arg(long)]
        dry_run: bool,
        /// SoftHSM2 module used by --dry-run.
        #[arg(long, default_value = SOFTHSM2_MODULE)]
        softhsm_module: PathBuf,
        #[command(flatten)]
        pin: PinArgs,
        /// Internal: the rehearsal process of --dry-run, writing into this directory.
        #[arg(long, hide = true)]
        rehearse_into: Option<PathBuf>,
    },
    /// Transcript commands.
    Transcript {
        #[command(subcommand)]
        command: TranscriptCommand,
    },
    /// Generates or shows an Ed25519 key on a token (prints its public key as PEM).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Lists slots, tokens and mechanisms; with --token, checks Ed25519 for real.
    Doctor {
        #[arg(long)]
        module: PathBuf,
        /// Label of a token the doctor may create (and then destroy) a test key on.
        #[arg(long)]
        token: Option<String>,
        #[command(flatten)]
        pin: PinArgs,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Generates an Ed25519 key pair inside the token (sensitive, never extractable).
    Generate {
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Prints the public key of an Ed25519 key on the token.
    Show {
        #[command(flatten)]
        key: KeyArgs,
    },
}

/// Which key on which token.
#[derive(Args, Debug)]
struct KeyArgs {
    #[arg(long)]
    module: PathBuf,
    /// Label of the token.
    #[arg(long)]
    token: String,
    /// Label of the key.
    #[arg(long)]
    label: String,
    #[command(flatten)]
    pin: PinArgs,
}

#[derive(Subcommand, Debug)]
enum TranscriptCommand {
    /// Checks a transcript's hash chain and signatures, and the outputs next to it.
    Verify {
        file: PathBuf,
        /// Require the transcript to be signed by this certificate's key (PEM).
        #[arg(long)]
        signer_certificate: Option<PathBuf>,
    },
}

/// Where the token PIN comes from; the default is a prompt.
#[derive(Args, Debug)]
struct PinArgs {
    /// Read the PIN from this environment variable.
    #[arg(long, conflicts_with = "pin_file")]
    pin_env: Option<String>,
    /// Read the PIN from this file (mode 0600).
    #[arg(long)]
    pin_file: Option<PathBuf>,
}

impl PinArgs {
    fn source(&self) -> PinSource {
        match (&self.pin_env, &self.pin_file) {
            (Some(name), _) => PinSource::Env(name.clone()),
            (None, Some(path)) => PinSource::File(path.clone()),
            (None, None) => PinSource::Prompt,
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Ceremony { file, dry_run, softhsm_module, pin, rehearse_into } => {
            let ceremony = Ceremony::load(&file)?;
            match (rehearse_into, dry_run) {
                (Some(out_dir), _) => rehearse(&ceremony, &softhsm_module, out_dir),
                (None, true) => dry_run_ceremony(&ceremony, &file, &softhsm_module),
                (None, false) => real_ceremony(&ceremony, pin.source()),
            }
        }
        Command::Transcript { command: TranscriptCommand::Verify { file, signer_certificate } } => {
            verify_transcript(&file, signer_certificate.as_deref())
        }
        Command::Key { command } => {
            let (key, generate) = match command {
                KeyCommand::Generate { key } => (key, true),
                KeyCommand::Show { key } => (key, false),
            };
            let token = Token::open(&TokenConfig {
                module: key.module.clone(),
                token: TokenSelector::Label(key.token.clone()),
                pin: key.pin.source(),
                pool_size: 1,
            })
            .context("while opening the token")?;
            let found = if generate {
                token.generate_ed25519(&key.label)?
            } else {
                token.find_ed25519(molt_hsm::key::KeyName::Label(&key.label))?
            };
            print!("{}", public_key_pem(&found.public_key()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor { module, token, pin } => {
            let config = token.map(|label| TokenConfig {
                module: module.clone(),
                token: TokenSelector::Label(label),
                pin: pin.source(),
                pool_size: 1,
            });
            let report = doctor::run(&module, config.as_ref()).context("while examining the module")?;
            print!("{}", report.render());
            Ok(if report.has_problems() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
    }
}

fn real_ceremony(ceremony: &Ceremony, pin: PinSource) -> anyhow::Result<ExitCode> {
    ceremony.check_outputs_absent(&Mode::Real)?;
    let token = Token::open(&TokenConfig {
        module: ceremony.file.hsm.module.clone(),
        token: ceremony.token_selector(),
        pin,
        pool_size: SESSION_POOL_SIZE_DEFAULT,
    })
    .context("while opening the ceremony token")?;
    let report = ceremony.run(&token, &Mode::Real)?;
    print_report(&report)?;
    Ok(ExitCode::SUCCESS)
}

fn dry_run_ceremony(ceremony: &Ceremony, file: &Path, softhsm_module: &Path) -> anyhow::Result<ExitCode> {
    let program = std::env::current_exe().context("while finding this program")?;
    let out_dir = rehearsal::start(ceremony, file, softhsm_module, &program)?;
    println!("dry run passed; rehearsal outputs are in {} (the real token was not touched)", out_dir.display());
    Ok(ExitCode::SUCCESS)
}

fn rehearse(ceremony: &Ceremony, softhsm_module: &Path, out_dir: PathBuf) -> anyhow::Result<ExitCode> {
    let report = rehearsal::run(ceremony, softhsm_module, out_dir)?;
    print_report(&report)?;
    Ok(ExitCode::SUCCESS)
}

fn print_report(report: &molt_hsm::ceremony::Report) -> anyhow::Result<()> {
    let verified = transcript::verify_file(&report.transcript, Some(&report.signer))
        .context("while verifying the transcript just written")?;
    for note in &report.notes {
        println!("note: {note}");
    }
    for (path, digest) in &report.outputs {
        println!("wrote {}  sha256 {}", path.display(), transcript::hex(digest));
    }
    println!(
        "transcript {} ({} entries) signed by {}",
        report.transcript.display(),
        verified.entries.len(),
        transcript::hex(report.signer.as_bytes())
    );
    Ok(())
}

fn verify_transcript(file: &Path, signer_certificate: Option<&Path>) -> anyhow::Result<ExitCode> {
    let expected = match signer_certificate {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("while reading {}", path.display()))?;
            let certificate = molt_protocol::cert::Certificate::from_pem(&text)
                .with_context(|| format!("while reading {}", path.display()))?;
            Some(certificate.public_key())
        }
        None => None,
    };
    let verified = transcript::verify_file(file, expected.as_ref())?;
    for entry in &verified.entries {
        println!("{:>3} {} {}", entry.seq, entry.time, entry.event);
    }
    for (path, digest, found) in &verified.outputs {
        let status = if *found { "matches" } else { "not found next to the transcript" };
        println!("output {path} sha256 {digest}: {status}");
    }
    let signer = transcript::hex(verified.signer.as_bytes());
    match expected {
        Some(_) => println!("transcript verifies; signed by the expected key {signer}"),
        None => println!(
            "transcript verifies; signed by {signer} (compare with the ceremony key, or pass --signer-certificate)"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// PEM `PUBLIC KEY` (SubjectPublicKeyInfo), as `openssl pkey -pubout` writes it.
fn public_key_pem(key: &molt_protocol::keys::PublicKey) -> String {
    let mut der = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    der.extend_from_slice(key.as_bytes());
    molt_protocol::cert::pem_encode("PUBLIC KEY", &der)
}

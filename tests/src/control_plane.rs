//! A real `molt-control-plane` process on a fresh SQLite file (or on a database given to
//! it), and the `molt` command line run against it: what the CLI end-to-end tests
//! (`cli_admin`, `cli_ledger`) and `molt-bench ledger-api` share.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use crate::{binary, free_ports, http_get};

/// How long the control plane may take to print its credential and answer /healthz.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one `molt` command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(40);
/// Lines of the control plane's standard error buffered while it starts.
const START_LINES_MAX: usize = 256;

/// A `molt-control-plane` process on a fresh SQLite file in a directory (or on the
/// database it was given), killed on drop.
#[derive(Debug)]
pub struct ControlPlane {
    process: Option<Guard>,
    addr: SocketAddr,
    /// The address of its gRPC service for edges, when started with one.
    pub grpc_addr: Option<SocketAddr>,
    dir: PathBuf,
    /// `sqlite:<dir>/control-plane.db`, or the URL it was started on.
    database_url: String,
    /// Extra environment variables it runs with, again on restart.
    environment: Vec<(String, String)>,
    /// The bootstrap admin credential it printed on its first start.
    pub token: String,
}

impl ControlPlane {
    /// Starts the control plane with its database in `dir` and waits until it answers.
    pub fn start(dir: &Path) -> anyhow::Result<ControlPlane> {
        ControlPlane::start_with(dir, None, None, &[])
    }

    /// As [`ControlPlane::start`], with extra environment variables (`MOLT_CP_*` settings).
    pub fn start_with_env(dir: &Path, environment: &[(&str, &str)]) -> anyhow::Result<ControlPlane> {
        ControlPlane::start_with(dir, None, None, environment)
    }

    /// As [`ControlPlane::start_with_env`], on the database at `database_url` (a
    /// `postgres://` one, say) instead of a SQLite file in `dir`, which stays its working
    /// directory. A PostgreSQL database needs `MOLT_CP_KEK` in `environment`.
    pub fn start_on_database(
        dir: &Path,
        database_url: &str,
        environment: &[(&str, &str)],
    ) -> anyhow::Result<ControlPlane> {
        ControlPlane::start_with(dir, Some(database_url), None, environment)
    }

    /// As [`ControlPlane::start`], also serving the edge gRPC service on a free port.
    pub fn start_with_grpc(dir: &Path) -> anyhow::Result<ControlPlane> {
        let (_, port) = free_ports();
        ControlPlane::start_with(dir, None, Some(SocketAddr::from(([127, 0, 0, 1], port))), &[])
    }

    fn start_with(
        dir: &Path,
        database_url: Option<&str>,
        grpc_addr: Option<SocketAddr>,
        environment: &[(&str, &str)],
    ) -> anyhow::Result<ControlPlane> {
        let environment: Vec<(String, String)> =
            environment.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())).collect();
        let database_url = match database_url {
            Some(url) => url.to_owned(),
            None => format!("sqlite:{}", dir.join("control-plane.db").display()),
        };
        let (_, port) = free_ports();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (process, lines) = spawn(dir, &database_url, addr, grpc_addr, &environment)?;
        let mut process = process;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen = String::new();
        let token = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines.recv_timeout(left).with_context(|| format!("no bootstrap credential printed:\n{seen}"))?;
            if let Some(token) = line.split_whitespace().find(|word| word.starts_with("molt_admin_")) {
                break token.to_owned();
            }
            seen.push_str(&line);
            seen.push('\n');
        };
        wait_healthy(&mut process, addr, deadline, &seen)?;
        Ok(ControlPlane {
            process: Some(process),
            addr,
            grpc_addr,
            dir: dir.to_owned(),
            database_url,
            environment,
            token,
        })
    }

    /// Kills the process (the database stays).
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Starts the process again on the same database and addresses.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let (mut process, _lines) = spawn(&self.dir, &self.database_url, self.addr, self.grpc_addr, &self.environment)?;
        wait_healthy(&mut process, self.addr, Instant::now() + START_TIMEOUT, "")?;
        self.process = Some(process);
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process id while it runs (for its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|process| process.0.id())
    }

    /// Runs `query` on the control plane's SQLite database (started without another
    /// database) with the `sqlite3` tool; its
    /// output, one row a line, columns separated by `|`.
    pub fn sql(&self, query: &str) -> anyhow::Result<String> {
        let output = Command::new("sqlite3").arg(self.dir.join("control-plane.db")).arg(query).output()?;
        ensure!(output.status.success(), "sqlite3 {query:?}: {}", String::from_utf8_lossy(&output.stderr));
        Ok(String::from_utf8(output.stdout)?)
    }
}

/// Names a file that receives a copy of every spawned control plane's log, e.g. with
/// `MOLT_CP_LOG_LEVEL=molt_control_plane::ledger=trace` to trace the batches of a bench.
pub const COPY_STDERR_ENV: &str = "MOLT_TEST_CP_STDERR";

fn spawn(
    dir: &Path,
    database: &str,
    addr: SocketAddr,
    grpc_addr: Option<SocketAddr>,
    environment: &[(String, String)],
) -> anyhow::Result<(Guard, mpsc::Receiver<String>)> {
    let mut command = Command::new(binary("molt-control-plane"));
    command
        .args(["--listen", &addr.to_string(), "--database-url", database])
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("MOLT_CP_GRPC_LISTEN")
        .envs(environment.iter().map(|(name, value)| (name, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(grpc_addr) = grpc_addr {
        command.env("MOLT_CP_GRPC_LISTEN", grpc_addr.to_string());
    }
    let mut process = Guard(command.spawn().context("while starting molt-control-plane")?);
    let stderr = process.0.stderr.take().context("stderr")?;
    let (lines_tx, lines) = mpsc::sync_channel(START_LINES_MAX);
    // Drains stderr for the life of the process, so it never blocks on a full pipe; with
    // `COPY_STDERR_ENV` set, also appends it to that file (for traces of a bench run).
    let mut copy = std::env::var_os(COPY_STDERR_ENV)
        .and_then(|path| std::fs::OpenOptions::new().create(true).append(true).open(path).ok());
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(file) = copy.as_mut() {
                let _ = writeln!(file, "{line}");
            }
            let _ = lines_tx.try_send(line);
        }
    });
    Ok((process, lines))
}

fn wait_healthy(process: &mut Guard, addr: SocketAddr, deadline: Instant, seen: &str) -> anyhow::Result<()> {
    while http_get(addr, "/healthz").map(|(status, _)| status).ok() != Some(200) {
        ensure!(Instant::now() < deadline, "the control plane did not answer /healthz:\n{seen}");
        if let Some(status) = process.0.try_wait()? {
            bail!("the control plane exited with {status}:\n{seen}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl ControlPlane {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// `molt` with the API flags set through its environment, run in `dir`.
#[derive(Clone, Debug)]
pub struct Cli {
    pub api: String,
    pub token: Option<String>,
    pub dir: PathBuf,
}

impl Cli {
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(binary("molt"));
        command.args(args).current_dir(&self.dir).env("MOLT_API", &self.api).env_remove("MOLT_ADMIN_TOKEN");
        if let Some(token) = &self.token {
            command.env("MOLT_ADMIN_TOKEN", token);
        }
        command
    }

    /// Runs a command that must succeed; its standard output.
    pub fn stdout(&self, args: &[&str]) -> anyhow::Result<String> {
        let (status, stdout, stderr) = run(self.command(args))?;
        ensure!(status.success(), "molt {args:?} exited with {status}:\n{stderr}");
        Ok(stdout)
    }

    /// Runs a command with `--json`; its answer.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let stdout = self.stdout(&with_json)?;
        serde_json::from_str(stdout.trim()).with_context(|| format!("molt {args:?} printed {stdout:?}"))
    }

    /// Runs a command that must fail with exit status 1; its standard error.
    pub fn fails(&self, args: &[&str]) -> anyhow::Result<String> {
        self.fails_with(1, args)
    }

    /// Runs a command that must fail with exit status `code` (2: a usage error); its
    /// standard error.
    pub fn fails_with(&self, code: i32, args: &[&str]) -> anyhow::Result<String> {
        let (status, stdout, stderr) = run(self.command(args))?;
        ensure!(
            status.code() == Some(code),
            "molt {args:?} exited with {status}; stdout {stdout:?}, stderr {stderr:?}"
        );
        ensure!(stderr.starts_with("error: "), "molt {args:?}: {stderr:?}");
        Ok(stderr)
    }
}

/// `value[field]` as a string.
pub fn text(value: &Value, field: &str) -> anyhow::Result<String> {
    value[field].as_str().map(str::to_owned).with_context(|| format!("no {field} in {value}"))
}

/// Runs `command` to its end within [`COMMAND_TIMEOUT`]: its status, stdout and stderr.
pub fn run(mut command: Command) -> anyhow::Result<(ExitStatus, String, String)> {
    let description = format!("{command:?}");
    let mut child = Guard(command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?);
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    // Small outputs: they fit in the pipes until the process has exited.
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            bail!("{description} did not exit within {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child.0.stdout.take().context("stdout")?.read_to_string(&mut stdout)?;
    child.0.stderr.take().context("stderr")?.read_to_string(&mut stderr)?;
    Ok((status, stdout, stderr))
}

/// A child process killed and reaped when dropped.
#[derive(Debug)]
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

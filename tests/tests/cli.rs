//! End-to-end scenarios through the real `molt` binary: `molt up` runs the network as a
//! child process, and agents are made, send and listen with the CLI, as a user would.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use molt_tests::{binary, free_ports, http_get};

/// How long `molt up` may take to answer /healthz and print its banner.
const UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `molt` command other than `up` may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(40);
/// How long `molt listen` may take to connect.
const LISTEN_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `molt up` may take to drain and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn molt_up_relays_between_cli_agents() -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let mut up = MoltUp::start(temp.path(), "net")?;
    let alice = CliAgent::create(&up, "alice")?;
    let bob = CliAgent::create(&up, "bob")?;

    let listener = Listener::start(&up, &bob, &alice, 2)?;
    let first = alice.send(&up, &bob, "hello bob", false)?;
    ensure!(first.len() == 1, "send printed {first:?}");
    ensure!(first[0].contains(r#""disposition":"forwarded""#), "bob is listening: {first:?}");
    ensure!(first[0].contains(&format!(r#""recipient":"{}""#, bob.id)), "{first:?}");
    let second = alice.send(&up, &bob, "second message", true)?;
    ensure!(second.len() == 2, "send --wait-receipt printed {second:?}");
    ensure!(second[1].contains(&format!(r#""receipt_from":"{}""#, bob.id)), "{second:?}");

    let received = listener.finish()?;
    ensure!(received.len() == 2, "listen printed {received:?}");
    for (line, text) in received.iter().zip(["hello bob", "second message"]) {
        ensure!(line.contains(&format!(r#""text":"{text}""#)), "expected {text:?} in {line}");
        ensure!(line.contains(&format!(r#""sender":"{}""#, alice.id)), "expected sender {} in {line}", alice.id);
    }
    let status = up.terminate()?;
    ensure!(status.success(), "molt up exited with {status} after SIGTERM; log:\n{}", up.log());
    Ok(())
}

#[test]
fn molt_up_stores_for_an_offline_cli_agent() -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let mut up = MoltUp::start(temp.path(), "net")?;
    let alice = CliAgent::create(&up, "alice")?;
    let bob = CliAgent::create(&up, "bob")?;

    let sent = alice.send(&up, &bob, "while you were out", false)?;
    ensure!(sent.len() == 1 && sent[0].contains(r#""disposition":"stored""#), "bob is offline: {sent:?}");
    let received = Listener::start(&up, &bob, &alice, 1)?.finish()?;
    ensure!(received.len() == 1, "listen printed {received:?}");
    ensure!(received[0].contains(r#""text":"while you were out""#), "{received:?}");
    ensure!(received[0].contains(&format!(r#""sender":"{}""#, alice.id)), "{received:?}");
    let status = up.terminate()?;
    ensure!(status.success(), "molt up exited with {status} after SIGTERM; log:\n{}", up.log());
    Ok(())
}

#[test]
fn molt_up_reuses_its_directory() -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let mut first = MoltUp::start(temp.path(), "net")?;
    ensure!(first.banner().contains("(created)"), "first banner:\n{}", first.banner());
    let files = ["ca/root.pem", "ca/org.pem", "edge/edge.pem", "edge/edge.key", "edge/edge.toml"];
    let before = read_all(&first.dir, &files)?;
    let status = first.terminate()?;
    ensure!(status.success(), "first molt up exited with {status}; log:\n{}", first.log());

    // Fresh ports, so the flags override edge.toml for this run.
    let mut second = MoltUp::start(temp.path(), "net")?;
    let banner = second.banner();
    ensure!(banner.contains(&format!("CA       {} (reused)", first.dir.join("ca").display())), "{banner}");
    ensure!(banner.contains("certificate reused"), "{banner}");
    ensure!(banner.contains("overridden for this run by --listen --admin"), "{banner}");
    ensure!(read_all(&second.dir, &files)? == before, "a second run changed the CA or the edge's files");
    let status = second.terminate()?;
    ensure!(status.success(), "second molt up exited with {status}; log:\n{}", second.log());
    Ok(())
}

fn molt() -> PathBuf {
    binary("molt")
}

/// A child process killed (and reaped) when dropped, so a failing test leaves none behind.
#[derive(Debug)]
struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    fn spawn(command: &mut Command) -> anyhow::Result<ChildGuard> {
        Ok(ChildGuard { child: command.spawn().with_context(|| format!("while starting {command:?}"))? })
    }

    /// Waits for the process to exit on its own; kills it after `timeout`.
    fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!("did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Collects a child's output pipe line by line on a thread, so it can be read while the
/// child runs.
#[derive(Clone, Debug, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(pipe: impl std::io::Read + Send + 'static) -> Lines {
        let lines = Lines::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                sink.0.lock().expect("lines lock").push(line);
            }
        });
        lines
    }

    fn snapshot(&self) -> Vec<String> {
        self.0.lock().expect("lines lock").clone()
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.snapshot().iter().any(|line| line.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// `molt up` running as a child process on fresh loopback ports.
#[derive(Debug)]
struct MoltUp {
    dir: PathBuf,
    quic_addr: SocketAddr,
    log_path: PathBuf,
    stdout: Lines,
    process: ChildGuard,
}

impl MoltUp {
    /// Starts `molt up --dir parent/name` and waits for /healthz and the banner.
    fn start(parent: &Path, name: &str) -> anyhow::Result<MoltUp> {
        let dir = parent.join(name);
        let (quic_port, admin_port) = free_ports();
        let quic_addr = SocketAddr::from(([127, 0, 0, 1], quic_port));
        let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin_port));
        let log_path = parent.join(format!("{name}-up-{admin_port}.log"));
        let mut process = ChildGuard::spawn(
            Command::new(molt())
                .arg("up")
                .arg("--dir")
                .arg(&dir)
                .args(["--listen", &quic_addr.to_string(), "--admin", &admin_addr.to_string()])
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log_path)?),
        )?;
        let stdout = Lines::collect(process.child.stdout.take().context("molt up's stdout")?);
        let up = MoltUp { dir, quic_addr, log_path, stdout, process };
        up.wait_ready(admin_addr)?;
        Ok(up)
    }

    fn wait_ready(&self, admin_addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + UP_TIMEOUT;
        while !http_get(admin_addr, "/healthz").is_ok_and(|(status, _)| status == 200) {
            ensure!(Instant::now() < deadline, "molt up was not healthy within {UP_TIMEOUT:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        // The banner follows the edge's start; its last command is `molt send`.
        ensure!(self.stdout.wait_for("molt send", UP_TIMEOUT), "no banner; stdout:\n{}", self.banner());
        let banner = self.banner();
        ensure!(banner.contains(&format!("--edge {}", self.quic_addr)), "banner:\n{banner}");
        ensure!(banner.contains(&format!("http://{admin_addr}/healthz")), "banner:\n{banner}");
        ensure!(banner.contains(&format!("http://{admin_addr}/metrics")), "banner:\n{banner}");
        Ok(())
    }

    fn banner(&self) -> String {
        self.stdout.snapshot().join("\n")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    fn ca_root(&self) -> PathBuf {
        self.ca_dir().join("root.pem")
    }

    /// SIGTERM, then waits for the graceful exit.
    fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let pid = self.process.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status()?;
        ensure!(sent.success(), "kill -TERM {pid} failed");
        self.process.wait_timeout(STOP_TIMEOUT).context("while waiting for molt up to stop")
    }
}

/// An agent made with `molt keygen` and `molt dev-ca issue-agent`.
#[derive(Debug)]
struct CliAgent {
    dir: PathBuf,
    id: String,
}

impl CliAgent {
    fn create(up: &MoltUp, name: &str) -> anyhow::Result<CliAgent> {
        let dir = up.dir.join("agents").join(name);
        let id = run_molt(Command::new(molt()).arg("keygen").arg("--dir").arg(&dir))?;
        let id = id.trim().to_owned();
        ensure!(id.starts_with("agent-"), "keygen printed {id:?}");
        run_molt(
            Command::new(molt()).args(["dev-ca", "issue-agent", "--ca"]).arg(up.ca_dir()).arg("--agent-dir").arg(&dir),
        )?;
        Ok(CliAgent { dir, id })
    }

    fn card(&self) -> PathBuf {
        self.dir.join("card.json")
    }

    /// `molt send`; returns its output lines.
    fn send(&self, up: &MoltUp, to: &CliAgent, text: &str, wait_receipt: bool) -> anyhow::Result<Vec<String>> {
        let mut command = Command::new(molt());
        command.arg("send");
        connect_args(&mut command, up, self);
        command.arg("--to").arg(to.card());
        if wait_receipt {
            command.arg("--wait-receipt");
        }
        command.arg(text);
        Ok(run_molt(&mut command)?.lines().map(str::to_owned).collect())
    }
}

/// `molt listen` running as a child process.
#[derive(Debug)]
struct Listener {
    process: ChildGuard,
    stderr: Lines,
}

impl Listener {
    /// Starts `molt listen --count count` for `agent`, accepting `peer`, and waits until
    /// it is connected.
    fn start(up: &MoltUp, agent: &CliAgent, peer: &CliAgent, count: u32) -> anyhow::Result<Listener> {
        let mut command = Command::new(molt());
        command.arg("listen");
        connect_args(&mut command, up, agent);
        command
            .arg("--peer")
            .arg(peer.card())
            .args(["--count", &count.to_string(), "--timeout-secs", "30"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut process = ChildGuard::spawn(&mut command)?;
        let stderr = Lines::collect(process.child.stderr.take().context("listen's stderr")?);
        let listener = Listener { process, stderr };
        let expected = format!("listening as {}", agent.id);
        ensure!(
            listener.stderr.wait_for(&expected, LISTEN_START_TIMEOUT),
            "molt listen did not print {expected:?}; stderr:\n{}",
            listener.stderr.snapshot().join("\n")
        );
        Ok(listener)
    }

    /// Waits for `--count` messages (the process exits) and returns the printed lines.
    fn finish(mut self) -> anyhow::Result<Vec<String>> {
        let status = self.process.wait_timeout(COMMAND_TIMEOUT).context("while waiting for molt listen")?;
        let mut stdout = String::new();
        self.process.child.stdout.take().context("listen's stdout")?.read_to_string(&mut stdout)?;
        ensure!(
            status.success(),
            "molt listen exited with {status}; stdout:\n{stdout}\nstderr:\n{}",
            self.stderr.snapshot().join("\n")
        );
        Ok(stdout.lines().map(str::to_owned).collect())
    }
}

fn connect_args(command: &mut Command, up: &MoltUp, agent: &CliAgent) {
    command
        .arg("--agent-dir")
        .arg(&agent.dir)
        .args(["--edge", &up.quic_addr.to_string()])
        .arg("--ca-root")
        .arg(up.ca_root());
}

/// Runs a `molt` command to completion; returns its stdout, or fails with its stderr.
fn run_molt(command: &mut Command) -> anyhow::Result<String> {
    let description = format!("{command:?}");
    let mut process = ChildGuard::spawn(command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()))?;
    // Small outputs: they fit in the pipes until the process has exited.
    let status = process.wait_timeout(COMMAND_TIMEOUT).with_context(|| format!("while running {description}"))?;
    let (mut stdout, mut stderr) = (String::new(), String::new());
    process.child.stdout.take().context("stdout")?.read_to_string(&mut stdout)?;
    process.child.stderr.take().context("stderr")?.read_to_string(&mut stderr)?;
    ensure!(status.success(), "{description} exited with {status}:\n{stderr}");
    Ok(stdout)
}

fn read_all(dir: &Path, files: &[&str]) -> anyhow::Result<Vec<Vec<u8>>> {
    files.iter().map(|file| std::fs::read(dir.join(file)).with_context(|| format!("while reading {file}"))).collect()
}

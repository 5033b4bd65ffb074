//! End-to-end scenarios through the real `molt` binary: `molt up` runs the network (a
//! control plane and two edges) as a child process, and agents are made, send and listen
//! with the CLI, as a user would; `molt demo` runs its tour.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use molt_tests::{binary, http_get};

/// How long `molt up` may take to answer /healthz and print its banner.
const UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a `molt` command other than `up` may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(40);
/// How long `molt listen` may take to connect.
const LISTEN_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `molt up` may take to drain and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `molt demo` may run.
const DEMO_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn molt_up_relays_between_cli_agents_on_its_two_edges() -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let mut up = MoltUp::start(temp.path(), "net")?;
    let alice = CliAgent::create(&up, "alice")?;
    let bob = CliAgent::create(&up, "bob")?;

    // bob on east, alice on west: every message crosses the edge link.
    let listener = Listener::start(&up, &bob, EAST, &alice, 2)?;
    let first = alice.send(&up, &bob, Via::Edge(WEST), "hello bob", false)?;
    ensure!(first.len() == 1, "send printed {first:?}");
    ensure!(first[0].contains(&format!(r#""recipient":"{}""#, bob.id)), "{first:?}");
    // The edge picked from the control plane's edge map this time.
    let second = alice.send(&up, &bob, Via::EdgeMap, "second message", true)?;
    ensure!(second.len() == 2, "send --wait-receipt printed {second:?}");
    ensure!(second[1].contains(&format!(r#""receipt_from":"{}""#, bob.id)), "{second:?}");

    let received = listener.finish()?;
    ensure!(received.len() == 2, "listen printed {received:?}");
    // Sent through different edges, so either may arrive first.
    for text in ["hello bob", "second message"] {
        let line = received.iter().find(|line| line.contains(&format!(r#""text":"{text}""#)));
        let line = line.with_context(|| format!("{text:?} not among {received:?}"))?;
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

    let sent = alice.send(&up, &bob, Via::Edge(WEST), "while you were out", false)?;
    ensure!(sent.len() == 1 && sent[0].contains(r#""disposition":"stored""#), "bob is offline: {sent:?}");
    // bob comes back at the other edge: the message is handed over to it.
    let received = Listener::start(&up, &bob, EAST, &alice, 1)?.finish()?;
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
    let banner = first.banner();
    for expected in ["(created now)", "org            local (org_", "edge west", "edge east"] {
        ensure!(banner.contains(expected), "first banner lacks {expected:?}:\n{banner}");
    }
    ensure!(!banner.contains("reused"), "first banner:\n{banner}");
    let files = [
        "root.pem",
        "control-plane/admin.token",
        "control-plane/org.json",
        "control-plane/control-plane.toml",
        "edges/west/edge.pem",
        "edges/west/edge.key",
        "edges/west/edge.toml",
        "edges/east/edge.pem",
        "edges/east/edge.key",
        "edges/east/edge.toml",
    ];
    let before = read_all(&first.dir, &files)?;
    let status = first.terminate()?;
    ensure!(status.success(), "first molt up exited with {status}; log:\n{}", first.log());

    // The same ports, from the files: no --port-base this time.
    let mut second = MoltUp::restart(&first)?;
    let banner = second.banner();
    ensure!(!banner.contains("created now"), "second banner:\n{banner}");
    ensure!(banner.matches("(enrollment reused)").count() == 2, "second banner:\n{banner}");
    ensure!(banner.contains("admin token in") && banner.contains("(reused)"), "second banner:\n{banner}");
    ensure!(read_all(&second.dir, &files)? == before, "a second run changed the network's files");
    let status = second.terminate()?;
    ensure!(status.success(), "second molt up exited with {status}; log:\n{}", second.log());
    Ok(())
}

#[test]
fn molt_demo_passes_every_step_and_says_so() -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = temp.path().join("demo");
    let mut command = Command::new(molt());
    command.arg("demo").arg("--dir").arg(&dir);
    let transcript = run_molt_for(&mut command, DEMO_TIMEOUT)?;
    for step in 1..=8 {
        ensure!(transcript.contains(&format!("[{step}/8]")), "no step {step} in:\n{transcript}");
    }
    ensure!(transcript.matches("      ok (").count() == 8, "a step did not pass:\n{transcript}");
    ensure!(transcript.contains("alice moved to east after"), "{transcript}");
    ensure!(transcript.contains("bob reconnected and received all 3, in order"), "{transcript}");
    ensure!(transcript.trim_end().ends_with(&format!("Files and logs in {}", dir.display())), "{transcript}");
    ensure!(dir.join("edges/west/edge.log").exists() && dir.join("control-plane.log").exists());
    Ok(())
}

#[test]
fn molt_demo_refuses_a_used_directory() -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    std::fs::write(temp.path().join("something"), "mine")?;
    let output = Command::new(molt()).arg("demo").arg("--dir").arg(temp.path()).stdin(Stdio::null()).output()?;
    ensure!(output.status.code() == Some(1), "exit status {}", output.status);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(stderr.contains("is not empty: the demo needs a fresh network"), "{stderr}");
    ensure!(std::fs::read_to_string(temp.path().join("something"))? == "mine");
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
    /// The `--port-base` of the network's first run.
    base: u16,
    log_path: PathBuf,
    stdout: Lines,
    process: ChildGuard,
}

/// Edge indexes in `molt up`'s port layout.
const WEST: usize = 0;
const EAST: usize = 1;

impl MoltUp {
    /// Starts `molt up --dir parent/name --port-base …` and waits for the banner and both
    /// edges' /healthz.
    fn start(parent: &Path, name: &str) -> anyhow::Result<MoltUp> {
        let base = free_port_run(8)?;
        MoltUp::spawn(parent.join(name), base, true)
    }

    /// Starts `molt up` again on the directory of a stopped one, without `--port-base`.
    fn restart(previous: &MoltUp) -> anyhow::Result<MoltUp> {
        MoltUp::spawn(previous.dir.clone(), previous.base, false)
    }

    fn spawn(dir: PathBuf, base: u16, with_base: bool) -> anyhow::Result<MoltUp> {
        let parent = dir.parent().context("a parent directory")?;
        let log_path = parent.join(format!("up-{base}-{}.log", std::process::id()));
        let mut command = Command::new(molt());
        command.arg("up").arg("--dir").arg(&dir);
        if with_base {
            command.args(["--port-base", &base.to_string()]);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut process = ChildGuard::spawn(command.stdout(Stdio::piped()).stderr(log))?;
        let stdout = Lines::collect(process.child.stdout.take().context("molt up's stdout")?);
        let up = MoltUp { dir, base, log_path, stdout, process };
        up.wait_ready()?;
        Ok(up)
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        // The banner's last line names `molt demo`.
        ensure!(
            self.stdout.wait_for("molt demo", UP_TIMEOUT),
            "no banner; stdout:\n{}\nlog:\n{}",
            self.banner(),
            self.log()
        );
        let banner = self.banner();
        ensure!(banner.contains(&format!("http://{}", self.api_addr())), "banner:\n{banner}");
        for edge in [WEST, EAST] {
            let admin = self.port(edge, 1);
            ensure!(http_get(admin, "/healthz").is_ok_and(|(status, _)| status == 200), "edge {edge} is not healthy");
            ensure!(banner.contains(&format!("QUIC {}", self.quic_addr(edge))), "banner:\n{banner}");
            ensure!(banner.contains(&format!("health http://{admin}/healthz")), "banner:\n{banner}");
        }
        Ok(())
    }

    /// Port `offset` (0 QUIC, 1 health, 2 link) of edge `edge`.
    fn port(&self, edge: usize, offset: u16) -> SocketAddr {
        let edge = u16::try_from(edge).expect("two edges");
        SocketAddr::from(([127, 0, 0, 1], self.base + 2 + edge * 3 + offset))
    }

    fn quic_addr(&self, edge: usize) -> SocketAddr {
        self.port(edge, 0)
    }

    fn api_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base))
    }

    fn banner(&self) -> String {
        self.stdout.snapshot().join("\n")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn ca_root(&self) -> PathBuf {
        self.dir.join("root.pem")
    }

    fn admin_token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.dir.join("control-plane/admin.token"))?.trim().to_owned())
    }

    fn org_id(&self) -> anyhow::Result<String> {
        let org: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.dir.join("control-plane/org.json"))?)?;
        Ok(org["id"].as_str().context("org.json's id")?.to_owned())
    }

    /// SIGTERM, then waits for the graceful exit.
    fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let pid = self.process.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status()?;
        ensure!(sent.success(), "kill -TERM {pid} failed");
        self.process.wait_timeout(STOP_TIMEOUT).context("while waiting for molt up to stop")
    }
}

/// How an agent reaches the network.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// This edge of `molt up`'s two.
    Edge(usize),
    /// The nearest edge of the control plane's edge map.
    EdgeMap,
}

/// An agent made with `molt keygen` and certified by the control plane with
/// `molt cert issue-agent`.
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
            Command::new(molt())
                .args(["cert", "issue-agent", "--org", &up.org_id()?, "--agent-dir"])
                .arg(&dir)
                .env("MOLT_API", format!("http://{}", up.api_addr()))
                .env("MOLT_ADMIN_TOKEN", up.admin_token()?),
        )?;
        Ok(CliAgent { dir, id })
    }

    fn card(&self) -> PathBuf {
        self.dir.join("card.json")
    }

    /// `molt send`; returns its output lines.
    fn send(
        &self,
        up: &MoltUp,
        to: &CliAgent,
        via: Via,
        text: &str,
        wait_receipt: bool,
    ) -> anyhow::Result<Vec<String>> {
        let mut command = Command::new(molt());
        command.arg("send");
        connect_args(&mut command, up, self, via);
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
    fn start(up: &MoltUp, agent: &CliAgent, edge: usize, peer: &CliAgent, count: u32) -> anyhow::Result<Listener> {
        let mut command = Command::new(molt());
        command.arg("listen");
        connect_args(&mut command, up, agent, Via::Edge(edge));
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

fn connect_args(command: &mut Command, up: &MoltUp, agent: &CliAgent, via: Via) {
    command.arg("--agent-dir").arg(&agent.dir);
    match via {
        Via::Edge(edge) => command.args(["--edge", &up.quic_addr(edge).to_string()]),
        Via::EdgeMap => command.args(["--api", &format!("http://{}", up.api_addr())]),
    };
    command.arg("--ca-root").arg(up.ca_root());
}

/// The first of `count` consecutive loopback ports that are free for TCP and UDP now.
fn free_port_run(count: u16) -> anyhow::Result<u16> {
    use rand::Rng as _;
    for _ in 0..200 {
        let base = rand::thread_rng().gen_range(20_000..60_000);
        let free = (0..count).all(|offset| {
            let addr = SocketAddr::from(([127, 0, 0, 1], base + offset));
            std::net::TcpListener::bind(addr).is_ok() && std::net::UdpSocket::bind(addr).is_ok()
        });
        if free {
            return Ok(base);
        }
    }
    bail!("found no {count} consecutive free ports")
}

/// Runs a `molt` command to completion; returns its stdout, or fails with its stderr.
fn run_molt(command: &mut Command) -> anyhow::Result<String> {
    run_molt_for(command, COMMAND_TIMEOUT)
}

fn run_molt_for(command: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let description = format!("{command:?}");
    let mut process = ChildGuard::spawn(command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()))?;
    // Small outputs: they fit in the pipes until the process has exited.
    let status = process.wait_timeout(timeout).with_context(|| format!("while running {description}"))?;
    let (mut stdout, mut stderr) = (String::new(), String::new());
    process.child.stdout.take().context("stdout")?.read_to_string(&mut stdout)?;
    process.child.stderr.take().context("stderr")?.read_to_string(&mut stderr)?;
    ensure!(status.success(), "{description} exited with {status}:\n{stderr}");
    Ok(stdout)
}

fn read_all(dir: &Path, files: &[&str]) -> anyhow::Result<Vec<Vec<u8>>> {
    files.iter().map(|file| std::fs::read(dir.join(file)).with_context(|| format!("while reading {file}"))).collect()
}

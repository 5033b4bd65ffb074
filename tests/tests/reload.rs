//! `kill -HUP` on a real `molt-edge`: a changed connection limit and buffer quota apply at
//! once without dropping the agent already connected, a changed listen address is logged as needing a
//! restart and left alone, and a broken file is refused with its problems logged while
//! the running config stays in force.

use std::path::Path;
use std::time::{Duration, Instant};

use molt_tests::{EdgeProcess, Network, RawSession, free_ports, http_get};

/// Longest wait for the edge to log a reload.
const RELOAD_WAIT: Duration = Duration::from_secs(10);

fn hangup(edge: &EdgeProcess) {
    let status = std::process::Command::new("kill").args(["-HUP", &edge.pid().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Waits until the edge's log holds `count` lines containing `needle`; those lines.
fn wait_for_log(log: &Path, needle: &str, count: usize) -> Vec<String> {
    let deadline = Instant::now() + RELOAD_WAIT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<String> = text.lines().filter(|line| line.contains(needle)).map(str::to_owned).collect();
        if lines.len() >= count {
            return lines;
        }
        assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_live_changes_and_refuses_a_broken_file() {
    let network = Network::new().unwrap();
    let setup = network.edge("edge", "[limits]\nconnections_per_agent = 1\n\n[log]\nformat = \"json\"\n").unwrap();
    let edge = setup.spawn().unwrap();
    let log = setup.config.with_extension("log");
    let agent = network.agent("alice").unwrap();
    let connect = || RawSession::connect(&agent.identity, network.anchors.clone(), setup.quic_addr);

    let first = connect().await.expect("the first connection");
    assert!(connect().await.is_err(), "a second connection is over the limit of 1");

    // Raise the limit and move the listen address: the first applies, the second waits.
    let original = std::fs::read_to_string(&setup.config).unwrap();
    let (other_port, _) = free_ports();
    let changed = original.replace("connections_per_agent = 1", "connections_per_agent = 2").replace(
        &format!("listen_addr = \"{}\"", setup.quic_addr),
        &format!("listen_addr = \"127.0.0.1:{other_port}\""),
    );
    let changed = format!("{changed}\n[buffer]\nmessages_max = 500000\n");
    assert_ne!(changed, original);
    std::fs::write(&setup.config, &changed).unwrap();
    hangup(&edge);
    let reloaded = wait_for_log(&log, "config reloaded", 1);
    assert!(reloaded[0].contains("limits.connections_per_agent"), "{reloaded:?}");
    assert!(reloaded[0].contains("buffer.messages_max"), "{reloaded:?}");
    assert_eq!(edge.metric("molt_edge_buffer_capacity_messages").unwrap(), 500_000.0);
    let restart = wait_for_log(&log, "needs a restart", 1);
    assert!(restart[0].contains("edge.listen_addr"), "{restart:?}");
    let second = connect().await.expect("the raised limit applies at once, on the old address");
    assert!(first.connection.close_reason().is_none(), "the reload dropped a connection");

    // A broken file: every problem logged with its key, nothing changes.
    let broken = changed.replace("connections_per_agent = 2", "connections_per_agent = 0\nbogus_key = 1");
    std::fs::write(&setup.config, broken).unwrap();
    hangup(&edge);
    let refused = wait_for_log(&log, "config reload refused", 1);
    assert!(refused[0].contains("limits.connections_per_agent") && refused[0].contains("bogus_key"), "{refused:?}");
    assert_eq!(http_get(setup.admin_addr, "/healthz").unwrap().0, 200, "the edge keeps running");
    assert!(connect().await.is_err(), "the limit of 2 is still in force");
    assert!(first.connection.close_reason().is_none() && second.connection.close_reason().is_none());
}

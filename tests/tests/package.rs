//! The Debian package from `packaging/build-deb.sh`: it installs into a throw-away root,
//! its unit passes `systemd-analyze verify`, its default config passes `config check`,
//! and the installed binary starts from the installed config (with an identity where the
//! config expects it, as provisioning leaves it) and answers `/healthz`. The run happens
//! in private mount and network namespaces, so the absolute paths and the default ports
//! of the installed config touch nothing on the host.

use std::path::{Path, PathBuf};
use std::process::Command;

use molt_tests::control_plane::run;
use molt_tests::{Network, binary};

/// The package, built once from the debug binaries, and the root it was unpacked into.
struct Installed {
    _dir: tempfile::TempDir,
    deb: PathBuf,
    root: PathBuf,
}

fn install() -> Installed {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = binary("molt-edge").parent().unwrap().to_owned();
    binary("molt-provision");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut build = Command::new(workspace.join("packaging/build-deb.sh"));
    build.arg("--bin-dir").arg(&bin_dir).args(["--compression", "gzip", "--out"]).arg(dir.path());
    let (status, stdout, stderr) = run(build).unwrap();
    assert!(status.success(), "build-deb.sh: {stdout}{stderr}");
    let deb = PathBuf::from(stdout.trim());
    assert!(deb.file_name().unwrap().to_string_lossy().starts_with("molt-edge_0.1.0_"), "{}", deb.display());
    let root = dir.path().join("root");
    let mut extract = Command::new("dpkg-deb");
    extract.arg("-x").arg(&deb).arg(&root);
    let (status, _, stderr) = run(extract).unwrap();
    assert!(status.success(), "dpkg-deb -x: {stderr}");
    Installed { _dir: dir, deb, root }
}

fn output(command: Command) -> String {
    let description = format!("{command:?}");
    let (status, stdout, stderr) = run(command).unwrap();
    assert!(status.success(), "{description}: {stdout}{stderr}");
    stdout
}

#[test]
fn the_package_installs_verifies_and_starts() {
    let installed = install();
    let root = &installed.root;

    let mut fields = Command::new("dpkg-deb");
    fields.arg("-f").arg(&installed.deb).args(["Package", "Version", "Depends"]);
    let fields = output(fields);
    assert!(fields.contains("Package: molt-edge") && fields.contains("Version: 0.1.0"), "{fields}");
    let mut conffiles = Command::new("dpkg-deb");
    conffiles.arg("-I").arg(&installed.deb).arg("conffiles");
    assert_eq!(output(conffiles).trim(), "/etc/molt-edge/edge.toml");

    for path in [
        "usr/bin/molt-edge",
        "usr/bin/molt-provision",
        "lib/systemd/system/molt-edge.service",
        "usr/lib/sysctl.d/60-molt-edge.conf",
        "etc/molt-edge/edge.toml",
        "usr/share/doc/molt-edge/README.md",
    ] {
        assert!(root.join(path).is_file(), "{path} is not in the package");
    }
    assert!(root.join("var/lib/molt-edge").is_dir());
    let sysctl = std::fs::read_to_string(root.join("usr/lib/sysctl.d/60-molt-edge.conf")).unwrap();
    assert!(sysctl.contains("net.core.rmem_max") && sysctl.contains("net.core.wmem_max"), "{sysctl}");
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/molt-edge.service")).unwrap();
    for option in ["ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n", "PrivateTmp=yes"] {
        assert!(unit.contains(option), "the unit lacks {option:?}");
    }

    // The unit, with the installed binaries laid over the host's /usr/bin (an overlay in a
    // private mount namespace), so that its commands resolve as on the device.
    let script = format!(
        "set -e; mount -t overlay overlay -o lowerdir='{root}/usr/bin':/usr/bin /usr/bin; \
         systemd-analyze verify '{root}/lib/systemd/system/molt-edge.service'",
        root = root.display()
    );
    let mut verify = Command::new("unshare");
    verify.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let (status, stdout, stderr) = run(verify).unwrap();
    assert!(status.success() && !stderr.contains("molt-edge.service:"), "systemd-analyze verify: {stdout}{stderr}");

    // The installed binary accepts the installed default config.
    let edge = root.join("usr/bin/molt-edge");
    let config = root.join("etc/molt-edge/edge.toml");
    let mut check = Command::new(&edge);
    check.args(["config", "check"]).arg(&config);
    output(check);

    // An identity where the default config looks for it, as provisioning would leave it.
    let network = Network::new().unwrap();
    let dev = network.edge("dev", "").unwrap();
    let dev_dir = dev.config.parent().unwrap();
    let state = root.join("var/lib/molt-edge");
    for (from, to) in [("edge.pem", "edge.pem"), ("edge.key", "edge.key"), ("root.pem", "trust-anchors.pem")] {
        std::fs::copy(dev_dir.join(from), state.join(to)).unwrap();
    }
    let script = format!(
        r#"set -e
ip link set lo up
mount -t tmpfs tmpfs /var/lib
mkdir /var/lib/molt-edge
mount --bind '{state}' /var/lib/molt-edge
'{edge}' --config '{config}' 2>'{state}/edge.log' &
pid=$!
for attempt in $(seq 1 300); do
    if exec 3<>/dev/tcp/127.0.0.1/9090 2>/dev/null; then
        printf 'GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
        answer=$(cat <&3)
        # Closed before the stop: the admin server's graceful shutdown waits for it.
        exec 3<&-
        kill -TERM $pid
        wait $pid
        echo "$answer"
        exit 0
    fi
    kill -0 $pid 2>/dev/null || {{ cat '{state}/edge.log' >&2; exit 1; }}
    sleep 0.1
done
kill $pid; cat '{state}/edge.log' >&2; exit 1
"#,
        state = state.display(),
        edge = edge.display(),
        config = config.display(),
    );
    let mut start = Command::new("unshare");
    start.args(["--mount", "--net", "--propagation", "private", "bash", "-c", &script]);
    let (status, stdout, stderr) = run(start).unwrap();
    assert!(status.success(), "the installed edge did not answer: {stdout}{stderr}");
    assert!(stdout.starts_with("HTTP/1.0 200") || stdout.starts_with("HTTP/1.1 200"), "{stdout}");
    let log = std::fs::read_to_string(state.join("edge.log")).unwrap();
    assert!(log.lines().any(|line| line.starts_with('{') && line.contains("edge is serving")), "JSON logs: {log}");
    assert!(state.join("data/buffer.redb").is_file(), "the buffer lives in the state directory");
    assert!(log.contains("edge stopped"), "SIGTERM stops it cleanly: {log}");
}

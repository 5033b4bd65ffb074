//! Figures tables: printed to stdout and optionally appended to a markdown file, plus the
//! measurements every table relies on (process CPU time from `/proc`, the machine).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;

/// Clock ticks per second assumed when `getconf CLK_TCK` cannot be asked (Linux's
/// `USER_HZ`, which `/proc/<pid>/stat` uses on every mainstream architecture).
const FALLBACK_CLOCK_TICKS_PER_SECOND: u64 = 100;

/// What a figure is compared against.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn is_met(self, measured: f64) -> bool {
        match self {
            Target::AtLeast(bound) => measured >= bound,
            Target::AtMost(bound) => measured <= bound,
        }
    }
}

#[derive(Clone, Debug)]
struct Row {
    figure: String,
    measured: String,
    target: String,
    verdict: &'static str,
}

/// One scenario's figures: a title, notes (configuration, reference) and rows.
#[derive(Clone, Debug)]
pub struct Section {
    pub title: String,
    notes: Vec<String>,
    rows: Vec<Row>,
}

impl Section {
    pub fn new(title: impl Into<String>) -> Section {
        Section { title: title.into(), notes: Vec::new(), rows: Vec::new() }
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    pub fn notes_extend(&mut self, notes: impl IntoIterator<Item = String>) {
        self.notes.extend(notes);
    }

    /// A figure without a target.
    pub fn info(&mut self, figure: impl Into<String>, measured: impl Into<String>) {
        self.rows.push(Row { figure: figure.into(), measured: measured.into(), target: String::new(), verdict: "" });
    }

    /// A figure with a target; `shown` is how the measured value is printed, `target_shown`
    /// how the bound is.
    pub fn target(
        &mut self,
        figure: impl Into<String>,
        measured: f64,
        shown: impl Into<String>,
        target: Target,
        target_shown: impl Into<String>,
    ) {
        let verdict = if !measured.is_finite() {
            "n/a"
        } else if target.is_met(measured) {
            "met"
        } else {
            "MISSED"
        };
        self.rows.push(Row { figure: figure.into(), measured: shown.into(), target: target_shown.into(), verdict });
    }

    pub fn print(&self) {
        println!("\n== {} ==", self.title);
        for note in &self.notes {
            println!("  {note}");
        }
        let figure_width = self.rows.iter().map(|r| r.figure.chars().count()).max().unwrap_or(0);
        let measured_width = self.rows.iter().map(|r| r.measured.chars().count()).max().unwrap_or(0);
        let target_width = self.rows.iter().map(|r| r.target.chars().count()).max().unwrap_or(0);
        for row in &self.rows {
            let line = if row.target.is_empty() {
                format!("  {:<figure_width$}  {:>measured_width$}", row.figure, row.measured)
            } else {
                format!(
                    "  {:<figure_width$}  {:>measured_width$}   target {:<target_width$}  {}",
                    row.figure, row.measured, row.target, row.verdict
                )
            };
            println!("{}", line.trim_end());
        }
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n", self.title);
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        out.push_str("| Figure | Measured | Target | |\n|---|---:|---|---|\n");
        for row in &self.rows {
            let _ = writeln!(out, "| {} | {} | {} | {} |", row.figure, row.measured, row.target, row.verdict);
        }
        out.push('\n');
        out
    }

    /// Copies another section's row that has a target, under a new figure name.
    pub fn copy_targeted(&mut self, figure: String, measured: &str, target: &str, verdict: &'static str) {
        self.rows.push(Row { figure, measured: measured.into(), target: target.into(), verdict });
    }

    /// The rows that have a target, as (figure, measured, target, verdict).
    pub fn targeted_rows(&self) -> impl Iterator<Item = (&str, &str, &str, &'static str)> {
        self.rows
            .iter()
            .filter(|r| !r.target.is_empty())
            .map(|r| (r.figure.as_str(), r.measured.as_str(), r.target.as_str(), r.verdict))
    }
}

/// Appends text to the markdown file, creating it if needed.
pub fn append_markdown(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("while opening {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("while appending to {}", path.display()))
}

/// CPU time (user + system, all threads) a process has used so far, from
/// `/proc/<pid>/stat` fields 14 and 15.
pub fn process_cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("while reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = stat.rfind(')').map(|end| &stat[end + 1..]).context("no command name in stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (state), so field n is fields[n - 3].
    let ticks = |field: usize| -> anyhow::Result<u64> {
        fields.get(field - 3).context("stat is too short")?.parse::<u64>().context("stat field is not a number")
    };
    let total_ticks = ticks(14)? + ticks(15)?;
    Ok(Duration::from_secs_f64(total_ticks as f64 / clock_ticks_per_second() as f64))
}

/// CPU time the calling thread has used, in nanoseconds (`/proc/thread-self/schedstat`),
/// or `None` where the kernel does not offer it.
pub fn thread_cpu_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok().map(Duration::from_nanos)
}

/// CPU time every process on the machine has used since boot (all CPUs, `/proc/stat`).
pub fn system_busy_time() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("while reading /proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: u64 =
        ticks.iter().take(8).enumerate().filter(|(index, _)| *index != 3 && *index != 4).map(|(_, v)| v).sum();
    Ok(Duration::from_secs_f64(busy as f64 / clock_ticks_per_second() as f64))
}

/// Cores other processes may use, on average, for the machine to count as quiet.
pub const QUIET_CORES_MAX: f64 = 0.15;
/// How long each quietness sample lasts.
const QUIET_SAMPLE: Duration = Duration::from_secs(2);

/// Waits (at most `patience`) until processes other than this one and `also_ours` use
/// less than [`QUIET_CORES_MAX`]: on a shared two-core machine a neighbour's compile
/// halves every figure. Returns the cores others used in the last sample.
pub fn wait_for_quiet(also_ours: u32, patience: Duration) -> anyhow::Result<f64> {
    let give_up = std::time::Instant::now() + patience;
    loop {
        let ours = |pid: u32| process_cpu_time(pid).unwrap_or_default();
        let (system, mine, theirs) = (system_busy_time()?, ours(std::process::id()), ours(also_ours));
        std::thread::sleep(QUIET_SAMPLE);
        let used = system_busy_time()?.saturating_sub(system);
        let own = ours(std::process::id()).saturating_sub(mine) + ours(also_ours).saturating_sub(theirs);
        let others = used.saturating_sub(own).as_secs_f64() / QUIET_SAMPLE.as_secs_f64();
        if others < QUIET_CORES_MAX || std::time::Instant::now() >= give_up {
            return Ok(others);
        }
        eprintln!("  waiting for a quiet machine: other processes use {others:.2} cores");
    }
}

/// The 1-minute load average, for the record.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// `sysconf(_SC_CLK_TCK)`, asked of `getconf` because this crate forbids `unsafe`.
pub fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|ticks| *ticks > 0)
            .unwrap_or(FALLBACK_CLOCK_TICKS_PER_SECOND)
    })
}

/// CPU count and model, for the record.
pub fn machine_description() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim())
        .to_string();
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| text.lines().next().map(str::to_string))
        .and_then(|line| line.split_whitespace().nth(1).and_then(|kib| kib.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs (nproc), {model}, {memory_gib:.0} GiB RAM, Linux {}", kernel.trim())
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".into();
    }
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    if value < 0.0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(f64::NAN), "n/a");
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(process_cpu_time(std::process::id()).is_ok());
    }
}

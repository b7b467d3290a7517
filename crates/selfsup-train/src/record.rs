//! Run records: what produced a run or an evaluation result, one JSON line per invocation in
//! `RUN/record.jsonl`.
//!
//! A record names the build (version, commit, whether the tree was dirty), the command line,
//! the effective configuration, the dataset's identity ([`selfsup_data::fingerprint`]), the
//! machine (CPU model, cores, threads, ranks, memory, OS), the start time and the wall time, and
//! for evaluations the numbers. Training appends a `"status": "running"` line when it starts
//! and a final line (`done`, `interrupted`, `failed: ...`) with the same `id` when it ends, so a
//! run killed outright still says what it was. Lines are appended with one `write` and synced.

use std::io::Write;
use std::path::Path;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::{Error, Result};

/// The file records go to, inside a run folder.
pub const FILE: &str = "record.jsonl";

/// What built the binary (filled by the binary from its build script).
#[derive(Clone, Debug, Serialize)]
pub struct Build {
    /// Package version.
    pub version: &'static str,
    /// Git commit of the source tree, or `unknown` (built outside a git checkout).
    pub commit: &'static str,
    /// Whether the tree had uncommitted changes when it was built.
    pub dirty: bool,
}

/// The machine a record was made on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Host name.
    pub host: String,
    /// CPU model (`/proc/cpuinfo`).
    pub cpu: String,
    /// Cores this process may use.
    pub cores: usize,
    /// Compute threads per rank (rayon's pool).
    pub threads: usize,
    /// Data-parallel ranks (processes, or threads of one process with `--ranks`).
    pub ranks: usize,
    /// Memory (`MemTotal`), GiB.
    pub memory_gib: f64,
    /// Operating system and kernel.
    pub os: String,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

impl Machine {
    /// This machine, for a run on `ranks` processes.
    pub fn here(ranks: usize) -> Self {
        let cpu = read("/proc/cpuinfo")
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let memory_gib = read("/proc/meminfo")
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .map_or(0.0, |kib| (kib / 1048576.0 * 10.0).round() / 10.0);
        let pretty = read("/etc/os-release").and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        });
        let kernel = read("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string());
        let os = match (pretty, kernel) {
            (Some(p), Some(k)) => format!("{p}, Linux {k}"),
            (p, k) => p.or(k).unwrap_or_else(|| std::env::consts::OS.to_string()),
        };
        Self {
            host: read("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads: rayon::current_num_threads(),
            ranks,
            memory_gib,
            os,
        }
    }
}

/// One invocation: a training run (or a part of one, resumed) or an evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    /// `train`, `eval knn`, `eval linear`, `eval low-label`.
    pub kind: String,
    /// Identifies the lines of one invocation (start time and process id).
    pub id: String,
    /// `running`, `done`, `interrupted`, or `failed: <message>`.
    pub status: String,
    /// Start, RFC 3339 (UTC).
    pub started: String,
    /// Seconds from start to this line.
    pub wall_s: f64,
    /// The binary.
    pub build: Build,
    /// The command line.
    pub command: Vec<String>,
    /// The effective configuration (training) or evaluation settings.
    pub config: serde_json::Value,
    /// Dataset identity ([`selfsup_data::fingerprint`]).
    pub dataset: String,
    /// Where it ran.
    pub machine: Machine,
    /// Numbers produced (final loss, kNN, probe accuracies, ...).
    pub results: serde_json::Value,
    #[serde(skip)]
    clock: Option<Instant>,
}

impl Record {
    /// A record started now, with `status: running`.
    pub fn start(
        kind: &str,
        build: Build,
        config: serde_json::Value,
        dataset: String,
        ranks: usize,
    ) -> Self {
        let now = SystemTime::now();
        let started = humantime::format_rfc3339_seconds(now).to_string();
        Self {
            kind: kind.to_string(),
            id: format!("{started}-{}", std::process::id()),
            status: "running".into(),
            started,
            wall_s: 0.0,
            build,
            command: std::env::args().collect(),
            config,
            dataset,
            machine: Machine::here(ranks),
            results: serde_json::Value::Null,
            clock: Some(Instant::now()),
        }
    }

    /// Set the final status and results (wall time measured now).
    pub fn finish(&mut self, status: &str, results: serde_json::Value) {
        self.status = status.to_string();
        self.results = results;
        self.wall_s = self.clock.map_or(0.0, |c| c.elapsed().as_secs_f64());
    }

    /// Append this record as one line to `path` (created if missing), synced.
    pub fn append(&self, path: &Path) -> Result<()> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut line =
            serde_json::to_string(self).map_err(|e| Error::Config(format!("record: {e}")))?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        f.write_all(line.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    }
}

/// The training configuration as JSON (for [`Record::config`]).
pub fn config_json(cfg: &crate::TrainConfig) -> serde_json::Value {
    toml::from_str::<toml::Value>(&cfg.to_toml())
        .ok()
        .and_then(|v| serde_json::to_value(v).ok())
        .unwrap_or(serde_json::Value::Null)
}

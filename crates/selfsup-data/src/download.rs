//! Fetch, verify and extract CIFAR-10 (feature `download`).
//!
//! 1. If `DIR/cifar-10-batches-bin/` already holds every file at its exact size, return at once.
//! 2. A URL is streamed to `DIR/.cifar-10-binary.tar.gz.part`; an interrupted transfer resumes
//!    from the part file with an HTTP `Range` request (a few attempts in one run, and again on
//!    the next run). A local path (or `file://` URL) is read in place.
//! 3. The archive's sha256 is checked before anything is extracted: the official digest for the
//!    official URL, `sha256` for any other source when given.
//! 4. Only the expected members are extracted (regular files under `cifar-10-batches-bin/`; an
//!    absolute path, `..` or a link is an error) into a temporary folder, every size is checked,
//!    and the folder is renamed to `DIR/cifar-10-batches-bin/` in one step. On any error the
//!    temporary folder is removed and data already there stays untouched.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::cifar::{
    self, BATCHES_DIR, META_FILE, RECORDS_PER_FILE, RECORD_LEN, TEST_FILE, TRAIN_FILES,
};
use crate::error::IoContext;
use crate::{Error, Result};

/// The official archive.
pub const OFFICIAL_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// Its sha256.
pub const OFFICIAL_SHA256: &str =
    "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd";
/// Its size in bytes.
pub const OFFICIAL_SIZE: u64 = 170_052_171;
/// Environment variable that may stand in for `source`.
pub const SOURCE_ENV: &str = "SELFSUP_CIFAR10_SOURCE";
/// Name of the partial download inside the data dir.
pub const PART_FILE: &str = ".cifar-10-binary.tar.gz.part";

/// What to fetch and where.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// URL (`http://`, `https://`, `file://`) or local path; `None`: `$SELFSUP_CIFAR10_SOURCE`,
    /// else the official URL.
    pub source: Option<String>,
    /// Expected sha256 (hex). Defaults to the official digest for the official URL.
    pub sha256: Option<String>,
    /// Data directory (the dataset lands in `data_dir/cifar-10-batches-bin`).
    pub data_dir: PathBuf,
    /// Show a progress bar on a terminal.
    pub progress: bool,
    /// Download attempts in this run (each resumes from the part file).
    pub attempts: u32,
}

impl FetchOptions {
    /// Defaults for a data dir: source from the environment or the official URL, 3 attempts.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            source: None,
            sha256: None,
            data_dir: data_dir.into(),
            progress: true,
            attempts: 3,
        }
    }
}

/// What [`fetch_cifar10`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// The data was already there and complete.
    AlreadyPresent(PathBuf),
    /// The data was downloaded (or read) and extracted.
    Extracted(PathBuf),
}

impl Fetched {
    /// The batches folder.
    pub fn path(&self) -> &Path {
        match self {
            Fetched::AlreadyPresent(p) | Fetched::Extracted(p) => p,
        }
    }
}

fn dl(msg: impl Into<String>) -> Error {
    Error::Download(msg.into())
}

/// Make sure CIFAR-10 is in `opts.data_dir`, downloading and extracting it if needed.
pub fn fetch_cifar10(opts: &FetchOptions) -> Result<Fetched> {
    let dir = &opts.data_dir;
    let dest = dir.join(BATCHES_DIR);
    if cifar::is_complete(&dest) {
        return Ok(Fetched::AlreadyPresent(dest));
    }
    std::fs::create_dir_all(dir).at(dir)?;
    let source = opts
        .source
        .clone()
        .or_else(|| std::env::var(SOURCE_ENV).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| OFFICIAL_URL.to_string());
    let expected = match (&opts.sha256, source == OFFICIAL_URL) {
        (Some(h), _) => Some(h.trim().to_ascii_lowercase()),
        (None, true) => Some(OFFICIAL_SHA256.to_string()),
        (None, false) => {
            tracing::warn!("no --sha256 given for {source}: the archive is not verified");
            None
        }
    };
    if let Some(h) = &expected {
        if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(dl(format!("--sha256 {h:?} is not 64 hex digits")));
        }
    }
    let is_url = source.starts_with("http://") || source.starts_with("https://");
    let archive = if is_url {
        let part = dir.join(PART_FILE);
        download(&source, &part, opts)?;
        part
    } else {
        let p = PathBuf::from(source.strip_prefix("file://").unwrap_or(&source));
        if !p.is_file() {
            return Err(dl(format!("{}: source archive not found", p.display())));
        }
        p
    };
    if let Some(h) = &expected {
        let got = sha256_file(&archive, opts.progress)?;
        if &got != h {
            if is_url {
                let _ = std::fs::remove_file(&archive);
            }
            return Err(dl(format!(
                "{source}: sha256 mismatch: expected {h}, got {got}{}",
                if is_url {
                    " (the download was removed; run again to fetch it afresh)"
                } else {
                    ""
                }
            )));
        }
    }
    extract(&archive, dir)?;
    if is_url {
        let _ = std::fs::remove_file(&archive);
    }
    Ok(Fetched::Extracted(dest))
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path, progress: bool) -> Result<String> {
    let mut f = File::open(path).at(path)?;
    let len = f.metadata().at(path)?.len();
    let pb = bar(len, "verify", progress);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    Ok(hex::encode(h.finalize()))
}

fn bar(len: u64, what: &str, progress: bool) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

fn download(url: &str, part: &Path, opts: &FetchOptions) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_body(Some(Duration::from_secs(60)))
        .build()
        .into();
    let attempts = opts.attempts.max(1);
    let mut last = None;
    for attempt in 1..=attempts {
        match download_once(&agent, url, part, opts.progress) {
            Ok(()) => return Ok(()),
            Err(e @ Error::Io { .. }) => return Err(e),
            Err(e) => {
                if attempt < attempts {
                    tracing::warn!("{e}; retrying ({attempt}/{attempts})");
                    std::thread::sleep(Duration::from_millis(200 * attempt as u64));
                }
                last = Some(e);
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

fn download_once(agent: &ureq::Agent, url: &str, part: &Path, progress: bool) -> Result<()> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut req = agent.get(url);
    if have > 0 {
        req = req.header("Range", &format!("bytes={have}-"));
    }
    let mut resp = req
        .call()
        .map_err(|e| dl(format!("{url}: request failed: {e}")))?;
    let status = resp.status().as_u16();
    let content_len: Option<u64> = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let (mut file, start) = match status {
        206 if have > 0 => {
            let f = std::fs::OpenOptions::new()
                .append(true)
                .open(part)
                .at(part)?;
            (f, have)
        }
        200 | 206 => (File::create(part).at(part)?, 0),
        416 if have > 0 => {
            // The part file already holds the whole body; the digest check decides.
            return Ok(());
        }
        s => return Err(dl(format!("{url}: HTTP status {s}"))),
    };
    let total = content_len.map(|n| n + start);
    let pb = bar(total.unwrap_or(0), "download", progress);
    pb.set_position(start);
    let mut reader = resp.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = start;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                file.flush().at(part)?;
                pb.abandon();
                return Err(dl(format!(
                    "{url}: connection lost after {got}{} bytes ({e}); the part file {} is kept and the next run resumes from it",
                    total.map(|t| format!(" of {t}")).unwrap_or_default(),
                    part.display()
                )));
            }
        };
        file.write_all(&buf[..n]).at(part)?;
        got += n as u64;
        pb.set_position(got);
    }
    file.sync_all().at(part)?;
    pb.finish_and_clear();
    if let Some(t) = total {
        if got < t {
            return Err(dl(format!(
                "{url}: transfer ended after {got} of {t} bytes; the next run resumes from {}",
                part.display()
            )));
        }
    }
    Ok(())
}

/// Removes a folder on drop unless disarmed.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

fn expected_members() -> Vec<(&'static str, Option<u64>)> {
    let batch = (RECORD_LEN * RECORDS_PER_FILE) as u64;
    let mut v: Vec<(&str, Option<u64>)> = TRAIN_FILES.iter().map(|f| (*f, Some(batch))).collect();
    v.push((TEST_FILE, Some(batch)));
    v.push((META_FILE, None));
    v
}

fn corrupt(archive: &Path, e: impl std::fmt::Display) -> Error {
    Error::BadFile {
        path: archive.to_path_buf(),
        msg: format!("corrupt or truncated archive: {e}"),
    }
}

/// Extract the CIFAR-10 members of `archive` into `data_dir/cifar-10-batches-bin`, atomically.
pub fn extract(archive: &Path, data_dir: &Path) -> Result<PathBuf> {
    let dest = data_dir.join(BATCHES_DIR);
    let tmp = data_dir.join(format!(".{BATCHES_DIR}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).at(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).at(&tmp)?;
    let guard = TempDir(Some(tmp.clone()));
    let expected = expected_members();
    let optional = ["readme.html"];
    let f = File::open(archive).at(archive)?;
    let gz = flate2::read::GzDecoder::new(BufReader::new(f));
    let mut ar = tar::Archive::new(gz);
    let mut buf = vec![0u8; 1 << 16];
    for entry in ar.entries().map_err(|e| corrupt(archive, e))? {
        let mut entry = entry.map_err(|e| corrupt(archive, e))?;
        let path = entry.path().map_err(|e| corrupt(archive, e))?.into_owned();
        let unsafe_path = path.is_absolute()
            || path
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
        if unsafe_path {
            return Err(Error::BadFile {
                path: archive.to_path_buf(),
                msg: format!(
                    "member {:?} has an unsafe path (absolute or '..'); nothing extracted",
                    path
                ),
            });
        }
        let et = entry.header().entry_type();
        if et.is_dir() {
            continue;
        }
        if !(et.is_file() || et == tar::EntryType::Continuous) {
            return Err(Error::BadFile {
                path: archive.to_path_buf(),
                msg: format!(
                    "member {:?} is a link or special file; nothing extracted",
                    path
                ),
            });
        }
        let comps: Vec<_> = path
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect();
        let name = match comps.as_slice() {
            [Component::Normal(d), Component::Normal(n)] if *d == BATCHES_DIR => {
                n.to_string_lossy().into_owned()
            }
            _ => {
                tracing::debug!("skipping unexpected member {:?}", path);
                continue;
            }
        };
        if !expected.iter().any(|(m, _)| *m == name) && !optional.contains(&name.as_str()) {
            tracing::debug!("skipping unexpected member {:?}", path);
            continue;
        }
        let out_path = tmp.join(&name);
        let mut out = File::create(&out_path).at(&out_path)?;
        loop {
            let n = entry.read(&mut buf).map_err(|e| corrupt(archive, e))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).at(&out_path)?;
        }
        out.sync_all().at(&out_path)?;
    }
    // Read to the end so that a damaged gzip trailer (CRC, length) is noticed too.
    let mut rest = ar.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(|e| corrupt(archive, e))?;
    for (name, size) in expected {
        let p = tmp.join(name);
        let len = match std::fs::metadata(&p) {
            Ok(m) => m.len(),
            Err(_) => {
                return Err(Error::BadFile {
                    path: archive.to_path_buf(),
                    msg: format!("member {BATCHES_DIR}/{name} is missing"),
                })
            }
        };
        if let Some(s) = size {
            if len != s {
                return Err(Error::BadFile {
                    path: archive.to_path_buf(),
                    msg: format!("member {BATCHES_DIR}/{name} has {len} bytes, expected {s}"),
                });
            }
        }
    }
    // Swap in: old data (if any, incomplete) is moved aside first and removed only after.
    let old = data_dir.join(format!(".{BATCHES_DIR}.old-{}", std::process::id()));
    let had_old = dest.exists();
    if had_old {
        std::fs::rename(&dest, &old).at(&dest)?;
    }
    if let Err(e) = std::fs::rename(&tmp, &dest) {
        if had_old {
            let _ = std::fs::rename(&old, &dest);
        }
        return Err(e).at(&dest);
    }
    let mut guard = guard;
    guard.0 = None;
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(dest)
}

//! The downloader against a local HTTP server that serves an archive built here in the official
//! layout: success, resume after a dropped connection, wrong digest, corrupt gzip, `../` member.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use selfsup_data::download::{fetch_cifar10, FetchOptions, Fetched, PART_FILE};
use selfsup_data::{cifar, Dataset};
use sha2::Digest;

/// Build a gzip'd tar in the official layout (full-size batch files, so every size check is real;
/// mostly zeros, so it compresses to a few hundred kB). `extra` adds raw (path, bytes) members.
fn make_archive(extra: &[(&str, &[u8])]) -> Vec<u8> {
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(enc);
    let batch_len = cifar::RECORD_LEN * cifar::RECORDS_PER_FILE;
    let add = |tar: &mut tar::Builder<_>, name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data).unwrap();
    };
    for (i, f) in cifar::TRAIN_FILES
        .iter()
        .chain([cifar::TEST_FILE].iter())
        .enumerate()
    {
        let mut data = vec![0u8; batch_len];
        for r in 0..cifar::RECORDS_PER_FILE {
            data[r * cifar::RECORD_LEN] = ((r + i) % 10) as u8;
            data[r * cifar::RECORD_LEN + 1] = (r % 256) as u8;
        }
        add(&mut tar, &format!("cifar-10-batches-bin/{f}"), &data);
    }
    add(
        &mut tar,
        "cifar-10-batches-bin/batches.meta.txt",
        (cifar::CLASSES.join("\n") + "\n").as_bytes(),
    );
    add(
        &mut tar,
        "cifar-10-batches-bin/readme.html",
        b"<html></html>",
    );
    for (name, data) in extra {
        // Write the raw name into the header so that `..` survives (the builder refuses it).
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        let bytes = h.as_old_mut().name.as_mut();
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        tar.append(&h, *data).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

fn sha(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

#[derive(Default)]
struct Log {
    ranges: Vec<Option<String>>,
}

/// Serve `body` on 127.0.0.1 for at most `max_requests` requests. When `drop_first` is set, the
/// first response promises the whole body but closes the connection after a third of it.
/// Range requests get a 206 with the rest.
fn serve(body: Vec<u8>, drop_first: bool, max_requests: usize) -> (String, Arc<Mutex<Log>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/cifar-10-binary.tar.gz", l.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Log::default()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for (n, conn) in l.incoming().take(max_requests).enumerate() {
            let mut s = conn.unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut range = None;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = Some(v.trim().trim_end_matches('-').to_string());
                }
            }
            log2.lock().unwrap().ranges.push(range.clone());
            let start: usize = range.as_deref().map(|v| v.parse().unwrap()).unwrap_or(0);
            let part = &body[start..];
            let head = if start > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\nConnection: close\r\n\r\n",
                    part.len(), start, body.len() - 1, body.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    part.len()
                )
            };
            s.write_all(head.as_bytes()).unwrap();
            if drop_first && n == 0 {
                let _ = s.write_all(&part[..part.len() / 3]);
                let _ = s.flush();
                drop(s);
                continue;
            }
            let _ = s.write_all(part);
        }
    });
    (url, log)
}

fn opts(dir: &Path, url: &str, sha: &str, attempts: u32) -> FetchOptions {
    FetchOptions {
        source: Some(url.to_string()),
        sha256: Some(sha.to_string()),
        data_dir: dir.to_path_buf(),
        progress: false,
        attempts,
    }
}

#[test]
fn downloads_verifies_extracts_then_finds_it_again() {
    let archive = make_archive(&[]);
    let (url, log) = serve(archive.clone(), false, 1);
    let d = tempfile::tempdir().unwrap();
    let got = fetch_cifar10(&opts(d.path(), &url, &sha(&archive), 1)).unwrap();
    assert!(matches!(got, Fetched::Extracted(_)));
    assert!(cifar::is_complete(d.path()));
    let train = cifar::load(d.path(), cifar::Split::Train).unwrap();
    assert_eq!(train.len(), 50_000);
    assert!(!d.path().join(PART_FILE).exists());
    assert_eq!(log.lock().unwrap().ranges, vec![None]);
    // Second run: the server is gone (it served one request), the data is found.
    let t = std::time::Instant::now();
    let again = fetch_cifar10(&opts(d.path(), &url, &sha(&archive), 1)).unwrap();
    assert!(matches!(again, Fetched::AlreadyPresent(_)));
    assert!(t.elapsed().as_secs_f64() < 1.0);
}

#[test]
fn resumes_after_the_server_drops_the_connection() {
    let archive = make_archive(&[]);
    // One attempt per run: the first run fails and keeps the part file; the next one resumes.
    let (url, log) = serve(archive.clone(), true, 2);
    let d = tempfile::tempdir().unwrap();
    let e = fetch_cifar10(&opts(d.path(), &url, &sha(&archive), 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("resume") && e.contains(&url), "{e}");
    let part_len = std::fs::metadata(d.path().join(PART_FILE)).unwrap().len();
    assert_eq!(part_len, (archive.len() / 3) as u64);
    assert!(!d.path().join(cifar::BATCHES_DIR).exists());
    fetch_cifar10(&opts(d.path(), &url, &sha(&archive), 1)).unwrap();
    assert!(cifar::is_complete(d.path()));
    assert_eq!(
        log.lock().unwrap().ranges,
        vec![None, Some(part_len.to_string())]
    );
    // Within one run, retries resume too.
    let (url, log) = serve(archive.clone(), true, 2);
    let d = tempfile::tempdir().unwrap();
    fetch_cifar10(&opts(d.path(), &url, &sha(&archive), 3)).unwrap();
    assert_eq!(log.lock().unwrap().ranges.len(), 2);
}

#[test]
fn wrong_digest_extracts_nothing_and_keeps_old_data() {
    let archive = make_archive(&[]);
    let (url, _) = serve(archive.clone(), false, 1);
    let d = tempfile::tempdir().unwrap();
    // Incomplete data already there must stay untouched.
    let old = d.path().join(cifar::BATCHES_DIR);
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("mine.txt"), b"keep").unwrap();
    let bad = "0".repeat(64);
    let e = fetch_cifar10(&opts(d.path(), &url, &bad, 1))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sha256 mismatch") && e.contains(&sha(&archive)),
        "{e}"
    );
    assert_eq!(std::fs::read(old.join("mine.txt")).unwrap(), b"keep");
    assert!(
        !d.path().join(PART_FILE).exists(),
        "a bad download is removed"
    );
    let e = fetch_cifar10(&opts(d.path(), &url, "xyz", 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("64 hex"), "{e}");
}

#[test]
fn corrupt_gzip_is_reported_and_leaves_no_dataset() {
    let mut archive = make_archive(&[]);
    let mid = archive.len() / 2;
    for b in &mut archive[mid..mid + 64] {
        *b ^= 0x5a;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.tar.gz");
    std::fs::write(&src, &archive).unwrap();
    let data = d.path().join("data");
    let o = opts(&data, src.to_str().unwrap(), &sha(&archive), 1);
    let e = fetch_cifar10(&o).unwrap_err().to_string();
    assert!(e.contains("corrupt") && e.contains("src.tar.gz"), "{e}");
    assert!(!data.join(cifar::BATCHES_DIR).exists());
    let leftovers: Vec<_> = std::fs::read_dir(&data).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "temporary folders must be removed: {leftovers:?}"
    );
    // Truncated archive too.
    std::fs::write(&src, &make_archive(&[])[..1000]).unwrap();
    let mut o = o;
    o.sha256 = None;
    let e = fetch_cifar10(&o).unwrap_err().to_string();
    assert!(
        e.contains("corrupt or truncated") || e.contains("missing"),
        "{e}"
    );
}

#[test]
fn member_with_dotdot_is_refused() {
    let archive = make_archive(&[("cifar-10-batches-bin/../../evil.txt", b"x")]);
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("a.tar.gz");
    std::fs::write(&src, &archive).unwrap();
    let data = d.path().join("data");
    let e = fetch_cifar10(&opts(&data, src.to_str().unwrap(), &sha(&archive), 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unsafe path"), "{e}");
    assert!(!d.path().join("evil.txt").exists() && !data.join(cifar::BATCHES_DIR).exists());
}

#[test]
fn http_error_is_one_clear_line() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/missing", l.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut s = l.incoming().next().unwrap().unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let _ = s
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    });
    let d = tempfile::tempdir().unwrap();
    let e = fetch_cifar10(&opts(d.path(), &url, &"a".repeat(64), 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("404") && !e.contains('\n'), "{e}");
}

/// The real archive in ../shared/data goes through the same path (when present).
#[test]
fn real_archive_when_present() {
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/cifar-10-binary.tar.gz");
    if !src.exists() || std::env::var("SELFSUP_SLOW_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set SELFSUP_SLOW_TESTS=1 with ../shared/data present");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let o = opts(
        d.path(),
        src.to_str().unwrap(),
        "d4dc23f80740e20016b098788386b87dcc23314f623a35924ea94024c817b230",
        1,
    );
    fetch_cifar10(&o).unwrap();
    let test = cifar::load(d.path(), cifar::Split::Test).unwrap();
    assert_eq!(test.len(), 10_000);
    let mut counts = [0usize; 10];
    for l in test.labels.as_ref().unwrap() {
        counts[*l as usize] += 1;
    }
    assert_eq!(counts, [1000; 10]);
}

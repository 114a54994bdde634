//! Fetch over https: cohort's in-process fetch (gix over reqwest/rustls, as the sync step
//! runs it) against `git fetch`, of the 3,072-file benchmark repository into an empty
//! repository, from nginx + `git http-backend` with TLS and basic auth on loopback. Not a
//! timed test: it prints figures for the README.
//!
//!   cargo bench --bench fetch -- [--runs 5] [--files 3072]
//!
//! Both sides alternate in one process run on the same server, so the ratio holds on a
//! noisy machine.

use std::path::Path;
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;
// The test support's git servers (its directory, so `remotes/*.rs` resolve too).
#[path = "../tests/support"]
#[allow(dead_code)]
mod support {
    pub mod remotes;
}
use support::remotes;

use common::{arg, generate_repo, git};

const PASSWORD: &str = "bench-password";

/// An empty repository whose origin is the server, with the CA and the credential in its
/// config, as a user would have them.
fn empty_clone(dir: &Path, url: &str, ca: &Path, creds: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["remote", "add", "origin", url]);
    git(dir, &["config", "http.sslCAInfo", ca.to_str().unwrap()]);
    git(
        dir,
        &[
            "config",
            "credential.helper",
            &format!("store --file={}", creds.display()),
        ],
    );
}

fn git_fetch(dir: &Path) -> Duration {
    let t0 = Instant::now();
    let out = std::process::Command::new("git")
        .args(["fetch", "-q", "origin"])
        .current_dir(dir)
        .env_remove("GIT_SSL_CAINFO")
        .output()
        .unwrap();
    let t = t0.elapsed();
    assert!(
        out.status.success(),
        "git fetch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t
}

fn cohort_fetch(dir: &Path) -> Duration {
    let t0 = Instant::now();
    let repo = gix::open(dir).unwrap();
    let remote = repo.find_remote("origin").unwrap();
    cohort::git::sync::fetch(&remote, &cohort::git::remote::Access::default()).unwrap();
    let t = t0.elapsed();
    assert!(
        repo.find_reference("refs/remotes/origin/main").is_ok(),
        "cohort's fetch brought origin/main"
    );
    t
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes; nothing to list.
    }
    let runs: usize = arg("--runs", "5").parse().unwrap();
    let files: usize = arg("--files", "3072").parse().unwrap();
    // The machine's CA bundle variable would override http.sslCAInfo for both sides.
    std::env::remove_var("GIT_SSL_CAINFO");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    generate_repo(&src, files);
    let root = tmp.path().join("served");
    std::fs::create_dir_all(&root).unwrap();
    git(
        tmp.path(),
        &[
            "clone",
            "-q",
            "--bare",
            src.to_str().unwrap(),
            root.join("bench.git").to_str().unwrap(),
        ],
    );
    // Packed, as a hosted repository is: the server's side is then sending, not packing.
    git(&root.join("bench.git"), &["repack", "-a", "-d", "-q"]);
    let server = remotes::HttpsOrigin::start(&root, PASSWORD);
    let creds = tmp.path().join("git-credentials");
    std::fs::write(
        &creds,
        format!("https://{}:{PASSWORD}@127.0.0.1:{}\n", server.user(), server.port),
    )
    .unwrap();
    let url = server.url("bench");
    let size = git(&root.join("bench.git"), &["count-objects", "-vH"]);
    eprintln!(
        "fetching {files} files over https from {url} ({})",
        size.replace('\n', ", ")
    );

    // One unmeasured fetch each: the server's page cache and TLS session set-up are warm
    // for both sides alike.
    let warm = tmp.path().join("warm");
    empty_clone(&warm.join("git"), &url, &server.ca_pem, &creds);
    empty_clone(&warm.join("cohort"), &url, &server.ca_pem, &creds);
    git_fetch(&warm.join("git"));
    cohort_fetch(&warm.join("cohort"));

    let (mut g, mut c, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let (gd, cd) = (
            tmp.path().join(format!("git-{i}")),
            tmp.path().join(format!("cohort-{i}")),
        );
        empty_clone(&gd, &url, &server.ca_pem, &creds);
        empty_clone(&cd, &url, &server.ca_pem, &creds);
        // Alternate who goes first, so neither always gets the warmer server.
        let (gt, ct) = if i % 2 == 0 {
            let gt = git_fetch(&gd);
            (gt, cohort_fetch(&cd))
        } else {
            let ct = cohort_fetch(&cd);
            (git_fetch(&gd), ct)
        };
        println!(
            "run {i}: git fetch {:>7.1} ms   cohort {:>7.1} ms   ratio {:.2}x",
            gt.as_secs_f64() * 1e3,
            ct.as_secs_f64() * 1e3,
            ct.as_secs_f64() / gt.as_secs_f64()
        );
        ratios.push(ct.as_secs_f64() / gt.as_secs_f64());
        g.push(gt.as_secs_f64());
        c.push(ct.as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (gm, cm, rm) = (median(&mut g), median(&mut c), median(&mut ratios));
    println!(
        "median of {runs}: git fetch {:.1} ms, cohort {:.1} ms; median ratio cohort/git = {rm:.2}x (target <= 1.2x)",
        gm * 1e3,
        cm * 1e3,
    );
}

//! The verify gate on a real project: the `semver` crate as published (pinned below, with its
//! own test suite and the `Cargo.lock` it ships), `cargo test --quiet` as the verify command,
//! `[verify] caches = ["target"]` on the host runtime. Not a timed test: it prints figures
//! for the README.
//!
//!   cargo bench --bench verify -- [--runs 3]
//!
//! a. A one-task run's verify time (from the state DB, kind `task`) with an empty cache (the
//!    repository's `.git/cohort/caches` removed) against the next run's, with the cache the
//!    first one left. Each task is a command agent appending a small test to a test file.
//! b. A 10-task run (`-j 2`, merge train on, caches on; each task appends a small test to its
//!    own file) against the same 10 edits by hand: one after another in one checkout with a
//!    warm `target`, `cargo test --quiet` after each. The first cohort run also warms the
//!    cache slots `-j 2` adds; it is shown, and the measured runs come after it.
//!
//! The set-up is the only step that reaches the registry (`cargo fetch`, through cargo);
//! every build after it runs with `CARGO_NET_OFFLINE=true`. Both sides of each comparison run
//! in one process run, alternating, so the ratio holds on a noisy machine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
#[allow(dead_code)] // its generated repository is for the other benches
mod common;
use common::{arg, git};

/// The project: a real crate with its own tests, pinned.
const CRATE: &str = "semver";
const VERSION: &str = "1.0.28";
const VERIFY: [&str; 3] = ["cargo", "test", "--quiet"];

/// The files the ten tasks of part b edit, one each, so no two tasks conflict: its four test
/// files (their own binaries) and six of its library's modules (which rebuild every test).
const FILES: [&str; 10] = [
    "tests/test_version.rs",
    "tests/test_version_req.rs",
    "tests/test_identifier.rs",
    "tests/test_autotrait.rs",
    "src/display.rs",
    "src/error.rs",
    "src/eval.rs",
    "src/identifier.rs",
    "src/impls.rs",
    "src/parse.rs",
];

/// The agent: `add test NAME to FILE` appends a test module named after NAME to FILE. The
/// same script makes the edits by hand.
const AGENT: &str = r#"#!/bin/sh
set -eu
set -- $COHORT_TASK
name=$3
file=$5
case "$file" in
    tests/*) path=semver ;;
    *) path=crate ;;
esac
printf '\n#[cfg(test)]\nmod cohort_%s {\n    #[test]\n    fn holds() {\n        assert_eq!(%s::Version::new(1, 2, 3).minor, 2);\n    }\n}\n' "$name" "$path" >> "$file"
"#;

/// A command for the project's cargo: none of the variables `cargo bench` set for this
/// process (its target directory above all), and offline.
fn cargo_env(mut cmd: Command, offline: bool) -> Command {
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("CARGO_") && k != "CARGO_HOME" {
                cmd.env_remove(k);
            }
        }
    }
    if offline {
        cmd.env("CARGO_NET_OFFLINE", "true");
    }
    cmd
}

fn run_ok(mut cmd: Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The crate's published source, through cargo: a throwaway package depending on it is
/// fetched, and cargo's metadata names where the registry unpacked it.
fn fetch_crate(tmp: &Path) -> PathBuf {
    let fetcher = tmp.join("fetcher");
    std::fs::create_dir_all(fetcher.join("src")).unwrap();
    std::fs::write(
        fetcher.join("Cargo.toml"),
        format!(
            "[package]\nname = \"fetcher\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n\
             [dependencies]\n{CRATE} = \"={VERSION}\"\n\n[workspace]\n"
        ),
    )
    .unwrap();
    std::fs::write(fetcher.join("src/lib.rs"), "").unwrap();
    let mut fetch = cargo_env(Command::new("cargo"), false);
    fetch.arg("fetch").current_dir(&fetcher);
    run_ok(fetch, "cargo fetch");
    let mut meta = cargo_env(Command::new("cargo"), true);
    meta.args(["metadata", "--format-version", "1"]).current_dir(&fetcher);
    let meta: serde_json::Value = serde_json::from_str(&run_ok(meta, "cargo metadata")).unwrap();
    let pkg = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == CRATE && p["version"] == VERSION)
        .expect("the crate is in the metadata");
    PathBuf::from(pkg["manifest_path"].as_str().unwrap())
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The project as a git repository of its own: the crate's source, `target/` ignored, its
/// dependencies (the dev-dependencies its tests build) fetched for offline builds.
fn make_project(source: &Path, dir: &Path) {
    let mut cp = Command::new("cp");
    cp.arg("-R").arg(source).arg(dir);
    run_ok(cp, "cp");
    std::fs::write(dir.join(".gitignore"), "target/\n").unwrap();
    let mut fetch = cargo_env(Command::new("cargo"), false);
    fetch.args(["fetch", "--locked"]).current_dir(dir);
    run_ok(fetch, "cargo fetch in the project");
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", &format!("{CRATE} {VERSION} as published")]);
}

struct Bench {
    tmp: PathBuf,
    repo: PathBuf,
    config: PathBuf,
    agent: PathBuf,
    runs: usize,
}

/// What one cohort run took: its wall time and its verify runs as recorded.
struct RunResult {
    wall: Duration,
    verifies: Vec<(String, u64)>,
}

impl RunResult {
    fn ms(&self, kind: &str) -> Vec<u64> {
        self.verifies
            .iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, ms)| *ms)
            .collect()
    }
}

fn task(name: &str, file: &str) -> String {
    format!("add test {name} to {file}")
}

impl Bench {
    fn last_verify_id(&self) -> i64 {
        let db = self.repo.join(".git/cohort/state.db");
        if !db.exists() {
            return 0;
        }
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.query_row("SELECT COALESCE(MAX(id), 0) FROM verifies", [], |r| r.get(0))
            .unwrap_or(0)
    }

    fn cohort_run(&self, tasks: &[String], jobs: usize, label: &str) -> RunResult {
        let list = self.tmp.join(format!("tasks-{label}.txt"));
        std::fs::write(&list, tasks.iter().map(|t| format!("{t}\n")).collect::<String>()).unwrap();
        let prompt = self.tmp.join("prompt.txt");
        std::fs::write(&prompt, "{task}\n").unwrap();
        let before = self.last_verify_id();
        let merges_before = self.service_merges();
        let mut cmd = cargo_env(Command::new(env!("CARGO_BIN_EXE_cohort")), true);
        cmd.current_dir(&self.repo)
            .arg("--config")
            .arg(&self.config)
            .args(["run", "--tasks"])
            .arg(&list)
            .arg("--prompt")
            .arg(&prompt)
            .args(["--no-sync", "-j", &jobs.to_string(), "--runtime", "host"])
            .args(["--agent", "command", "--agent-command"])
            .arg(format!("sh {}", self.agent.display()));
        let t0 = Instant::now();
        let out = cmd.output().unwrap();
        let wall = t0.elapsed();
        assert!(
            out.status.success(),
            "cohort run {label} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            self.service_merges(),
            merges_before + tasks.len(),
            "every task of {label} merged into cohort/service"
        );
        let conn = rusqlite::Connection::open(self.repo.join(".git/cohort/state.db")).unwrap();
        let mut stmt = conn
            .prepare("SELECT kind, duration_ms, passed FROM verifies WHERE id > ?1 ORDER BY id")
            .unwrap();
        let verifies = stmt
            .query_map([before], |r| {
                let passed: bool = r.get(2)?;
                assert!(passed, "a verify run of {label} failed");
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        RunResult { wall, verifies }
    }

    /// The merge commits on the service branch (none before the first run).
    fn service_merges(&self) -> usize {
        let out = Command::new("git")
            .args(["rev-list", "--count", "--merges", "cohort/service", "--"])
            .current_dir(&self.repo)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }

    /// Part a's one-task run: the task's verify time.
    fn one_task(&self, name: &str) -> u64 {
        let r = self.cohort_run(&[task(name, FILES[0])], 1, name);
        let ms = r.ms("task");
        assert_eq!(ms.len(), 1, "one task verify in {name}");
        ms[0]
    }

    /// The same edits by hand in one checkout: edit, commit, verify, one after another.
    fn by_hand(&self, checkout: &Path, tasks: &[String]) -> Duration {
        let t0 = Instant::now();
        for t in tasks {
            let mut edit = Command::new("sh");
            edit.arg(&self.agent).env("COHORT_TASK", t).current_dir(checkout);
            run_ok(edit, "the edit");
            git(checkout, &["commit", "-q", "-a", "-m", t]);
            run_ok(verify_in(checkout), "cargo test by hand");
        }
        t0.elapsed()
    }
}

fn verify_in(dir: &Path) -> Command {
    let mut cmd = cargo_env(Command::new(VERIFY[0]), true);
    cmd.args(&VERIFY[1..]).current_dir(dir);
    cmd
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1e3
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes; nothing to list.
    }
    let runs: usize = arg("--runs", "3").parse().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let source = fetch_crate(tmp.path());
    let repo = tmp.path().join("project");
    make_project(&source, &repo);
    let config = tmp.path().join("cohort.toml");
    std::fs::write(
        &config,
        format!("[verify]\ncommand = {VERIFY:?}\ncaches = [\"target\"]\nmerged = true\n\n[run]\nsync = false\n"),
    )
    .unwrap();
    let agent = tmp.path().join("agent.sh");
    std::fs::write(&agent, AGENT).unwrap();
    let b = Bench {
        tmp: tmp.path().to_path_buf(),
        repo,
        config,
        agent,
        runs,
    };
    eprintln!(
        "set-up: {CRATE} {VERSION} from {} in {:.1}s; verify command `{}`, offline",
        source.display(),
        t0.elapsed().as_secs_f64(),
        VERIFY.join(" ")
    );

    // a. Cold against warm cache, one task each.
    let (mut colds, mut warms, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..b.runs {
        let _ = std::fs::remove_dir_all(b.repo.join(".git/cohort/caches"));
        let cold = b.one_task(&format!("a{i}_cold"));
        let warm = b.one_task(&format!("a{i}_warm"));
        let ratio = warm as f64 / cold as f64;
        println!(
            "a run {i}: task verify cold {:>6.1}s   warm {:>5.1}s   warm/cold {ratio:.3}",
            secs(cold),
            secs(warm)
        );
        colds.push(secs(cold));
        warms.push(secs(warm));
        ratios.push(ratio);
    }
    println!(
        "a median of {}: task verify cold {:.1}s, warm {:.1}s; median ratio warm/cold = {:.3} (target <= 0.3)",
        b.runs,
        median(&colds),
        median(&warms),
        median(&ratios)
    );

    // b. Ten tasks with the merge train against the same edits by hand.
    let hand = b.tmp.join("by-hand");
    git(
        &b.tmp,
        &["clone", "-q", b.repo.to_str().unwrap(), hand.to_str().unwrap()],
    );
    // A copy of the warm cache part a left in slot 0 (its dependencies built), then one
    // cargo test there: the checkout's own target is warm, as a developer's is.
    let slot0 = b.repo.join(".git/cohort/caches/0");
    if let Some(cache) = std::fs::read_dir(&slot0)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
    {
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(&cache).arg(hand.join("target"));
        run_ok(cp, "cp of the warm cache");
    }
    let warmup = Instant::now();
    run_ok(verify_in(&hand), "cargo test to warm the by-hand checkout");
    eprintln!(
        "by hand: the checkout's target warmed by one cargo test ({:.1}s, not counted)",
        warmup.elapsed().as_secs_f64()
    );
    let tasks = |round: usize| -> Vec<String> {
        FILES
            .iter()
            .enumerate()
            .map(|(n, f)| task(&format!("b{round}_t{n:02}"), f))
            .collect()
    };
    let first = b.cohort_run(&tasks(0), 2, "b0");
    println!(
        "b first run (warms the cache slots -j 2 adds): cohort {:.1}s; {} task verifies ({:.1}s), {} merge verifies ({:.1}s)",
        first.wall.as_secs_f64(),
        first.ms("task").len(),
        secs(first.ms("task").iter().sum()),
        first.ms("merge").len(),
        secs(first.ms("merge").iter().sum()),
    );
    // The by-hand checkout catches up with the edits of that first run, unmeasured.
    b.by_hand(&hand, &tasks(0));
    let (mut cohorts, mut hands, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=b.runs {
        let ts = tasks(i);
        // Alternate who goes first.
        let (c, h) = if i % 2 == 1 {
            let c = b.cohort_run(&ts, 2, &format!("b{i}"));
            (c, b.by_hand(&hand, &ts))
        } else {
            let h = b.by_hand(&hand, &ts);
            (b.cohort_run(&ts, 2, &format!("b{i}")), h)
        };
        let ratio = c.wall.as_secs_f64() / h.as_secs_f64();
        println!(
            "b run {i}: 10 tasks cohort -j 2 {:>6.1}s ({} task verifies {:.1}s, {} merge verifies {:.1}s)   by hand {:>6.1}s   cohort/by hand {ratio:.2}",
            c.wall.as_secs_f64(),
            c.ms("task").len(),
            secs(c.ms("task").iter().sum()),
            c.ms("merge").len(),
            secs(c.ms("merge").iter().sum()),
            h.as_secs_f64()
        );
        cohorts.push(c.wall.as_secs_f64());
        hands.push(h.as_secs_f64());
        ratios.push(ratio);
    }
    println!(
        "b median of {}: 10 tasks with the merge train, cohort -j 2 {:.1}s, by hand {:.1}s; median ratio cohort/by hand = {:.2}",
        b.runs,
        median(&cohorts),
        median(&hands),
        median(&ratios)
    );
}

//! Warm checkouts and parallel efficiency, on the benchmark's generated 3,072-file
//! repository, the host runtime, and an agent that sleeps and writes one file. Not a timed
//! test: it prints figures for the README.
//!
//!   cargo bench --bench pool -- [--files 3072] [--jobs 16] [--sleep 2] [--rounds 3]
//!
//! a. Parallel efficiency at `-j JOBS` with JOBS tasks (one wave): the agent's time divided
//!    by the run's wall time, for a run whose pool is empty (cold) and for the run after it,
//!    which moves the checkouts it kept (`[run] keep_checkouts`).
//! b. The first agent's start, from the moment `cohort run` is started, cold against warm.
//!    Each agent prints a timestamp first; the bench reads it from the task logs.
//! c. Making a pool's third checkout whole: written from the object store (a pool without a
//!    seed) against copied from the pool's seed checkout, both as cohort's pool does it,
//!    index and private git dir included.
//!
//! Cold and warm runs alternate, ROUNDS times, in one process run, so the ratios hold on a
//! noisy machine; medians are printed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[path = "common/mod.rs"]
mod common;
use common::{arg, generate_repo};

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Bench {
    tmp: PathBuf,
    work: PathBuf,
    jobs: usize,
    sleep: f64,
    round: usize,
}

/// What one run showed: its wall time and when its first agent started, both in seconds
/// from the moment `cohort run` was spawned.
struct Run {
    wall: f64,
    first_start: f64,
}

impl Bench {
    fn cohort(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cohort"));
        c.current_dir(&self.work)
            .env("XDG_CONFIG_HOME", self.tmp.join("config"))
            .env("XDG_STATE_HOME", self.tmp.join("state"))
            .env("CONTAINER_HOST", "unix:///nonexistent/cohort-bench/podman.sock")
            .env_remove("COHORT_LOG");
        c
    }

    fn run(&mut self) -> Run {
        self.round += 1;
        let list = self.tmp.join("tasks.txt");
        let tasks: String = (1..=self.jobs)
            .map(|i| format!("round {} task {i}\n", self.round))
            .collect();
        std::fs::write(&list, tasks).unwrap();
        let prompt = self.tmp.join("prompt.txt");
        std::fs::write(&prompt, "{task}\n").unwrap();
        let agent = format!(
            "sh -c 'echo COHORT-BENCH-START $(date +%s.%N); sleep {}; echo \"$COHORT_TASK\" > bench-$COHORT_TASK_ID.txt'",
            self.sleep
        );
        let jobs = self.jobs.to_string();
        let spawned = now();
        let t = Instant::now();
        let out = self
            .cohort()
            .args([
                "run",
                "--tasks",
                list.to_str().unwrap(),
                "--prompt",
                prompt.to_str().unwrap(),
            ])
            .args(["--no-sync", "-j", &jobs, "--runtime", "host", "--agent", "command"])
            .args(["--agent-command", &agent])
            .output()
            .unwrap();
        let wall = t.elapsed().as_secs_f64();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let status = self.cohort().args(["status", "--json"]).output().unwrap();
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        let run_id = status["run"]["id"].as_str().unwrap().to_string();
        let logs = self.work.join(".git/cohort/runs").join(&run_id).join("logs");
        let mut starts = Vec::new();
        for e in std::fs::read_dir(&logs).unwrap() {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            for line in text.lines() {
                if let Some(ts) = line.split("COHORT-BENCH-START ").nth(1) {
                    starts.push(ts.trim().parse::<f64>().unwrap());
                }
            }
        }
        assert_eq!(starts.len(), self.jobs, "every agent started once");
        let first = starts.iter().cloned().fold(f64::MAX, f64::min);
        Run {
            wall,
            first_start: first - spawned,
        }
    }

    fn drop_checkouts(&self) {
        let out = self
            .cohort()
            .args(["gc", "--checkouts", "--keep-runs", "1000"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(!self.work.join(".git/cohort/pool/checkouts/0").exists());
    }
}

/// c: the third checkout of a pool of cohort's, made whole, written from the object store
/// (a pool without a seed) against copied from the seed (in a pool with one, the second
/// checkout builds it), pools alternating so that neither side always comes after the other;
/// medians in seconds.
fn write_against_copy(work: &Path, rounds: usize) -> (f64, f64) {
    use cohort::git::pool::Pool;
    let common = work.join(".git");
    let repo = gix::open(work).unwrap();
    let head = repo.head_id().unwrap().detach();
    let base = work.join(".git/cohort/bench-pool");
    let third = |seeded: bool, i: usize| {
        let _ = std::fs::remove_dir_all(&base);
        let pool = Pool::new(&common, &format!("bench{i}"), base.clone());
        let pool = std::sync::Arc::new(if seeded { pool.with_seed() } else { pool });
        let mut leases = Vec::new();
        let mut took = 0.0;
        for _ in 0..3 {
            let t = Instant::now();
            let lease = pool.lease().unwrap();
            lease.prepare("refs/heads/bench", head).unwrap();
            took = t.elapsed().as_secs_f64();
            leases.push(lease);
        }
        assert_eq!(base.join("checkouts/seed").is_dir(), seeded);
        drop(leases);
        pool.remove_all().unwrap();
        took
    };
    let (mut wrote, mut copied) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        if i % 2 == 0 {
            wrote.push(third(false, i));
            copied.push(third(true, i));
        } else {
            copied.push(third(true, i));
            wrote.push(third(false, i));
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    (median(wrote), median(copied))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let files: usize = arg("--files", "3072").parse().unwrap();
    let jobs: usize = arg("--jobs", "16").parse().unwrap();
    let sleep: f64 = arg("--sleep", "2").parse().unwrap();
    let rounds: usize = arg("--rounds", "3").parse().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    generate_repo(&work, files);
    let config = tmp.path().join("config/cohort");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("config.toml"), "[run]\nkeep_checkouts = true\n").unwrap();
    let mut b = Bench {
        tmp: tmp.path().to_path_buf(),
        work: work.clone(),
        jobs,
        sleep,
        round: 0,
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        b.drop_checkouts();
        cold.push(b.run());
        warm.push(b.run());
    }
    let show = |name: &str, runs: &[Run]| {
        let wall = median(runs.iter().map(|r| r.wall).collect());
        let first = median(runs.iter().map(|r| r.first_start).collect());
        println!(
            "{name}: -j {jobs}, {jobs} tasks of {sleep} s: wall {wall:.2} s, efficiency {:.2}, first agent after {first:.2} s",
            sleep / wall
        );
        (wall, first)
    };
    let (cw, cf) = show("cold pool ", &cold);
    let (ww, wf) = show("warm pool ", &warm);
    println!("warm/cold: wall {:.2}x, first agent start {:.2}x", ww / cw, wf / cf);
    let (wrote, copied) = write_against_copy(&work, rounds);
    println!(
        "one checkout of {files} files: written from the object store {:.0} ms, copied from the seed {:.0} ms ({:.2}x)",
        wrote * 1e3,
        copied * 1e3,
        copied / wrote
    );
}

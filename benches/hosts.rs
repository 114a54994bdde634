//! Workers on other hosts (issue #20): the same backlog on one podman host against three,
//! and what a warm worker is sent per task against what changed. Not a timed test: it
//! prints figures for the README.
//!
//!   cargo bench --bench hosts -- [--rounds 1] [--tasks 24] [--sleep 5] [--logs DIR]
//!
//! `--logs DIR` keeps each run's stderr, with cohort's debug log (phase timings), in DIR.
//!
//! The hosts are simulated ones (tests/support/netns.rs): each a network namespace with
//! its own podman service over TCP, all on this machine, so three hosts share its cores.
//! Each configuration gets one warm-up run that is not counted (it pulls the workers'
//! image onto each host); the counted runs alternate 1 host / 3 hosts in one process.
//! Needs root, podman + runc (`fixtures/podman-service.sh install`), iproute2, nsenter.

#[path = "../tests/support/podman.rs"]
mod podman_support;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use podman_support::PodmanService;
use support::netns::SimHost;
use support::{code, tasks_doc, text, Scratch};

const SLOTS: usize = 4;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The command agent: sleeps, then writes one file, tiny (the task's text) or of 64 KiB.
fn agent_command(sleep: u64, big: bool) -> String {
    if big {
        // 1,024 lines of 64 bytes; the image has sh and printf, not head or dd.
        format!(
            "sh -c 'sleep {sleep}; i=0; while [ $i -lt 1024 ]; do printf \"%063d\\n\" $i; i=$((i+1)); done > task-$COHORT_TASK_ID.txt'"
        )
    } else {
        format!("sh -c 'sleep {sleep}; printf \"%s\\n\" \"$COHORT_TASK\" > task-$COHORT_TASK_ID.txt'")
    }
}

/// One `cohort run` of `tasks` tasks on `hosts` in a fresh scratch repository: its wall
/// time and the scratch (for its logs). Prints `label` and the time.
fn run(label: &str, hosts: &[&SimHost], tasks: usize, agent: &str) -> (Duration, Scratch) {
    let s = Scratch::new();
    let req = s.request("req.md", &tasks_doc(tasks));
    let mut cmd = s.cohort();
    cmd.arg("run").arg(&req);
    for h in hosts {
        cmd.args(["--host", &format!("{}={SLOTS}", h.url())]);
    }
    cmd.args(["--agent", "command", "--agent-command", agent]);
    let logs = arg("--logs", "");
    if !logs.is_empty() {
        cmd.env("COHORT_LOG", "cohort=debug");
    }
    let start = Instant::now();
    let out = cmd.output().expect("running cohort");
    let took = start.elapsed();
    // Podman deletes the workers (auto-remove) after `cohort run` has exited. Not counted,
    // but waited for, so one run's clean-up does not slow the next one's start.
    let after = Instant::now();
    for h in hosts {
        let left = h.containers_left_after(Duration::from_secs(60));
        assert!(left.is_empty(), "{}: containers left: {left:?}", h.name());
    }
    println!(
        "{label}: {:.1} s (hosts clean {:.1} s later)",
        took.as_secs_f64(),
        after.elapsed().as_secs_f64()
    );
    if !logs.is_empty() {
        let name: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let file = std::path::Path::new(&logs).join(format!("{name}.log"));
        std::fs::create_dir_all(&logs).expect("the --logs directory");
        std::fs::write(&file, &out.stderr).expect("writing a run's log");
    }
    let merged = s.merged_tasks("cohort/service").len();
    if code(&out) != 0 {
        // Seen on main at adc2008 (when runs removed their workers): every task merged, then
        // removing a worker container that had already exited on its own failed (podman:
        // "container state improper: stopped"). A worker that cannot be stopped at the end
        // leaves the timing standing; anything else is a failed run.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            merged == tasks && stderr.contains("cannot stop container"),
            "cohort run on {} host(s): {}",
            hosts.len(),
            text(&out)
        );
        let failed = stderr.matches("cannot stop container").count();
        println!(
            "  (run exited {} after merging all {tasks} tasks: {failed} worker container(s) not stopped at the end)",
            code(&out)
        );
    }
    assert_eq!(merged, tasks, "every task merged");
    (took, s)
}

/// Per task: (worker, bytes sent, bytes received), from the run's task logs.
fn transfers(s: &Scratch) -> BTreeMap<usize, (String, u64, u64)> {
    let runs = s.work.join(".git/cohort/runs");
    let mut out = BTreeMap::new();
    for run in std::fs::read_dir(&runs).expect("the run's directory").flatten() {
        let Ok(logs) = std::fs::read_dir(run.path().join("logs")) else {
            continue;
        };
        for log in logs.flatten() {
            let name = log.file_name().to_string_lossy().into_owned();
            let Some(idx) = name.strip_suffix(".log").and_then(|n| n.parse::<usize>().ok()) else {
                continue;
            };
            let body = std::fs::read_to_string(log.path()).unwrap_or_default();
            // `err| cohort: worker H/N ran it: S bytes sent, R bytes received`
            let Some(line) = body.lines().rev().find(|l| l.contains(" ran it: ")) else {
                continue;
            };
            let rest = line.split("cohort: worker ").nth(1).unwrap_or_default();
            let (worker, rest) = rest.split_once(" ran it: ").unwrap_or_default();
            let nums: Vec<u64> = rest
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse().ok())
                .collect();
            if nums.len() >= 2 {
                out.insert(idx, (worker.to_string(), nums[0], nums[1]));
            }
        }
    }
    out
}

/// Task index → (task commit, its base), from the merges on the service branch.
fn task_commits(s: &Scratch) -> BTreeMap<usize, (String, String)> {
    let log = s.git(&[
        "log",
        "--first-parent",
        "--merges",
        "--format=%P%x09%s",
        "cohort/service",
    ]);
    let mut out = BTreeMap::new();
    for line in log.lines() {
        let Some((parents, subject)) = line.split_once('\t') else {
            continue;
        };
        let Some(idx) = subject
            .strip_prefix("Merge task ")
            .and_then(|r| r.split(':').next())
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let Some(task) = parents.split_whitespace().nth(1) else {
            continue;
        };
        let base = s.git(&["rev-parse", &format!("{task}^")]).trim().to_string();
        out.insert(idx, (task.to_string(), base));
    }
    out
}

/// Size in bytes of `path` in `commit` (0 when absent).
fn size_in(s: &Scratch, commit: &str, path: &str) -> u64 {
    let out = support::git_cmd()
        .args(["cat-file", "-s", &format!("{commit}:{path}")])
        .current_dir(&s.work)
        .output()
        .expect("git runs");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

/// For each task that was not the first on its worker: (bytes sent + received, bytes of the
/// files that changed: what merged between the worker's previous job's base and this one's,
/// the previous job's own file, and this task's file).
fn warm_payloads(s: &Scratch) -> Vec<(usize, u64, u64)> {
    let moves = transfers(s);
    let commits = task_commits(s);
    // Jobs are leased in task order, so a worker's jobs in index order are its jobs in time.
    let mut by_worker: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (idx, (worker, _, _)) in &moves {
        by_worker.entry(worker.as_str()).or_default().push(*idx);
    }
    let mut out = Vec::new();
    for jobs in by_worker.values() {
        for pair in jobs.windows(2) {
            let (prev, idx) = (pair[0], pair[1]);
            let (Some((_, prev_base)), Some((task, base))) = (commits.get(&prev), commits.get(&idx)) else {
                continue;
            };
            let mut paths: BTreeSet<String> = s
                .git(&["diff", "--name-only", prev_base, base])
                .lines()
                .map(String::from)
                .collect();
            paths.insert(format!("task-{prev:03}.txt"));
            paths.insert(format!("task-{idx:03}.txt"));
            let changed: u64 = paths.iter().map(|p| size_in(s, task, p)).sum();
            let (_, sent, received) = moves[&idx];
            out.push((idx, sent + received, changed));
        }
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn report_payloads(what: &str, s: &Scratch) {
    let first = transfers(s);
    let workers: BTreeSet<&str> = first.values().map(|(w, _, _)| w.as_str()).collect();
    let warm = warm_payloads(s);
    let ratios: Vec<f64> = warm.iter().map(|(_, b, c)| *b as f64 / (*c).max(1) as f64).collect();
    println!(
        "  {what}: {} tasks on {} workers, {} not first on their worker",
        first.len(),
        workers.len(),
        warm.len()
    );
    for (idx, bytes, changed) in &warm {
        println!(
            "    task {idx:03}: {bytes} bytes sent+received, {changed} bytes changed ({:.2}x)",
            *bytes as f64 / (*changed).max(1) as f64
        );
    }
    let bytes = median(warm.iter().map(|(_, b, _)| *b as f64).collect());
    let changed = median(warm.iter().map(|(_, _, c)| *c as f64).collect());
    println!(
        "  {what}: median {bytes:.0} bytes sent+received per warm task, median {changed:.0} bytes changed, median ratio {:.2}x (target <= 2x)",
        median(ratios)
    );
}

fn main() {
    let rounds: usize = arg("--rounds", "1").parse().expect("--rounds N");
    let tasks: usize = arg("--tasks", "24").parse().expect("--tasks N");
    let sleep: u64 = arg("--sleep", "5").parse().expect("--sleep SECONDS");
    println!("load at start: {}", loadavg());

    // The workers' image, built into the blob store the runs read (the tests' cache home).
    let t = Instant::now();
    let service = PodmanService::start();
    let s = Scratch::new();
    let out = s
        .cohort()
        .env("CONTAINER_HOST", service.container_host())
        .args(["image", "build"])
        .output()
        .expect("running cohort image build");
    assert_eq!(code(&out), 0, "image build: {}", text(&out));
    drop(service);
    println!("image built in {:.1} s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let sims = SimHost::start_many(3, |_| false);
    println!("3 simulated hosts up in {:.1} s", t.elapsed().as_secs_f64());
    let one: Vec<&SimHost> = sims.iter().take(1).collect();
    let three: Vec<&SimHost> = sims.iter().collect();
    let small = agent_command(sleep, false);

    // Warm-up, not counted: pulls the image onto every host (host 1 in the first).
    for (name, set) in [("1 host", &one), ("3 hosts", &three)] {
        run(
            &format!("warm-up on {name} (2 tasks, includes the image pull)"),
            set,
            2,
            &small,
        );
    }

    let mut ones = Vec::new();
    let mut threes = Vec::new();
    let mut last_three = None;
    for round in 1..=rounds {
        let label = format!("round {round}: {tasks} tasks x {sleep} s on 1 host ({SLOTS} slots)");
        let (t1, _) = run(&label, &one, tasks, &small);
        let label = format!("round {round}: {tasks} tasks x {sleep} s on 3 hosts ({SLOTS} slots each)");
        let (t3, s3) = run(&label, &three, tasks, &small);
        ones.push(t1.as_secs_f64());
        threes.push(t3.as_secs_f64());
        last_three = Some(s3);
    }
    let (m1, m3) = (median(ones), median(threes));
    println!(
        "wall time, median of {rounds}: 1 host {m1:.1} s, 3 hosts {m3:.1} s, ratio 3/1 = {:.2} (target <= 0.4; ideal {:.2})",
        m3 / m1,
        (tasks.div_ceil(3 * SLOTS) as f64) / (tasks.div_ceil(SLOTS) as f64)
    );

    println!("bytes per task on a warm worker (3-host runs):");
    if let Some(s3) = &last_three {
        report_payloads("tiny files", s3);
    }
    let (_, big) = run(
        "64 KiB files run on 3 hosts",
        &three,
        tasks,
        &agent_command(sleep, true),
    );
    report_payloads("64 KiB files", &big);

    println!("load at end: {}", loadavg());
    drop(sims);
}

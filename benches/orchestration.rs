//! Orchestration cost per task: cohort against the git CLI doing the
//! minimal same work, on a generated repository shaped like rust-lang/cargo
//! (~3,000 files). Not a timed test: it prints figures for the README.
//!
//!   cargo bench --bench orchestration -- [--tasks 10,100,1000] [--git-tasks 10] [--files 3072]
//!
//! Both sides run in the same process run, on the same machine, so the
//! ratio is meaningful even on a noisy host.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;
use common::{arg, generate_repo, git};

/// Peak RSS (KiB) and wall time of a child process.
// The child is reaped by `wait4`, which also gives its resource usage; std's `wait` cannot.
#[allow(clippy::zombie_processes)]
fn measure(mut cmd: Command) -> (Duration, u64, bool) {
    let start = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    (start.elapsed(), usage.ru_maxrss as u64, ok)
}

fn cohort_run(template: &Path, work: &Path, tasks: usize) -> (Duration, u64) {
    let _ = std::fs::remove_dir_all(work);
    git(
        template.parent().unwrap(),
        &["clone", "-q", template.to_str().unwrap(), work.to_str().unwrap()],
    );
    let list = work.parent().unwrap().join(format!("tasks-{tasks}.txt"));
    std::fs::write(
        &list,
        (1..=tasks).map(|i| format!("bench task {i}\n")).collect::<String>(),
    )
    .unwrap();
    let prompt = work.parent().unwrap().join("prompt.txt");
    std::fs::write(&prompt, "{task}\n").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohort"));
    cmd.current_dir(work).args([
        "run",
        "--tasks",
        list.to_str().unwrap(),
        "--prompt",
        prompt.to_str().unwrap(),
        "--no-sync",
        "-j",
        "1", // the git CLI baseline is sequential too
        "--runtime",
        "host", // not containers, even where a podman socket is found
        "--agent-command",
        // The near-no-op agent: one small file, so every task commits and merges.
        "sh -c 'echo \"$COHORT_TASK\" > bench-$COHORT_TASK_ID.txt'",
    ]);
    let (t, rss, ok) = measure(cmd);
    assert!(ok, "cohort run of {tasks} tasks failed");
    let merged = git(work, &["rev-list", "--count", "--merges", "cohort/service"]);
    assert_eq!(merged, tasks.to_string(), "every task merged");
    (t, rss)
}

/// The same work per task with the git CLI: worktree add, commit,
/// merge-tree --write-tree, commit-tree, update-ref with the old value,
/// worktree remove.
fn git_cli_run(template: &Path, work: &Path, tasks: usize) -> Duration {
    let _ = std::fs::remove_dir_all(work);
    git(
        template.parent().unwrap(),
        &["clone", "-q", template.to_str().unwrap(), work.to_str().unwrap()],
    );
    git(work, &["branch", "service"]);
    let wt = work.parent().unwrap().join("git-wt");
    let start = Instant::now();
    for i in 1..=tasks {
        let base = git(work, &["rev-parse", "service"]);
        let branch = format!("task-{i}");
        git(
            work,
            &["worktree", "add", "-q", "-b", &branch, wt.to_str().unwrap(), &base],
        );
        std::fs::write(wt.join(format!("bench-{i}.txt")), format!("bench task {i}\n")).unwrap();
        git(&wt, &["add", "-A"]);
        git(&wt, &["commit", "-q", "-m", &format!("task {i}")]);
        let old = git(work, &["rev-parse", "service"]);
        let tree = git(work, &["merge-tree", "--write-tree", "service", &branch]);
        let commit = git(
            work,
            &[
                "commit-tree",
                &tree,
                "-p",
                &old,
                "-p",
                &branch,
                "-m",
                &format!("Merge task {i}"),
            ],
        );
        git(work, &["update-ref", "refs/heads/service", &commit, &old]);
        git(work, &["worktree", "remove", "--force", wt.to_str().unwrap()]);
    }
    start.elapsed()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes; nothing to list.
    }
    let tasks: Vec<usize> = arg("--tasks", "10,100,1000")
        .split(',')
        .map(|n| n.parse().unwrap())
        .collect();
    let git_tasks: usize = arg("--git-tasks", "10").parse().unwrap();
    let files: usize = arg("--files", "3072").parse().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let template: PathBuf = tmp.path().join("template");
    std::fs::create_dir_all(&template).unwrap();
    let t0 = Instant::now();
    generate_repo(&template, files);
    eprintln!(
        "generated a {files}-file repository in {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    let git_time = git_cli_run(&template, &tmp.path().join("git-work"), git_tasks);
    let git_per = git_time.as_secs_f64() / git_tasks as f64;
    println!(
        "git CLI:  {git_tasks:>5} tasks  {:>8.2}s total  {:>8.1} ms/task",
        git_time.as_secs_f64(),
        git_per * 1e3
    );
    let mut rows = Vec::new();
    for &n in &tasks {
        let (t, rss) = cohort_run(&template, &tmp.path().join(format!("cohort-{n}")), n);
        let per = t.as_secs_f64() / n as f64;
        rows.push((n, t, per));
        println!(
            "cohort:   {n:>5} tasks  {:>8.2}s total  {:>8.1} ms/task  {:>5.3}x git  peak RSS {:.1} MB",
            t.as_secs_f64(),
            per * 1e3,
            per / git_per,
            rss as f64 / 1024.0
        );
    }
    if rows.len() >= 2 {
        let (a, b) = (&rows[rows.len() - 2], &rows[rows.len() - 1]);
        let marginal = (b.1.as_secs_f64() - a.1.as_secs_f64()) / (b.0 - a.0) as f64;
        println!(
            "cohort marginal cost from {} to {} tasks: {:.1} ms/task ({:.3}x git)",
            a.0,
            b.0,
            marginal * 1e3,
            marginal / git_per
        );
    }
}

//! The hostile-agent suite's common part: a repository with the hostile agent
//! (fixtures/agents/hostile.sh) committed in it, sentinels outside it, a snapshot of everything
//! an agent must not change, and the checks after a run.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use super::{files_under, git_in, Scratch};

/// What an attack leads to for the task that carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Merged, with its honest file in the service branch.
    Merged,
    /// Failed with a reason containing this; its honest file is on its branch.
    FailedKeeping(&'static str),
    /// Failed with a reason containing this; nothing of it taken.
    FailedTakingNothing(&'static str),
}

/// Every attack, and what it must come to: `(attack, on the host runtime, in a container)`.
pub const ATTACKS: &[(&str, Expect, Expect)] = &[
    ("hooks", Expect::Merged, Expect::Merged),
    ("config", Expect::Merged, Expect::Merged),
    ("refs", Expect::Merged, Expect::Merged),
    ("state", Expect::Merged, Expect::Merged),
    ("checkout", Expect::Merged, Expect::Merged),
    ("git-symlink", Expect::Merged, Expect::Merged),
    ("git-fifo", Expect::Merged, Expect::Merged),
    ("git-devzero", Expect::Merged, Expect::Merged),
    (
        "root-symlink",
        Expect::FailedTakingNothing("replaced its checkout directory"),
        // A container's /workspace is a mount point: it cannot be moved away.
        Expect::Merged,
    ),
    (
        "sparse",
        Expect::FailedKeeping("big.bin"),
        Expect::FailedKeeping("big.bin"),
    ),
    ("endless", Expect::Merged, Expect::Merged),
    ("utf8", Expect::Merged, Expect::Merged),
    ("gc", Expect::Merged, Expect::Merged),
    // Not an attack: the agent's own git works (status, log, stash, diff, add, commit, branch, gc).
    ("gitworks", Expect::Merged, Expect::Merged),
];

/// Puts the hostile agent into the repository (so it is in every checkout) and the sentinels
/// next to it: `outside.txt` and `outside-dir/`.
pub fn arm(s: &Scratch) {
    let script = std::fs::read(super::fixture("agents/hostile.sh")).unwrap();
    std::fs::write(s.work.join("hostile.sh"), script).unwrap();
    s.git(&["add", "hostile.sh"]);
    s.git(&["commit", "-q", "-m", "the hostile agent"]);
    s.git(&["push", "-q"]);
    let base = s.work.parent().unwrap();
    std::fs::write(base.join("outside.txt"), "outside, keep\n").unwrap();
    std::fs::create_dir_all(base.join("outside-dir")).unwrap();
    std::fs::write(base.join("outside-dir/file.txt"), "outside dir, keep\n").unwrap();
}

/// Writes the task list and the prompt for `tasks` (one attack per task).
pub fn plan(s: &Scratch, tasks: &[&str]) -> (PathBuf, PathBuf) {
    let t = s.request("tasks.txt", &(tasks.join("\n") + "\n"));
    let p = s.request("prompt.txt", "{task}\n");
    (t, p)
}

/// What an agent must not change, read before a run.
#[derive(Debug, PartialEq, Eq)]
pub struct Guarded {
    files: Vec<(PathBuf, Vec<u8>)>,
    refs: String,
    main: String,
    outside: Vec<(PathBuf, Vec<u8>)>,
}

/// The repository's config, hooks, info/ and packed-refs (bytes), its refs other than
/// cohort's own, the user's branch, and the sentinels.
pub fn guard(s: &Scratch) -> Guarded {
    let gd = s.work.join(".git");
    let mut files = Vec::new();
    for p in [gd.join("config"), gd.join("packed-refs"), gd.join("HEAD")] {
        files.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
    }
    for dir in ["hooks", "info"] {
        let mut under = files_under(&gd.join(dir));
        under.sort();
        for p in under {
            let bytes = std::fs::read(&p).unwrap_or_default();
            files.push((p, bytes));
        }
    }
    let base = s.work.parent().unwrap();
    let mut outside = Vec::new();
    for p in [base.join("outside.txt"), base.join("outside-dir/file.txt")] {
        outside.push((p.clone(), std::fs::read(&p).unwrap()));
    }
    Guarded {
        files,
        refs: user_refs(s),
        main: s.git(&["rev-parse", "refs/heads/main"]),
        outside,
    }
}

/// Refs that are not cohort's to move: everything but task branches, kept attempts and the
/// service branch.
fn user_refs(s: &Scratch) -> String {
    s.git(&["for-each-ref", "--format=%(refname) %(objectname) %(symref)"])
        .lines()
        .filter(|l| {
            !(l.starts_with("refs/heads/cohort/task/")
                || l.starts_with("refs/cohort/")
                || l.starts_with("refs/heads/cohort/service "))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// After a run: nothing guarded changed, the service branch moved by cohort's merges alone,
/// cohort's state reads back, and the user's own git commands run nothing an agent planted.
pub fn check_sealed(s: &Scratch, before: &Guarded, tasks: usize) {
    let after = guard(s);
    for ((p, a), (_, b)) in before.files.iter().zip(&after.files) {
        assert_eq!(
            String::from_utf8_lossy(a),
            String::from_utf8_lossy(b),
            "{} changed",
            p.display()
        );
    }
    assert_eq!(
        before.files.len(),
        after.files.len(),
        "files appeared in hooks/ or info/"
    );
    assert_eq!(before.refs, after.refs, "the user's refs changed");
    assert_eq!(before.main, after.main, "the user's branch moved");
    assert_eq!(before.outside, after.outside, "a file outside the repository changed");
    let base = s.work.parent().unwrap();
    assert!(
        !base.join("outside-dir/STOLEN.txt").exists() && !base.join("outside-dir/honest-001.txt").exists(),
        "something was written through a symlink"
    );
    // The service branch is a branch, not a symbolic ref, and every commit on its first-parent
    // line since the user's branch is one of cohort's merges.
    let symref = super::git_cmd()
        .args(["symbolic-ref", "-q", "refs/heads/cohort/service"])
        .current_dir(&s.work)
        .output()
        .unwrap();
    assert!(!symref.status.success(), "cohort/service became a symbolic ref");
    let line = s.git(&[
        "log",
        "--first-parent",
        "--format=%s",
        &format!("{}..cohort/service", before.main.trim()),
    ]);
    for subject in line.lines() {
        assert!(
            subject.starts_with("Merge task "),
            "not cohort's merge on the service branch: {subject}"
        );
    }
    let report = s.status_json();
    assert_eq!(
        report["tasks"].as_array().map(|t| t.len()),
        Some(tasks),
        "the state does not read back: {report}"
    );
    user_git_runs_nothing_planted(s);
}

/// The user's next git commands (status, commit, checkout, merge) in their own repository,
/// with hooks and fsmonitor honoured: nothing an agent planted runs.
fn user_git_runs_nothing_planted(s: &Scratch) {
    s.git(&["status"]);
    s.git(&["commit", "-q", "--allow-empty", "-m", "the user's own commit"]);
    s.git(&["checkout", "-q", "-b", "probe"]);
    s.git(&["merge", "-q", "--no-edit", "cohort/service"]);
    s.git(&["checkout", "-q", "main"]);
    let pwned: Vec<PathBuf> = files_under(s.work.parent().unwrap())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("PWNED-")))
        .collect();
    assert!(pwned.is_empty(), "something an agent planted ran: {pwned:?}");
}

/// Checks the task carrying `attack` (1-based `n`) came to what `expect` says.
pub fn check_task(s: &Scratch, report: &serde_json::Value, n: usize, attack: &str, expect: Expect) {
    let task = &report["tasks"][n - 1];
    let status = task["status"].as_str().unwrap_or("?");
    let reason = task["reason"].as_str().unwrap_or("");
    let honest = format!("honest-{n:03}.txt");
    let on_service = show(s, &format!("cohort/service:{honest}"));
    let branch = task["branch"].as_str().unwrap_or("?");
    let on_branch = show(s, &format!("{branch}:{honest}"));
    match expect {
        Expect::Merged => {
            assert_eq!(status, "merged", "{attack}: {task}");
            assert!(on_service.is_some(), "{attack}: the honest file is not merged");
        }
        Expect::FailedKeeping(why) => {
            assert_eq!(status, "failed", "{attack}: {task}");
            assert!(reason.contains(why), "{attack}: reason {reason:?} lacks {why:?}");
            assert!(on_branch.is_some(), "{attack}: the honest file is not on its branch");
            assert!(on_service.is_none(), "{attack}: a failed task was merged");
        }
        Expect::FailedTakingNothing(why) => {
            assert_eq!(status, "failed", "{attack}: {task}");
            assert!(reason.contains(why), "{attack}: reason {reason:?} lacks {why:?}");
            assert!(on_service.is_none(), "{attack}: a failed task was merged");
        }
    }
    if attack == "gc" {
        let log = s.git(&["log", "--format=%s", "cohort/service"]);
        assert!(
            log.contains("the agent's own commit"),
            "gc: the agent's commit is lost:\n{log}"
        );
        assert!(show(s, &format!("cohort/service:agent-commit-{n:03}.txt")).is_some());
    }
    if attack == "gitworks" {
        let log = s.git(&["log", "--format=%s", "cohort/service"]);
        assert!(
            log.contains("the agent's git works"),
            "gitworks: the agent's commit is lost:\n{log}"
        );
        assert!(show(s, "cohort/service:wip.txt").is_some());
    }
    if attack == "config" {
        // What the agent committed is data: its .gitattributes arrives, its drivers do not run.
        assert!(show(s, "cohort/service:.gitattributes").is_some());
    }
}

/// A task's log (all attempts), as cohort wrote it.
pub fn task_log(s: &Scratch, n: usize) -> String {
    let runs = s.work.join(".git/cohort/runs");
    files_under(&runs)
        .into_iter()
        .filter(|p| p.ends_with(format!("logs/{n:03}.log")))
        .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned())
        .collect()
}

fn show(s: &Scratch, spec: &str) -> Option<String> {
    let out = super::git_cmd()
        .args(["show", spec])
        .current_dir(&s.work)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The git dir a test repository's cohort state lives in.
pub fn cohort_dir(work: &Path) -> PathBuf {
    work.join(".git/cohort")
}

/// `git` in `dir`, as the test does elsewhere.
pub fn git(dir: &Path, args: &[&str]) -> String {
    git_in(dir, args)
}

//! Tasks on their own branches and checkouts, merged into the service branch.

mod support;
use support::*;

fn run_with(s: &Scratch, doc: &str, agent_name: &str, extra: &[&str]) -> std::process::Output {
    let req = s.request("req.md", doc);
    let mut args = vec!["run", req.to_str().unwrap()];
    let a = agent(agent_name);
    args.extend(["--agent", "command", "--agent-command", a.as_str()]);
    args.extend(extra);
    let out = s.run(&args);
    // The user's checkout is never left dirty (ignored files aside).
    if code(&out) != 2 {
        assert_eq!(s.git(&["status", "--porcelain"]), "", "{}", text(&out));
    }
    out
}

#[test]
fn thirty_two_tasks_sixteen_at_a_time_merge_exactly_once() {
    let s = Scratch::new();
    let out = run_with(&s, &tasks_doc(32), "write.sh", &["-j", "16"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let mut merged = s.merged_tasks("cohort/service");
    merged.sort();
    let mut want: Vec<String> = (1..=32).map(|i| format!("{i:03}: task number {i}")).collect();
    want.sort();
    assert_eq!(merged, want);
    let files = s.git(&["ls-tree", "--name-only", "cohort/service"]);
    for i in 1..=32 {
        assert!(files.contains(&format!("task-{i:03}.txt")), "task {i} missing");
    }
    // Trailers tie commits to run and task.
    let body = s.git(&["log", "-1", "--format=%B", "cohort/service^2"]);
    assert!(
        body.contains("Cohort-Run: ") && body.contains("Cohort-Task: "),
        "{body}"
    );
    s.fsck();
    // The pool is gone and the user's branch untouched.
    assert_eq!(s.git(&["worktree", "list"]).lines().count(), 1);
    assert!(!s.work.join("task-001.txt").exists());
    assert_eq!(s.git(&["rev-parse", "main"]), s.git(&["rev-parse", "origin/main"]));
}

#[test]
fn failing_agent_keeps_its_work_on_the_branch_and_exits_1() {
    let s = Scratch::new();
    let out = run_with(&s, "- break it\n", "fail.sh", &[]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    let report = s.status_json();
    let t = &report["tasks"][0];
    assert_eq!(t["status"], "failed");
    assert_eq!(t["exit_code"], 3);
    assert!(t["reason"].as_str().unwrap().contains("code 3"), "{t}");
    let branch = t["branch"].as_str().unwrap();
    assert!(s.git(&["ls-tree", "--name-only", branch]).contains("partial-001.txt"));
    assert!(s.merged_tasks("cohort/service").is_empty());
    let log = s.run(&["logs", "1"]);
    assert!(String::from_utf8_lossy(&log.stdout).contains("something went wrong"));
}

#[test]
fn missing_agent_program_fails_the_task_with_127_and_says_why() {
    let s = Scratch::new();
    let req = s.request("req.md", "- run nothing\n");
    let out = s.run(&[
        "run",
        req.to_str().unwrap(),
        "--agent-command",
        "/nonexistent/agent-program {task}",
    ]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    let t = &s.status_json()["tasks"][0];
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["exit_code"], 127, "{t}");
    let log = s.run(&["logs", "1"]);
    let log = String::from_utf8_lossy(&log.stdout).to_string();
    assert!(
        log.contains("cannot start agent") && log.contains("/nonexistent/agent-program"),
        "{log}"
    );
}

#[test]
fn hanging_agent_is_killed_with_its_children_at_the_timeout() {
    let s = Scratch::new();
    let pids = s.tmp.path().join("pids");
    let req = s.request("req.md", "- hang forever\n");
    let out = s
        .cohort()
        .env("COHORT_TEST_PIDS", &pids)
        .args([
            "run",
            req.to_str().unwrap(),
            "--agent-command",
            &agent("hang.sh"),
            "--timeout",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&out), 1, "{}", text(&out));
    let report = s.status_json();
    assert!(report["tasks"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("timed out after 1s"));
    for pid in std::fs::read_to_string(&pids).unwrap().split_whitespace() {
        assert!(gone(pid), "process {pid} outlived the timeout");
    }
}

#[test]
fn self_committing_agent_keeps_its_commits() {
    let s = Scratch::new();
    let out = run_with(&s, "- commit on your own\n", "self-commit.sh", &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let log = s.git(&["log", "--format=%an %s", "cohort/service^2"]);
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines[0].starts_with("Test task 001: commit on your own"), "{log}");
    assert!(lines[1].starts_with("agent agent: own commit for 001"), "{log}");
    let files = s.git(&["ls-tree", "--name-only", "cohort/service"]);
    assert!(
        files.contains("agent-commit.txt") && files.contains("agent-uncommitted.txt"),
        "{files}"
    );
}

#[test]
fn agent_that_deletes_everything_and_one_that_changes_nothing() {
    let s = Scratch::new();
    let out = run_with(&s, "- nothing to do\n", "no-change.sh", &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.status_json()["tasks"][0]["status"], "unchanged");
    assert!(s.merged_tasks("cohort/service").is_empty());

    let out = run_with(&s, "- delete everything\n", "delete-all.sh", &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.git(&["ls-tree", "-r", "--name-only", "cohort/service"]), "");
    // The user's files are all still there.
    assert!(s.work.join("README.md").exists());
    // The next run's checkout, made from the emptied service branch, still works.
    let out = run_with(&s, "- write after delete\n", "write.sh", &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
}

#[test]
fn reused_checkouts_start_clean_for_each_task() {
    let s = Scratch::new();
    // -j 1: one checkout serves every task; each task must see only merged work.
    let out = run_with(&s, "- first\n- second\n- third\n", "write.sh", &["-j", "1"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let third = s.git(&["ls-tree", "-r", "--name-only", "cohort/service"]);
    assert_eq!(third.lines().filter(|l| l.starts_with("task-")).count(), 3);
    for b in s
        .git(&["branch", "--list", "cohort/task/*", "--format=%(refname:short)"])
        .lines()
    {
        let id = &b[b.rfind('/').unwrap() + 1..][..3];
        let diff = s.git(&["diff", "--name-only", &format!("{b}^"), b]);
        assert_eq!(
            diff.trim(),
            format!("task-{id}.txt"),
            "each task committed only its own file"
        );
    }
}

#[test]
fn conflicts_keep_policy_marks_and_keeps_branch() {
    let s = Scratch::new();
    let out = run_with(
        &s,
        "- alpha\n- beta\n",
        "shared-file.sh",
        &["-j", "2", "--on-conflict", "keep"],
    );
    assert_eq!(code(&out), 1, "{}", text(&out));
    let report = s.status_json();
    let statuses: Vec<&str> = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap())
        .collect();
    let mut sorted = statuses.clone();
    sorted.sort();
    assert_eq!(sorted, ["conflict", "merged"], "{report}");
    let loser = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["status"] == "conflict")
        .unwrap();
    assert!(loser["reason"].as_str().unwrap().contains("shared.txt"));
    // The conflicting branch is kept with its work.
    let branch = loser["branch"].as_str().unwrap();
    assert!(s.git(&["show", &format!("{branch}:shared.txt")]).contains("attempt 1"));
    s.fsck();
}

#[test]
fn conflicts_retry_policy_reruns_from_the_new_tip() {
    let s = Scratch::new();
    let out = run_with(&s, "- alpha\n- beta\n", "shared-file.sh", &["-j", "2"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let report = s.status_json();
    let attempts: Vec<u64> = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["attempts"].as_u64().unwrap())
        .collect();
    let mut sorted = attempts.clone();
    sorted.sort();
    assert_eq!(sorted, [1, 2], "{report}");
    assert_eq!(s.merged_tasks("cohort/service").len(), 2);
    // The retried task's final content is on the service branch.
    assert!(s.git(&["show", "cohort/service:shared.txt"]).contains("attempt 2"));
    // The retry's prompt told the agent about the conflict.
    let retried = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["attempts"] == 2)
        .unwrap();
    let log = s.run(&["logs", &retried["index"].to_string()]);
    assert!(String::from_utf8_lossy(&log.stdout).contains("conflicted with changes merged meanwhile"));
}

#[test]
fn hostile_task_names_are_never_run_through_a_shell() {
    let s = Scratch::new();
    let marker = s.tmp.path().join("pwned");
    let m = marker.display();
    let tasks = [
        format!("fix \"quotes\" and 'single' $(touch {m}) `touch {m}`; touch {m} && echo | cat"),
        "Ünïcödé tâsk — 日本語 ✓".to_string(),
        "path/with/../slashes/and\\backslashes".to_string(),
        "-leading dash --and-flags".to_string(),
        "glob * ? [a-z] {a,b} ~ > out < in | pipe".to_string(),
    ];
    let doc: String = tasks.iter().map(|t| format!("- {t}\n")).collect();
    let out = run_with(&s, &doc, "write.sh", &["-j", "3"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(!marker.exists(), "a task name was run by a shell");
    for (i, t) in tasks.iter().enumerate() {
        let content = s.git(&["show", &format!("cohort/service:task-{:03}.txt", i + 1)]);
        assert_eq!(content.trim_end(), t.as_str());
    }
    for b in s
        .git(&["branch", "--list", "cohort/task/*", "--format=%(refname:short)"])
        .lines()
    {
        assert!(b.is_ascii() && !b.contains(' '), "{b}");
    }
}

#[test]
fn refuses_to_run_with_the_service_branch_checked_out() {
    let s = Scratch::new();
    s.git(&["checkout", "-q", "-b", "cohort/service"]);
    let req = s.request("req.md", "- a\n");
    let out = s.run(&["run", req.to_str().unwrap(), "--agent-command", &agent("write.sh")]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("is checked out here"), "{}", text(&out));
}

#[test]
fn a_retry_that_conflicts_again_ends_as_conflict() {
    // Three tasks write one file from the same base: one merges, the other
    // two conflict and retry from the new tip at about the same time, where
    // one merges and the other conflicts again; it is not retried twice.
    let s = Scratch::new();
    let out = run_with(&s, "- alpha\n- beta\n- gamma\n", "shared-file.sh", &["-j", "3"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    let report = s.status_json();
    let mut seen: Vec<(String, u64)> = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["status"].as_str().unwrap().to_string(),
                t["attempts"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    let want = [("conflict", 2), ("merged", 1), ("merged", 2)].map(|(s, n)| (s.to_string(), n));
    assert_eq!(seen, want, "{report}");
    assert_eq!(s.merged_tasks("cohort/service").len(), 2);
}

#[test]
fn a_tracked_file_over_max_file_size_that_the_agent_only_touched_is_no_change() {
    // The scratch's .gitignore is 14 bytes, over a 10-byte limit. The agent touches it (its
    // stat data changes, its content does not) and adds a small file: the task merges.
    let s = Scratch::new();
    let conf = s.tmp.path().join(".config/cohort");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("config.toml"), "[run]\nmax_file_size = \"10\"\n").unwrap();
    let req = s.request("req.md", "- touch the ignore file\n");
    let out = s.run(&[
        "run",
        req.to_str().unwrap(),
        "--no-sync",
        "--runtime",
        "host",
        "--agent",
        "command",
        "--agent-command",
        "sh -c 'touch -d 2001-01-01 .gitignore; echo ok > s.txt'",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(!text(&out).contains(".gitignore"), "{}", text(&out));
    assert_eq!(s.git(&["show", "cohort/service:s.txt"]), "ok\n");
}

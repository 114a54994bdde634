//! `kill -9` of cohort at several points, then `cohort resume`; and Ctrl-C.

mod support;
use std::time::Duration;
use support::*;

fn start_slow(s: &Scratch, pids: &std::path::Path, n: usize) -> std::process::Child {
    let req = s.request("req.md", &tasks_doc(n));
    s.cohort()
        .env("COHORT_TEST_PIDS", pids)
        .env("COHORT_TEST_DELAY", "0.7")
        .args([
            "run",
            req.to_str().unwrap(),
            "--agent-command",
            &agent("slow.sh"),
            "-j",
            "2",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn assert_finished_once(s: &Scratch, n: usize) {
    let mut merged = s.merged_tasks("cohort/service");
    merged.sort();
    let mut want: Vec<String> = (1..=n).map(|i| format!("{i:03}: task number {i}")).collect();
    want.sort();
    assert_eq!(merged, want, "every task merged exactly once");
    s.fsck();
    assert_eq!(
        s.git(&["worktree", "list"]).lines().count(),
        1,
        "the checkout pool is removed"
    );
    assert_eq!(s.git(&["status", "--porcelain"]), "");
}

#[test]
fn kill_9_at_several_points_then_resume() {
    for delay_ms in [250u64, 900, 1700, 2600] {
        let s = Scratch::new();
        let pids = s.tmp.path().join("pids");
        let mut child = start_slow(&s, &pids, 6);
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // No agent outlives cohort.
        for pid in std::fs::read_to_string(&pids).unwrap_or_default().split_whitespace() {
            assert!(gone(pid), "agent {pid} outlived cohort (killed after {delay_ms} ms)");
        }
        let status = s.run(&["status", "--json"]);
        if code(&status) == 2 {
            // Killed before the run was recorded: nothing to resume, and nothing half-done.
            assert!(s.git(&["branch", "--list", "cohort/task/*"]).is_empty());
            continue;
        }
        let out = s
            .cohort()
            .env("COHORT_TEST_DELAY", "0.1")
            .args(["resume"])
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "resume after kill at {delay_ms} ms: {}", text(&out));
        assert_finished_once(&s, 6);
        // A second resume has nothing left to do.
        let again = s.run(&["resume"]);
        assert_eq!(code(&again), 0, "{}", text(&again));
        assert!(text(&again).contains("no unfinished tasks"));
    }
}

#[test]
fn ctrl_c_stops_agents_saves_state_and_exits_130() {
    let s = Scratch::new();
    let pids = s.tmp.path().join("pids");
    let child = start_slow(&s, &pids, 4);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    for pid in std::fs::read_to_string(&pids).unwrap_or_default().split_whitespace() {
        assert!(gone(pid), "agent {pid} outlived the interrupt");
    }
    let report = s.status_json();
    assert_eq!(report["run"]["status"], "interrupted");
    let out = s
        .cohort()
        .env("COHORT_TEST_DELAY", "0.1")
        .args(["resume"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_finished_once(&s, 4);
}

/// Waits until `path` has `n` lines (agents record their pids there).
fn wait_for_lines(path: &std::path::Path, n: usize) {
    for _ in 0..300 {
        if std::fs::read_to_string(path).unwrap_or_default().lines().count() >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the agents did not start within 30 s");
}

/// Agents that hang with a child in their process group and one in a
/// session of their own: neither `kill -9` of cohort nor SIGTERM leaves any
/// of them alive, and `resume` (with another agent) redoes the tasks from
/// clean checkouts, so nothing the dead agents left reaches a commit.
#[test]
fn no_agent_process_outlives_cohort_and_resume_starts_clean() {
    for signal in [libc::SIGKILL, libc::SIGTERM] {
        let s = Scratch::new();
        let pids = s.tmp.path().join("pids");
        let req = s.request("req.md", &tasks_doc(3));
        let child = s
            .cohort()
            .env("COHORT_TEST_PIDS", &pids)
            .args([
                "run",
                req.to_str().unwrap(),
                "-j",
                "2",
                "--agent-command",
                &agent("linger.sh"),
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_for_lines(&pids, 2);
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let out = child.wait_with_output().unwrap();
        // SIGTERM is a stop that saves state; after kill -9 the state still
        // says running, and no process holds the run: status says stopped.
        let (want, shown) = if signal == libc::SIGTERM {
            assert_eq!(out.status.code(), Some(130), "SIGTERM saves state and exits 130");
            ("interrupted", "interrupted")
        } else {
            ("running", "stopped")
        };
        let status = s.status_json();
        assert_eq!(status["run"]["status"], shown, "{status}");
        let db = rusqlite::Connection::open(s.work.join(".git/cohort/state.db")).unwrap();
        let stored: String = db.query_row("SELECT status FROM runs", [], |r| r.get(0)).unwrap();
        assert_eq!(stored, want);
        let text_status = s.run(&["status"]);
        if signal == libc::SIGKILL {
            assert!(
                String::from_utf8_lossy(&text_status.stdout).contains("`cohort resume"),
                "{}",
                text(&text_status)
            );
        }
        let recorded = std::fs::read_to_string(&pids).unwrap();
        assert_eq!(recorded.split_whitespace().count(), 6, "{recorded}");
        for pid in recorded.split_whitespace() {
            assert!(gone(pid), "agent process {pid} outlived cohort (signal {signal})");
        }
        let out = s
            .cohort()
            .args(["resume", "--agent-command", &agent("write.sh")])
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{}", text(&out));
        assert_finished_once(&s, 3);
        let files = s.git(&["ls-tree", "-r", "--name-only", "cohort/service"]);
        assert!(!files.contains("junk-"), "{files}");
        assert_eq!(s.git(&["show", "cohort/service:README.md"]), "# scratch\n");
    }
}

/// Sets a task back to `committed` (its work on the task branch, its merge
/// not recorded), as a crash between the commit step and the merge leaves it.
fn set_committed(s: &Scratch, idx: usize) {
    let db = rusqlite::Connection::open(s.work.join(".git/cohort/state.db")).unwrap();
    db.execute(
        "UPDATE tasks SET status = 'committed', merge_commit = NULL, ended_at = NULL WHERE idx = ?1",
        [idx],
    )
    .unwrap();
    db.execute("UPDATE runs SET status = 'running', finished_at = NULL", [])
        .unwrap();
}

/// Resuming a committed task merges it without running the agent again; a
/// merge that happened before the crash is found and recorded, not redone.
#[test]
fn resume_merges_committed_tasks_without_rerunning_them() {
    let s = Scratch::new();
    let req = s.request("req.md", &tasks_doc(2));
    let out = s.run(&["run", req.to_str().unwrap(), "--agent-command", &agent("write.sh")]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let report = s.status_json();
    let merge1 = report["tasks"][0]["merge_commit"].as_str().unwrap().to_string();
    let merge2 = report["tasks"][1]["merge_commit"].as_str().unwrap().to_string();
    // Task 1's merge happened, task 2's did not (the service branch is put back).
    let (first, second) = if s.git(&["rev-parse", "cohort/service"]).trim() == merge2 {
        (merge1.clone(), 2)
    } else {
        (merge2.clone(), 1)
    };
    s.git(&["update-ref", "refs/heads/cohort/service", &first]);
    set_committed(&s, 1);
    set_committed(&s, 2);
    // An agent that fails: running it again would fail the task.
    let out = s.run(&["resume", "--agent-command", &agent("fail.sh")]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let report = s.status_json();
    let tasks = report["tasks"].as_array().unwrap();
    assert!(
        tasks.iter().all(|t| t["status"] == "merged" && t["attempts"] == 1),
        "{report}"
    );
    let other = if second == 2 { 0 } else { 1 };
    assert_eq!(
        tasks[other]["merge_commit"],
        first.as_str(),
        "the earlier merge is recorded"
    );
    assert_eq!(s.merged_tasks("cohort/service").len(), 2);
    s.fsck();
}

/// A committed task whose merge conflicts on resume is retried once, with
/// the agent told about the conflict, as in an uninterrupted run.
#[test]
fn resume_retries_a_committed_task_that_conflicts_and_says_why() {
    let s = Scratch::new();
    let req = s.request("req.md", &tasks_doc(1));
    let out = s.run(&["run", req.to_str().unwrap(), "--agent-command", &agent("write.sh")]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    // The service branch goes back to before the merge and gets a commit of
    // its own on the file the task wrote.
    let base = s.git(&["rev-parse", "cohort/service^1"]).trim().to_string();
    let theirs_file = s.request("theirs.txt", "written meanwhile\n");
    let blob = s.git(&["hash-object", "-w", theirs_file.to_str().unwrap()]);
    let index = s.tmp.path().join("tmp-index");
    let with_index = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(&s.work)
            .env("GIT_INDEX_FILE", &index)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    with_index(&["read-tree", &base]);
    with_index(&[
        "update-index",
        "--add",
        "--cacheinfo",
        &format!("100644,{},task-001.txt", blob.trim()),
    ]);
    let tree = with_index(&["write-tree"]);
    let theirs = s.git(&["commit-tree", &tree, "-p", &base, "-m", "meanwhile"]);
    s.git(&["update-ref", "refs/heads/cohort/service", theirs.trim()]);
    set_committed(&s, 1);

    let keep_prompt = "sh -c 'cp \"$COHORT_PROMPT_FILE\" prompt-seen.txt'";
    let out = s.run(&["resume", "--agent-command", keep_prompt]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let report = s.status_json();
    let t = &report["tasks"][0];
    assert_eq!(t["status"], "merged", "{report}");
    assert_eq!(t["attempts"], 2, "{report}");
    let prompt = s.git(&["show", "cohort/service:prompt-seen.txt"]);
    assert!(
        prompt.contains("conflicted") && prompt.contains("task-001.txt"),
        "{prompt}"
    );
    assert_eq!(
        s.git(&["show", "cohort/service:task-001.txt"]),
        "written meanwhile\n",
        "the service branch's version stays"
    );
}

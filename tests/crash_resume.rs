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
        if signal == libc::SIGTERM {
            assert_eq!(out.status.code(), Some(130), "SIGTERM saves state and exits 130");
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

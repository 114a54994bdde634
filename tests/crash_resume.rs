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

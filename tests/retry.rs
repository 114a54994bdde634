//! `cohort retry`: tasks of a finished run that did not merge are re-run, each as a new
//! attempt from the current service tip, in the same run.

mod support;
use support::*;

#[test]
fn retry_reruns_chosen_tasks_from_the_current_service_tip() {
    let s = Scratch::new();
    let mark = s.tmp.path().join("mark");
    std::fs::create_dir(&mark).unwrap();
    std::fs::write(mark.join("broken"), "").unwrap();
    let req = s.request("req.md", "- one\n- two\n");
    let a = agent("fail-while-marked.sh");
    let cohort = |args: &[&str]| s.cohort().args(args).env("COHORT_TEST_MARK", &mark).output().unwrap();
    let out = cohort(&[
        "run",
        req.to_str().unwrap(),
        "--no-sync",
        "--runtime",
        "host",
        "--agent",
        "command",
        "--agent-command",
        &a,
    ]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    let run_id = s.status_json()["run"]["id"].as_str().unwrap().to_string();
    // Meanwhile the service branch moves on (someone merged something else).
    s.write("other.txt", "other\n");
    let tree = {
        s.git(&["add", "other.txt"]);
        let t = s.git(&["write-tree"]);
        s.git(&["reset", "-q"]);
        t
    };
    let tip = s.git(&["commit-tree", tree.trim(), "-p", "cohort/service", "-m", "elsewhere"]);
    s.git(&["update-ref", "refs/heads/cohort/service", tip.trim()]);
    std::fs::remove_file(s.work.join("other.txt")).unwrap();
    std::fs::remove_file(mark.join("broken")).unwrap();

    // A kill -9 in the middle of a ref update left a lock file on task 1's branch: it is the
    // run's own namespace, cleared when the run is taken up again.
    let branch = s.status_json()["tasks"][0]["branch"].as_str().unwrap().to_string();
    let lock = s.work.join(".git/refs/heads").join(format!("{branch}.lock"));
    std::fs::write(&lock, "").unwrap();
    // A merged or unknown task is not retried.
    assert_eq!(code(&cohort(&["retry", "9"])), 2);
    let out = cohort(&["retry", &run_id, "1"]);
    assert_eq!(code(&out), 1, "task 2 is still failed: {}", text(&out));
    let st = s.status_json();
    assert_eq!(st["run"]["id"], run_id.as_str(), "no new run");
    let (t1, t2) = (&st["tasks"][0], &st["tasks"][1]);
    assert_eq!(
        (t1["status"].as_str(), t1["attempts"].as_u64()),
        (Some("merged"), Some(2)),
        "{t1}"
    );
    assert_eq!(
        t1["base_commit"].as_str(),
        Some(tip.trim()),
        "from the service tip of now"
    );
    assert_eq!(t2["status"], "failed");
    assert!(!lock.exists());
    assert_eq!(code(&cohort(&["retry", "1"])), 2, "task 1 is merged now");
    // No task numbers: every task that did not merge.
    let out = cohort(&["retry"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let files = s.git(&["ls-tree", "--name-only", "cohort/service"]);
    assert!(
        files.contains("task-001.txt") && files.contains("task-002.txt") && files.contains("other.txt"),
        "{files}"
    );
    assert_eq!(s.status_json()["run"]["status"], "done");
    s.fsck();
}

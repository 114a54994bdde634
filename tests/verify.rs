//! The verify gate, on the host runtime with command agents and verify scripts: feedback
//! rounds, `unverified`, the merge train, timeouts, a kill -9 during a verify, and caches.

mod support;
use support::*;

fn verify_script(name: &str) -> String {
    format!("sh {}", fixture(&format!("verify/{name}")).display())
}

/// `cohort run` of `doc` with `agent`, verified by `verify`, on the host, without sync.
fn run(s: &Scratch, doc: &str, agent_name: &str, verify: &str, extra: &[&str]) -> std::process::Output {
    let req = s.request("req.md", doc);
    let (a, v) = (agent(agent_name), verify_script(verify));
    let mut args = vec![
        "run",
        req.to_str().unwrap(),
        "--no-sync",
        "--runtime",
        "host",
        "--agent",
        "command",
        "--agent-command",
        a.as_str(),
        "--verify",
        v.as_str(),
    ];
    args.extend(extra);
    let out = s.run(&args);
    assert_eq!(s.git(&["status", "--porcelain"]), "", "{}", text(&out));
    out
}

fn report(s: &Scratch) -> serde_json::Value {
    let out = s.run(&["report", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

#[test]
fn a_failure_goes_back_to_the_agent_which_fixes_it_in_the_same_attempt() {
    let s = Scratch::new();
    let out = run(&s, "- set the value\n", "fix-on-feedback.sh", "values-ok.sh", &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let r = report(&s);
    let t = &r["tasks"][0];
    assert_eq!(t["status"], "merged", "{t}");
    assert_eq!(t["attempts"], 1, "fixed within the attempt: {t}");
    let v = t["verifies"].as_array().unwrap();
    assert_eq!(v.len(), 2, "{v:?}");
    assert_eq!(
        (v[0]["passed"].as_bool(), v[0]["round"].as_u64()),
        (Some(false), Some(0))
    );
    assert_eq!(
        (v[1]["passed"].as_bool(), v[1]["round"].as_u64()),
        (Some(true), Some(1))
    );
    // The failure the agent got: the exit status and the output, without its colours.
    let failure = v[0]["failure"].as_str().unwrap();
    assert!(failure.contains("exited with code 1") && failure.contains("FAILED value-001.txt is broken"));
    assert!(!failure.contains('\x1b'), "{failure:?}");
    assert_eq!(s.git(&["show", "cohort/service:value-001.txt"]), "ok\n");
    // Every merge on the service branch holds a tree that passes.
    let text = String::from_utf8_lossy(&s.run(&["report"]).stdout).into_owned();
    assert!(
        text.contains("verify its commit") && text.contains("after feedback round 1"),
        "{text}"
    );
}

#[test]
fn work_that_never_passes_ends_unverified_with_its_branch_kept() {
    let s = Scratch::new();
    let out = run(&s, "- write it\n", "write.sh", "never.sh", &[]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("1 unverified"), "{}", text(&out));
    let r = report(&s);
    let t = &r["tasks"][0];
    assert_eq!(t["status"], "unverified", "{t}");
    assert!(
        t["reason"].as_str().unwrap().contains("after 2 round(s) of feedback"),
        "{t}"
    );
    // The first run and two feedback rounds (the default [verify] retries = 2).
    assert_eq!(t["verifies"].as_array().unwrap().len(), 3, "{t}");
    let branch = t["branch"].as_str().unwrap();
    assert!(s.git(&["ls-tree", "--name-only", branch]).contains("task-001.txt"));
    assert!(s.merged_tasks("cohort/service").is_empty());
    // The log shows each verify run.
    let log = text(&s.run(&["logs", "1"]));
    assert_eq!(log.matches("--- verify failed").count(), 3, "{log}");
    assert_eq!(log.matches("--- feedback").count(), 2, "{log}");
}

/// Sums the n-*.txt of a tree, as fixtures/verify/sum.sh does.
fn total_at(s: &Scratch, commit: &str) -> i64 {
    let names = s.git(&["ls-tree", "--name-only", commit]);
    names
        .lines()
        .filter(|n| n.starts_with("n-"))
        .map(|n| {
            s.git(&["show", &format!("{commit}:{n}")])
                .trim()
                .parse::<i64>()
                .unwrap()
        })
        .sum()
}

#[test]
fn two_tasks_that_pass_alone_but_fail_together_the_second_is_redone_on_the_new_tip() {
    let s = Scratch::new();
    let config = s.request("c.toml", "[verify]\ncaches = [\"target\"]\n");
    let out = run(
        &s,
        "- first\n- second\n",
        "add-up.sh",
        "sum.sh",
        &["-j", "2", "--config", config.to_str().unwrap()],
    );
    assert_eq!(code(&out), 0, "{}", text(&out));
    let r = report(&s);
    let tasks = r["tasks"].as_array().unwrap();
    assert!(tasks.iter().all(|t| t["status"] == "merged"), "{tasks:?}");
    // One of them merged second: its merge result failed (6 + 6), and it was redone from the
    // new tip with that failure, and wrote 4.
    let redone: Vec<_> = tasks.iter().filter(|t| t["attempts"] == 2).collect();
    assert_eq!(redone.len(), 1, "{tasks:?}");
    let v = redone[0]["verifies"].as_array().unwrap();
    assert!(
        v.iter().any(|v| v["kind"] == "merge"
            && v["passed"] == false
            && v["failure"].as_str().unwrap().contains("exceeds 10")),
        "{v:?}"
    );
    // The service branch passes the check at every merge on its first-parent line.
    let merges = s.git(&["rev-list", "--first-parent", "--merges", "cohort/service"]);
    assert_eq!(merges.lines().count(), 2);
    for m in merges.lines() {
        assert!(total_at(&s, m) <= 10, "merge {m} fails the check");
    }
    assert_eq!(total_at(&s, "cohort/service"), 10);
    // The cache persisted between the verify runs (counted in target/runs of a slot).
    let runs: usize = std::fs::read_dir(s.work.join(".git/cohort/caches"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|slot| std::fs::read_dir(slot.path()).unwrap().flatten())
        .map(|cache| {
            std::fs::read_to_string(cache.path().join("runs"))
                .unwrap_or_default()
                .lines()
                .count()
        })
        .sum();
    let verified = tasks
        .iter()
        .map(|t| t["verifies"].as_array().unwrap().len())
        .sum::<usize>();
    assert_eq!(runs, verified, "each verify run found the cache its slot left");
    assert!(!s.work.join("target").exists());
}

#[test]
fn a_verify_command_that_hangs_gets_its_timeout() {
    let s = Scratch::new();
    let config = s.request("c.toml", "[verify]\ntimeout = \"2s\"\nretries = 0\n");
    let t0 = std::time::Instant::now();
    let out = run(
        &s,
        "- write it\n",
        "write.sh",
        "hang.sh",
        &["--config", config.to_str().unwrap()],
    );
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(60),
        "the hang was stopped"
    );
    let r = report(&s);
    let t = &r["tasks"][0];
    assert_eq!(t["status"], "unverified", "{t}");
    let failure = t["verifies"][0]["failure"].as_str().unwrap();
    assert!(failure.contains("timed out after 2s ([verify] timeout)"), "{failure}");
    assert!(failure.contains("starting a check that never ends"), "{failure}");
}

#[test]
fn kill_9_during_a_verify_then_resume_verifies_again_without_rerunning_the_agent() {
    let s = Scratch::new();
    let mark = s.tmp.path().join("mark");
    std::fs::create_dir(&mark).unwrap();
    let req = s.request("req.md", "- set the value\n");
    let (a, v) = (agent("fix-on-feedback.sh"), verify_script("slow-once.sh"));
    let mut child = s
        .cohort()
        .args([
            "run",
            req.to_str().unwrap(),
            "--no-sync",
            "--runtime",
            "host",
            "--agent",
            "command",
        ])
        .args(["--agent-command", &a, "--verify", &v])
        .env("COHORT_TEST_MARK", &mark)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !mark.join("verifying").exists() {
        assert!(t0.elapsed().as_secs() < 60, "the verify never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(s.status_json()["tasks"][0]["status"], "committed");
    let out = s
        .cohort()
        .args(["resume"])
        .env("COHORT_TEST_MARK", &mark)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    // The resumed verify ran (and passed: the second run of slow-once.sh), the agent did not
    // run again, and the task merged.
    let runs = std::fs::read_to_string(mark.join("verify-runs")).unwrap();
    let agent_runs = std::fs::read_to_string(mark.join("agent-runs")).unwrap();
    assert_eq!(agent_runs.lines().count(), 1, "{agent_runs}");
    assert!(runs.lines().count() >= 2, "{runs}");
    let r = report(&s);
    assert_eq!(r["tasks"][0]["status"], "merged", "{}", text(&out));
}

#[test]
fn kill_9_during_a_merge_verify_then_resume_does_not_redo_the_passed_task_verify() {
    let s = Scratch::new();
    let mark = s.tmp.path().join("mark");
    std::fs::create_dir(&mark).unwrap();
    let req = s.request("req.md", "- one\n- two\n");
    let (a, v) = (agent("slow.sh"), verify_script("hang-third.sh"));
    // Both tasks start from the same tip, so the second one's merge result is a new tree: the
    // third verify run is that merge's, after both task verifies passed.
    let mut child = s
        .cohort()
        .args([
            "run",
            req.to_str().unwrap(),
            "--no-sync",
            "--runtime",
            "host",
            "-j",
            "2",
        ])
        .args(["--agent", "command", "--agent-command", &a, "--verify", &v])
        .env("COHORT_TEST_MARK", &mark)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !mark.join("verifying").exists() {
        assert!(t0.elapsed().as_secs() < 60, "the merge verify never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = report(&s);
    let committed: Vec<_> = before["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["status"] == "committed")
        .collect();
    assert_eq!(committed.len(), 1, "{before}");
    let out = s
        .cohort()
        .args(["resume"])
        .env("COHORT_TEST_MARK", &mark)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    let r = report(&s);
    assert!(
        r["tasks"].as_array().unwrap().iter().all(|t| t["status"] == "merged"),
        "{r}"
    );
    // Four runs: two task verifies, the killed merge verify, and the merge verify again; the
    // task verify that had passed before the crash was not redone.
    let runs = std::fs::read_to_string(mark.join("verify-runs")).unwrap();
    assert_eq!(runs.lines().count(), 4, "{runs}");
    let merges = s.git(&["rev-list", "--first-parent", "--merges", "cohort/service"]);
    assert_eq!(merges.lines().count(), 2);
}

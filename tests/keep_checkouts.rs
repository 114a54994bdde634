//! Checkouts kept between runs (`[run] keep_checkouts`): reused by a tree diff in the next
//! run, never seen by git as worktrees, written anew when a killed run left them unvouched
//! for, and removed by `gc --checkouts`.

mod support;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use support::*;

fn keep_checkouts(s: &Scratch) {
    let dir = s.tmp.path().join(".config/cohort");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.toml"), "[run]\nkeep_checkouts = true\n").unwrap();
}

fn pool(s: &Scratch) -> PathBuf {
    s.work.join(".git/cohort/pool")
}

fn run_tasks(s: &Scratch, doc: &str, agent_name: &str, extra: &[&str]) -> std::process::Output {
    let req = s.request("req.md", doc);
    let a = agent(agent_name);
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
    ];
    args.extend(extra);
    s.run(&args)
}

/// `cohort status --json`'s disk use.
fn disk(s: &Scratch) -> serde_json::Value {
    let out = s.run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    v["disk"].clone()
}

fn inode(p: &std::path::Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .ino()
}

#[test]
fn a_second_run_moves_the_kept_checkouts_and_git_sees_no_worktree() {
    let s = Scratch::new();
    keep_checkouts(&s);
    let verify = format!("sh {}", fixture("verify/build-output.sh").display());
    let out = run_tasks(&s, &tasks_doc(4), "write.sh", &["-j", "2", "--verify", &verify]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.merged_tasks("cohort/service").len(), 4);
    let first_run = s.status_json()["run"]["id"].as_str().unwrap().to_string();

    // Two slots stay, each clean (its mark names the tree it holds, as the verify left it
    // with its ignored output removed), with a detached HEAD; the run's own directory has none.
    let checkouts = pool(&s).join("checkouts");
    let mut slots: Vec<String> = std::fs::read_dir(&checkouts)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    slots.sort();
    assert_eq!(slots, ["0", "1"]);
    for slot in &slots {
        let mark = std::fs::read_to_string(pool(&s).join("admin").join(slot).join("cohort-clean")).unwrap();
        assert_eq!(mark.trim().len(), 40, "slot {slot} is not marked clean: {mark:?}");
        let listed = s.git(&["ls-tree", "-r", "--name-only", mark.trim()]);
        let mut files: Vec<String> = support::files_under(&checkouts.join(slot))
            .iter()
            .map(|p| p.strip_prefix(checkouts.join(slot)).unwrap().display().to_string())
            .filter(|p| p != ".git")
            .collect();
        files.sort();
        let mut want: Vec<String> = listed.lines().map(str::to_string).collect();
        want.sort();
        assert_eq!(files, want, "slot {slot} holds exactly its tree");
        for f in &files {
            let blob = s.git(&["show", &format!("{}:{f}", mark.trim())]);
            assert_eq!(
                std::fs::read_to_string(checkouts.join(slot).join(f)).unwrap(),
                blob,
                "{slot}/{f}"
            );
        }
        let head = std::fs::read_to_string(pool(&s).join("admin").join(slot).join("HEAD")).unwrap();
        assert!(!head.starts_with("ref:"), "detached: {head}");
    }
    assert!(!s
        .work
        .join(".git/cohort/runs")
        .join(&first_run)
        .join("checkouts")
        .exists());
    let worktrees = s.git(&["worktree", "list", "--porcelain"]);
    assert_eq!(worktrees.matches("worktree ").count(), 1, "{worktrees}");
    // A task branch can be checked out by the user: git does not think it is in use.
    let branch = s.git(&["for-each-ref", "--format=%(refname:short)", "refs/heads/cohort/task/"]);
    let branch = branch.lines().next().unwrap();
    let elsewhere = s.tmp.path().join("elsewhere");
    s.git(&["worktree", "add", "-q", elsewhere.to_str().unwrap(), branch]);
    s.git(&["worktree", "remove", elsewhere.to_str().unwrap()]);

    // The second run moves the same checkouts: a file no task touches keeps its inode.
    let readme = checkouts.join("0/README.md");
    let before = inode(&readme);
    let doc: String = (1..=4).map(|i| format!("- second run task {i}\n")).collect();
    let out = run_tasks(&s, &doc, "write.sh", &["-j", "2", "--verify", &verify]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.merged_tasks("cohort/service").len(), 8);
    assert_eq!(inode(&readme), before, "the kept checkout was written anew");
    s.fsck();

    // status counts them; gc --checkouts removes them; the next run makes new ones.
    let kept = disk(&s)["kept_checkouts_bytes"].as_u64().unwrap();
    assert!(kept > 0 && kept <= disk(&s)["cohort_dir_bytes"].as_u64().unwrap());
    let out = s.run(&["gc", "--checkouts", "--dry-run"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("checkout"), "{}", text(&out));
    assert!(checkouts.join("0").exists(), "a dry run removes nothing");
    let out = s.run(&["gc", "--checkouts"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(!checkouts.join("0").exists() && !checkouts.join("1").exists() && !checkouts.join("seed").exists());
    let left = disk(&s)["kept_checkouts_bytes"].as_u64().unwrap();
    assert!(
        left < kept && left <= 4 * 4096,
        "only the empty pool directories are left: {left} of {kept}"
    );
    let out = run_tasks(&s, "- third run\n", "write.sh", &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.merged_tasks("cohort/service").len(), 9);
}

#[test]
fn a_checkout_left_by_a_killed_run_is_written_anew_not_trusted() {
    let s = Scratch::new();
    keep_checkouts(&s);
    let mark = s.tmp.path().join("mark");
    std::fs::create_dir(&mark).unwrap();
    let req = s.request("req.md", "- poison the readme\n");
    let a = agent("poison-and-hang.sh");
    let mut child = s
        .cohort()
        .args(["run", req.to_str().unwrap(), "--no-sync", "--runtime", "host"])
        .args(["--agent", "command", "--agent-command", &a])
        .env("COHORT_TEST_MARK", &mark)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !mark.join("poisoned").exists() {
        assert!(t0.elapsed().as_secs() < 60, "the agent never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL: cohort commits nothing, the slot stays as the agent left it
    child.wait().unwrap();
    let slot = pool(&s).join("checkouts/0");
    assert!(std::fs::read_to_string(slot.join("README.md"))
        .unwrap()
        .contains("poison"));

    // Another run, which takes the slot: its task starts from the service branch, not from
    // what the killed agent left.
    let out = run_tasks(&s, "- an honest task\n", "write.sh", &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let readme = s.git(&["show", "cohort/service:README.md"]);
    assert_eq!(readme, "# scratch\n");
    assert_eq!(std::fs::read_to_string(slot.join("README.md")).unwrap(), "# scratch\n");
    s.fsck();
}

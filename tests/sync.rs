//! The sync step on the user's own repository.

mod support;
use support::*;

fn run_write(s: &Scratch, extra: &[&str]) -> std::process::Output {
    let req = s.request("req.md", "- write one file\n");
    let mut args = vec!["run", req.to_str().unwrap(), "--agent-command"];
    let a = agent("write.sh");
    args.push(&a);
    args.extend(extra);
    s.run(&args)
}

#[test]
fn dirty_tree_is_snapshotted_honouring_gitignore() {
    let s = Scratch::new();
    s.write("README.md", "# changed\n");
    s.write("new/dir/file.txt", "untracked\n");
    s.write("build.log", "ignored\n");
    s.write("target/out.bin", "ignored too\n");
    std::fs::remove_file(s.work.join(".gitignore")).unwrap();
    s.write(".gitignore", "*.log\ntarget/\n"); // same content: not a change
    s.git(&["rm", "-q", "--cached", "README.md"]); // staged deletion, file still on disk
    let before = s.git(&["rev-parse", "HEAD"]);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let subject = s.git(&["log", "-1", "--format=%s", "main"]);
    assert!(subject.starts_with("cohort: snapshot before run "), "{subject}");
    assert_eq!(s.git(&["rev-parse", "main^"]), before);
    let files = s.git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(
        files.contains("new/dir/file.txt") && files.contains("README.md"),
        "{files}"
    );
    assert!(!files.contains("build.log") && !files.contains("target/"), "{files}");
    assert_eq!(s.git(&["show", "main:README.md"]), "# changed\n");
    // The working tree is clean and the ignored files are untouched.
    assert_eq!(s.git(&["status", "--porcelain"]), "");
    assert_eq!(s.read("build.log").unwrap(), "ignored\n");
    // Deleted files are committed as deletions.
    std::fs::remove_file(s.work.join("new/dir/file.txt")).unwrap();
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(!s
        .git(&["ls-tree", "-r", "--name-only", "main"])
        .contains("new/dir/file.txt"));
}

#[test]
fn no_remote_is_reported_and_the_run_goes_on() {
    let s = Scratch::local_only();
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("no remote 'origin'"), "{}", text(&out));
}

#[test]
fn fast_forwards_from_origin_and_updates_files() {
    let s = Scratch::new();
    let other = s.other_clone();
    std::fs::write(other.join("upstream.txt"), "from origin\n").unwrap();
    git_in(&other, &["add", "."]);
    git_in(&other, &["commit", "-q", "-m", "upstream change"]);
    git_in(&other, &["push", "-q", "origin", "main"]);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.git(&["rev-parse", "main"]), s.git(&["rev-parse", "origin/main"]));
    assert_eq!(s.read("upstream.txt").unwrap(), "from origin\n");
    assert_eq!(s.git(&["status", "--porcelain"]), "");
    // The service branch starts from the pulled commit.
    assert!(s
        .git(&["ls-tree", "--name-only", "cohort/service"])
        .contains("upstream.txt"));
}

#[test]
fn diverged_clean_merge_and_conflicting_divergence() {
    let s = Scratch::new();
    let other = s.other_clone();
    std::fs::write(other.join("theirs.txt"), "theirs\n").unwrap();
    git_in(&other, &["add", "."]);
    git_in(&other, &["commit", "-q", "-m", "their change"]);
    git_in(&other, &["push", "-q", "origin", "main"]);
    s.write("ours.txt", "ours\n"); // local, uncommitted: goes into the snapshot
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(
        s.git(&["log", "-1", "--format=%p", "main"]).split_whitespace().count(),
        2,
        "a merge commit"
    );
    assert_eq!(s.read("theirs.txt").unwrap(), "theirs\n");
    assert_eq!(s.read("ours.txt").unwrap(), "ours\n");
    assert_eq!(s.git(&["status", "--porcelain"]), "", "the merge leaves a clean tree");

    // Now both change README.md differently: refuse and touch nothing.
    std::fs::write(other.join("README.md"), "their readme\n").unwrap();
    git_in(&other, &["pull", "-q", "--no-rebase", "origin", "main"]);
    git_in(&other, &["commit", "-q", "-am", "their readme"]);
    git_in(&other, &["push", "-q", "origin", "main"]);
    s.write("README.md", "our readme\n");
    let head = s.git(&["rev-parse", "HEAD"]);
    let service = s.git(&["rev-parse", "cohort/service"]);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        text(&out).contains("diverged") && text(&out).contains("README.md"),
        "{}",
        text(&out)
    );
    assert_eq!(s.git(&["rev-parse", "HEAD"]), head, "HEAD must not move");
    assert_eq!(s.git(&["rev-parse", "cohort/service"]), service);
    assert_eq!(
        s.read("README.md").unwrap(),
        "our readme\n",
        "the local change is untouched"
    );
    assert_eq!(s.git(&["status", "--porcelain"]).trim(), "M README.md");
}

#[test]
fn secrets_are_refused_unless_allowed() {
    let s = Scratch::new();
    s.write(".env", "OPENAI_API_KEY=whatever\n");
    s.write("src/config.py", "KEY = 'test-secret-key-9f8e7d6c5b4a'\n");
    let head = s.git(&["rev-parse", "HEAD"]);
    let req = s.request("req.md", "- a task\n");
    let out = s
        .cohort()
        .env("OPENAI_API_KEY", "test-secret-key-9f8e7d6c5b4a")
        .args(["run", req.to_str().unwrap(), "--agent-command", &agent("write.sh")])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains(".env") && t.contains("src/config.py") && t.contains("--allow-file"),
        "{t}"
    );
    assert!(
        !t.contains("test-secret-key-9f8e7d6c5b4a"),
        "the key must not be echoed"
    );
    assert_eq!(s.git(&["rev-parse", "HEAD"]), head);
    assert!(s.git(&["branch", "--list", "cohort/*"]).is_empty());

    // Allowing both files lets the snapshot through.
    let out = s
        .cohort()
        .env("OPENAI_API_KEY", "test-secret-key-9f8e7d6c5b4a")
        .args(["run", req.to_str().unwrap(), "--agent-command", &agent("write.sh")])
        .args(["--allow-file", ".env", "--allow-file", "src/config.py"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    // The key never reached the state DB or logs.
    let cohort_dir = s.work.join(".git/cohort");
    for entry in files_under(&cohort_dir) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("test-secret-key-9f8e7d6c5b4a"),
            "{}",
            entry.display()
        );
    }
}

#[test]
fn no_sync_leaves_the_users_branch_alone() {
    let s = Scratch::new();
    s.write("README.md", "# dirty\n");
    let head = s.git(&["rev-parse", "HEAD"]);
    let out = run_write(&s, &["--no-sync"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.git(&["rev-parse", "HEAD"]), head);
    assert_eq!(s.read("README.md").unwrap(), "# dirty\n");
    assert_eq!(s.merged_tasks("cohort/service").len(), 1);
}

/// Runs git where it may fail (a conflicting merge exits 1), returning its output.
fn git_may_fail(s: &Scratch, args: &[&str]) -> std::process::Output {
    std::process::Command::new("git")
        .args(args)
        .current_dir(&s.work)
        .output()
        .unwrap()
}

/// What a refused run must leave exactly as it was.
fn repo_picture(s: &Scratch) -> Vec<String> {
    vec![
        s.git(&["rev-parse", "HEAD"]),
        s.git(&["symbolic-ref", "HEAD"]),
        s.git(&["ls-files", "-s"]),
        s.git(&["status", "--porcelain"]),
        s.read("README.md").unwrap_or_default(),
        s.git(&["for-each-ref", "--format=%(refname) %(objectname)", "refs/heads"]),
    ]
}

/// Every object in the object store, contents included (loose objects are zlib-compressed, so
/// grep on .git/objects would miss them).
fn all_objects(s: &Scratch) -> String {
    let out = git_may_fail(s, &["cat-file", "--batch-all-objects", "--batch"]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn an_unfinished_merge_is_refused_and_nothing_changes() {
    let s = Scratch::new();
    s.git(&["checkout", "-q", "-b", "other"]);
    s.write("README.md", "other side\n");
    s.git(&["commit", "-q", "-am", "other side"]);
    s.git(&["checkout", "-q", "main"]);
    s.write("README.md", "main side\n");
    s.git(&["commit", "-q", "-am", "main side"]);
    let merge = git_may_fail(&s, &["merge", "-q", "other"]);
    assert!(!merge.status.success(), "the merge must conflict");
    assert!(s.read("README.md").unwrap().contains("<<<<<<<"));
    let before = repo_picture(&s);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("merge") && t.contains("--abort") && t.contains("--no-sync"),
        "{t}"
    );
    assert_eq!(repo_picture(&s), before, "nothing may change");
    assert!(
        s.work.join(".git/MERGE_HEAD").exists(),
        "the merge is still the user's to finish"
    );
}

#[test]
fn conflicted_index_entries_without_a_merge_are_refused() {
    // `git stash pop` that conflicts leaves unmerged entries but no MERGE_HEAD.
    let s = Scratch::new();
    s.write("README.md", "stashed\n");
    s.git(&["stash", "-q"]);
    s.write("README.md", "committed\n");
    s.git(&["commit", "-q", "-am", "committed"]);
    let pop = git_may_fail(&s, &["stash", "pop", "-q"]);
    assert!(!pop.status.success(), "the pop must conflict");
    let before = repo_picture(&s);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("README.md"), "{}", text(&out));
    assert_eq!(repo_picture(&s), before, "nothing may change");
}

#[test]
fn a_service_branch_conflict_changes_nothing() {
    let s = Scratch::new();
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    // The service branch gets a README that conflicts with a local change.
    s.git(&["checkout", "-q", "cohort/service"]);
    s.write("README.md", "service readme\n");
    s.git(&["commit", "-q", "-am", "service readme"]);
    s.git(&["checkout", "-q", "main"]);
    s.write("README.md", "local readme\n");
    let before = repo_picture(&s);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("cohort/service") && t.contains("README.md"), "{t}");
    assert_eq!(repo_picture(&s), before, "nothing may change");
    assert_eq!(s.git(&["status", "--porcelain"]), " M README.md\n");
    assert!(!s.git(&["log", "--format=%s", "main"]).contains("cohort: snapshot"));
}

#[test]
fn a_bad_service_branch_name_is_a_usage_error_before_the_sync() {
    let s = Scratch::new();
    s.write("README.md", "local change\n");
    let before = repo_picture(&s);
    for bad in ["bad..name", "HEAD", "-dash", "with space", ""] {
        let out = run_write(&s, &[&format!("--service-branch={bad}")]);
        assert_eq!(code(&out), 2, "{bad:?}: {}", text(&out));
        assert!(text(&out).contains("--service-branch"), "{}", text(&out));
        assert_eq!(repo_picture(&s), before, "{bad:?}: nothing may change");
    }
    std::fs::write(s.work.join("cohort.toml"), "[run]\nservice_branch = \"a..b\"\n").unwrap();
    let before = repo_picture(&s);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("service_branch"), "{}", text(&out));
    assert_eq!(repo_picture(&s), before);
}

#[test]
fn refused_secrets_never_reach_the_object_store() {
    let s = Scratch::new();
    s.write(".env", "TOKEN=unique-env-value-7c41d9\n");
    s.write(
        "keys/deploy_key",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nunique-key-body-52ab0e\n-----END OPENSSH PRIVATE KEY-----\n",
    );
    s.write("notes.txt", "harmless-note-3f9d\n");
    let before = repo_picture(&s);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    let t = text(&out);
    assert!(t.contains(".env") && t.contains("keys/deploy_key"), "{t}");
    assert!(t.contains("private key"), "{t}");
    assert!(!t.contains("notes.txt"), "{t}");
    assert_eq!(repo_picture(&s), before, "nothing may change");
    assert!(s.git(&["branch", "--list", "cohort/*"]).is_empty());
    // Task checkouts share this object store: no blob of the refused change may be in it.
    let objects = all_objects(&s);
    for value in [
        "unique-env-value-7c41d9",
        "unique-key-body-52ab0e",
        "harmless-note-3f9d",
    ] {
        assert!(!objects.contains(value), "a blob holding {value} was written");
    }
}

#[test]
fn an_allow_file_that_matches_nothing_is_a_warning() {
    let s = Scratch::new();
    s.write("new.txt", "new\n");
    let out = run_write(&s, &["--allow-file", "no/such/file.env"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning") && err.contains("no/such/file.env"), "{err}");
}

#[test]
fn named_env_files_are_refused_too() {
    let s = Scratch::new();
    s.write("deploy/prod.env", "DB_PASSWORD=hunter2\n");
    let before = repo_picture(&s);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("deploy/prod.env"), "{}", text(&out));
    assert_eq!(repo_picture(&s), before);
}

#[test]
fn an_ignored_env_file_does_not_stop_the_run() {
    let s = Scratch::new();
    s.write(".gitignore", "*.log\ntarget/\n.env\n");
    s.write(".env", "OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwxyz\n");
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let files = s.git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(!files.lines().any(|f| f == ".env"), "{files}");
    assert_eq!(s.git(&["show", "main:.gitignore"]), "*.log\ntarget/\n.env\n");
    assert!(s.read(".env").unwrap().starts_with("OPENAI_API_KEY="));
}

#[test]
fn a_branch_without_upstream_is_reported_and_the_run_goes_on() {
    let s = Scratch::new();
    s.git(&["checkout", "-q", "-b", "feature"]);
    s.write("feature.txt", "local\n");
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        text(&out).contains("feature has no upstream on origin"),
        "{}",
        text(&out)
    );
    assert!(s
        .git(&["log", "-1", "--format=%s", "feature"])
        .starts_with("cohort: snapshot before run "));
    assert_eq!(s.merged_tasks("cohort/service").len(), 1);
}

#[test]
fn head_is_merged_into_a_diverged_service_branch() {
    let s = Scratch::new();
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    // The service branch moves on by itself (task 1 and a commit of its own), and so does main.
    s.git(&["checkout", "-q", "cohort/service"]);
    s.write("service-only.txt", "service\n");
    s.git(&["add", "service-only.txt"]);
    s.git(&["commit", "-q", "-m", "service only"]);
    s.git(&["checkout", "-q", "main"]);
    s.write("main-only.txt", "main\n");
    s.git(&["add", "main-only.txt"]);
    s.git(&["commit", "-q", "-m", "main only"]);
    let service_before = s.git(&["rev-parse", "cohort/service"]);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        text(&out).contains("service branch cohort/service: merged"),
        "{}",
        text(&out)
    );
    let service_before = service_before.trim();
    let main = s.git(&["rev-parse", "main"]);
    let main = main.trim();
    // Both lines of history are in the service branch, joined by cohort's merge commit.
    for (ancestor, what) in [(service_before, "the old service tip"), (main, "HEAD")] {
        let ok = git_may_fail(&s, &["merge-base", "--is-ancestor", ancestor, "cohort/service"]);
        assert!(ok.status.success(), "{what} is not in the service branch");
    }
    let subjects = s.git(&["log", "--first-parent", "--format=%s", "cohort/service"]);
    assert!(
        subjects
            .lines()
            .any(|l| l.starts_with("cohort: merge ") && l.ends_with("into cohort/service")),
        "{subjects}"
    );
    let files = s.git(&["ls-tree", "--name-only", "cohort/service"]);
    for f in ["service-only.txt", "main-only.txt", "task-001.txt"] {
        assert!(files.lines().any(|l| l == f), "{f} missing: {files}");
    }
}

#[test]
fn dash_c_runs_in_the_named_repository() {
    let s = Scratch::new();
    let req = s.request("req.md", "- write one file\n");
    let elsewhere = tempfile::tempdir().unwrap();
    let out = s
        .cohort()
        .current_dir(elsewhere.path())
        .args(["-C", s.work.to_str().unwrap(), "run", req.to_str().unwrap()])
        .args(["--agent-command", &agent("write.sh")])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.merged_tasks("cohort/service").len(), 1);
    assert!(s
        .git(&["ls-tree", "--name-only", "cohort/service"])
        .contains("task-001.txt"));
    assert_eq!(
        std::fs::read_dir(elsewhere.path()).unwrap().count(),
        0,
        "nothing written elsewhere"
    );
}

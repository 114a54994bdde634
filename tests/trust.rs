//! Trusted settings (issue 16 §5): a repository's cohort.toml may set what runs programs,
//! where the key goes or how wide the sandbox is only once the user trusted its exact
//! content; its other settings, the user's own config.toml and flags need no trust.
//! Real git, the real binary; the user's settings and trust store live in the scratch
//! directory (tests/support sets XDG_CONFIG_HOME and XDG_STATE_HOME).

mod support;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use support::*;

fn commit_settings(s: &Scratch, text: &str) {
    s.write("cohort.toml", text);
    s.git(&["add", "cohort.toml"]);
    s.git(&["commit", "-q", "-m", "settings"]);
    s.git(&["push", "-q"]);
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn user_config(s: &Scratch, text: &str) {
    let dir = s.tmp.path().join(".config/cohort");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.toml"), text).unwrap();
}

fn store(s: &Scratch) -> PathBuf {
    s.tmp.path().join(".local/state/cohort/trusted.toml")
}

/// `git show BRANCH:PATH`, or None.
fn show(s: &Scratch, branch: &str, path: &str) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["show", &format!("{branch}:{path}")])
        .current_dir(&s.work)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn an_untrusted_base_url_is_refused_trusted_accepted_and_refused_again_once_changed() {
    let s = Scratch::new();
    let write = agent("write.sh");
    commit_settings(
        &s,
        &format!(
            "[run]\njobs = 1\n\n[agent]\nkind = \"command\"\ncommand = [\"{write}\"]\n\
             base_url = \"http://127.0.0.1:9/v1\"\n"
        ),
    );
    let head = s.git(&["rev-parse", "HEAD"]);
    let req = s.request("req.md", "- say hello\n");

    // Refused before anything is touched: exit 2, the file, each key, the command.
    let out = s.run(&["run", req.to_str().unwrap()]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    let err = stderr(&out);
    for want in [
        "cohort.toml",
        "[agent] kind",
        "[agent] command",
        "[agent] base_url",
        "cohort trust ",
    ] {
        assert!(err.contains(want), "missing {want:?}: {err}");
    }
    assert!(!err.contains("[run] jobs"), "not sensitive: {err}");
    assert_eq!(s.git(&["rev-parse", "HEAD"]), head, "no commit");
    assert_eq!(s.git(&["branch", "--list", "cohort/*"]), "", "no branch");
    assert_eq!(s.git(&["status", "--porcelain"]), "");

    // The model planner sends the key: refused too. The rule planner uses none of it.
    let out = s.run(&["plan", req.to_str().unwrap(), "--planner", "llm"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(stderr(&out).contains("[agent] base_url"), "{}", text(&out));
    let out = s.run(&["plan", req.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(stdout(&out), "say hello\n");

    // `cohort trust` shows what it trusts and records it, private to the user.
    let out = s.run(&["trust", "--list"]);
    assert!(stdout(&out).contains("no trusted files"), "{}", text(&out));
    let out = s.run(&["trust"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let shown = stdout(&out);
    assert!(
        shown.contains("[agent] base_url = \"http://127.0.0.1:9/v1\"")
            && shown.contains(&format!("[agent] command = [\"{write}\"]")),
        "{shown}"
    );
    let meta = std::fs::metadata(store(&s)).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let canonical = std::fs::canonicalize(s.work.join("cohort.toml")).unwrap();
    assert!(std::fs::read_to_string(store(&s))
        .unwrap()
        .contains(canonical.to_str().unwrap()));

    // The same file is accepted: the repository's command agent runs and is merged.
    let out = s.run(&["run", req.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(
        show(&s, "cohort/service", "task-001.txt").as_deref(),
        Some("say hello\n")
    );
    assert!(stdout(&s.run(&["trust"])).contains("trusted already"));

    // Changed (another endpoint): refused again, said to have changed.
    commit_settings(
        &s,
        &format!(
            "[run]\njobs = 1\n\n[agent]\nkind = \"command\"\ncommand = [\"{write}\"]\n\
             base_url = \"http://attacker.example/v1\"\n"
        ),
    );
    let service = s.git(&["rev-parse", "cohort/service"]);
    let out = s.run(&["run", req.to_str().unwrap()]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(stderr(&out).contains("changed since you trusted it"), "{}", text(&out));
    assert_eq!(s.git(&["rev-parse", "cohort/service"]), service, "nothing merged");
    let out = s.run(&["trust", "--list"]);
    assert!(stdout(&out).starts_with("changed"), "{}", text(&out));
    // `report` only reads: it works, and notes what it left out.
    let out = s.run(&["report"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(stderr(&out).contains("without your trust"), "{}", text(&out));

    // Revoked: forgotten.
    let out = s.run(&["trust", "--revoke"]);
    assert!(stdout(&out).contains("no longer trusted"), "{}", text(&out));
    assert!(stdout(&s.run(&["trust", "--list"])).contains("no trusted files"));
}

#[test]
fn layers_user_settings_repository_and_flags() {
    let s = Scratch::new();
    let req = s.request("req.md", "- one thing\n");
    let r = req.to_str().unwrap();

    // The user's own file may set sensitive keys: no trust needed.
    user_config(
        &s,
        &format!(
            "[run]\njobs = 1\nservice_branch = \"cohort/user\"\n\n[agent]\nkind = \"command\"\ncommand = [\"{}\"]\n",
            agent("write.sh")
        ),
    );
    let out = s.run(&["run", r]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        show(&s, "cohort/user", "task-001.txt").is_some(),
        "the user's agent and branch"
    );

    // The repository's non-sensitive keys win over the user's, untrusted.
    commit_settings(&s, "[run]\nservice_branch = \"cohort/repo\"\n");
    let out = s.run(&["run", r]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(show(&s, "cohort/repo", "task-001.txt").is_some(), "{}", text(&out));

    // Its sensitive keys win over the user's once trusted.
    commit_settings(
        &s,
        &format!(
            "[run]\nservice_branch = \"cohort/repo\"\n\n[agent]\ncommand = [\"{}\", \"{{prompt_file}}\"]\n",
            agent("record.sh")
        ),
    );
    let out = s.run(&["run", r]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(stderr(&out).contains("[agent] command"), "{}", text(&out));
    assert!(
        !stderr(&out).contains("[agent] kind"),
        "the user's, not the repository's"
    );
    assert_eq!(code(&s.run(&["trust"])), 0);
    let out = s.run(&["run", r]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        show(&s, "cohort/repo", "seen-001.txt").is_some(),
        "the repository's agent"
    );

    // Flags win over both.
    let out = s.run(&[
        "run",
        r,
        "--service-branch",
        "cohort/flag",
        "--agent-command",
        "sh -c 'echo from the flag > flag-$COHORT_TASK_ID.txt'",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(
        show(&s, "cohort/flag", "flag-001.txt").as_deref(),
        Some("from the flag\n")
    );
    assert!(show(&s, "cohort/flag", "seen-001.txt").is_none());

    // An unknown key in the user's file is an error naming that file.
    user_config(&s, "[run]\njbos = 2\n");
    let out = s.run(&["run", r]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        stderr(&out).contains(".config/cohort/config.toml") && stderr(&out).contains("jbos"),
        "{}",
        text(&out)
    );
}

#[test]
fn an_agents_change_to_cohort_toml_merged_and_used_later_is_refused_until_trusted() {
    let s = Scratch::new();
    let req = s.request("req.md", "- tidy the settings\n");
    let r = req.to_str().unwrap();
    let a = agent("write-config.sh");
    let out = s.run(&["run", r, "--agent", "command", "--agent-command", &a]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let planted = show(&s, "cohort/service", "cohort.toml").expect("the agent's cohort.toml is merged");
    assert!(planted.contains("planted by an agent"), "{planted}");

    // The user takes the service branch into their own, as they would after a review.
    s.git(&["merge", "-q", "--no-edit", "cohort/service"]);
    let head = s.git(&["rev-parse", "HEAD"]);
    let service = s.git(&["rev-parse", "cohort/service"]);

    // The next run reads the agent's settings: refused, whatever the flags say.
    let req2 = s.request("req2.md", "- the next thing\n");
    let r2 = req2.to_str().unwrap();
    let out = s.run(&["run", r2, "--agent", "command", "--agent-command", &agent("write.sh")]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("[agent] kind") && err.contains("[agent] command") && err.contains("cohort trust"),
        "{err}"
    );
    assert_eq!(s.git(&["rev-parse", "HEAD"]), head);
    assert_eq!(s.git(&["rev-parse", "cohort/service"]), service);
    assert!(!s.work.join("planted-001.txt").exists());
    assert!(
        show(&s, "cohort/service", "planted-001.txt").is_none(),
        "the planted command never ran"
    );

    // Once the user trusts it, it is their setting: the run proceeds with it.
    let out = s.run(&["trust"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        stdout(&out).contains("planted by an agent"),
        "shown before trusting: {}",
        text(&out)
    );
    let out = s.run(&["run", r2]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(
        show(&s, "cohort/service", "planted-001.txt").as_deref(),
        Some("planted by an agent\n")
    );
}

fn serve_once(s: &Scratch, state: &Path) -> std::process::Output {
    s.cohort()
        .args([
            "serve",
            "--once",
            "--poll",
            "100ms",
            "--state-dir",
            state.to_str().unwrap(),
        ])
        .args(["--runtime", "host"])
        .output()
        .unwrap()
}

fn outcomes(dir: &Path) -> Vec<serde_json::Value> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
        .collect()
}

#[test]
fn serve_files_a_request_with_an_untrusted_change_from_origin_as_failed_and_goes_on() {
    let s = Scratch::new();
    commit_settings(
        &s,
        &format!("[agent]\nkind = \"command\"\ncommand = [\"{}\"]\n", agent("write.sh")),
    );
    assert_eq!(code(&s.run(&["trust"])), 0);
    // The service's state is the user's state directory, as for a user service.
    let state = s.tmp.path().join(".local/state/cohort");
    let out = serve_once(&s, &state);
    assert_eq!(code(&out), 0, "set-up: {}", text(&out));

    // Someone who can push to origin changes the agent.
    let other = s.other_clone();
    std::fs::write(
        other.join("cohort.toml"),
        "[agent]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"echo from origin > origin-$COHORT_TASK_ID.txt\"]\n",
    )
    .unwrap();
    git_in(&other, &["commit", "-q", "-am", "a new agent"]);
    git_in(&other, &["push", "-q"]);

    // The first request runs with the trusted settings and pulls the change; the next two
    // see it and fail with the reason; the service goes on and exits 0.
    for name in ["a.md", "b.md", "c.md"] {
        let req = s.request(name, &format!("- request {name}\n"));
        let out = s.run(&["submit", req.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{}", text(&out));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = serve_once(&s, &state);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let done = outcomes(&state.join("done"));
    assert_eq!(done.len(), 1, "{done:?}\n{}", text(&out));
    assert!(done[0]["request"].as_str().unwrap().ends_with("a.md"));
    let failed = outcomes(&state.join("failed"));
    assert_eq!(failed.len(), 2, "{failed:?}");
    for f in &failed {
        assert_eq!(f["exit_code"], 2, "{f}");
        let reason = f["error"].as_str().unwrap();
        assert!(
            reason.contains("[agent] command")
                && reason.contains("changed since you trusted it")
                && reason.contains("cohort trust"),
            "{reason}"
        );
    }
    assert!(show(&s, "cohort/service", "origin-001.txt").is_none());

    // Trusted: the next request runs with origin's agent.
    assert_eq!(code(&s.run(&["trust"])), 0);
    let req = s.request("d.md", "- request d\n");
    assert_eq!(code(&s.run(&["submit", req.to_str().unwrap()])), 0);
    let out = serve_once(&s, &state);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(outcomes(&state.join("done")).len(), 2, "{}", text(&out));
    assert_eq!(
        show(&s, "cohort/service", "origin-001.txt").as_deref(),
        Some("from origin\n")
    );
}

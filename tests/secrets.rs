//! What a task hands back is scanned like the sync snapshot, before any of its blobs is
//! written: a task whose change holds the API key, a private key block, a token shape or a
//! `.env` file ends as `secret`, is not committed or merged, and the secret's bytes are in no
//! object of the repository, also when the agent committed it itself and removed the file.

mod support;

use support::*;

const KEY: &str = "sk-cohort-test-SECRET-0a1b2c3d4e5f6789";

/// Every object of the repository, contents included, as `git cat-file` prints them.
fn all_objects(s: &Scratch) -> Vec<u8> {
    let out = git_cmd()
        .args(["cat-file", "--batch-all-objects", "--batch", "--unordered"])
        .current_dir(&s.work)
        .output()
        .unwrap();
    assert!(out.status.success());
    // Loose objects are zlib-compressed on disk; cat-file prints them inflated.
    out.stdout
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn a_task_that_hands_back_a_secret_ends_as_secret() {
    let s = Scratch::new();
    let agent = s.tmp.path().join("agent.sh");
    // The agent knows the key some way (a file it read, a prompt injection): cohort keeps the
    // key out of its environment, so the script carries it.
    std::fs::write(
        &agent,
        r#"#!/bin/sh
LEAK=sk-cohort-test-SECRET-0a1b2c3d4e5f6789
echo "honest $1" > "work-$COHORT_TASK_ID.txt"
case $1 in
key) printf 'config: %s\n' "$LEAK" > leak.txt ;;
env) printf 'A=1\n' > .env ;;
token) echo 'TOKEN = "ghp_abcdefghijklmnopqrstuvwxyz0123456789"' > conf.py ;;
committed)
    printf 'key=%s\n' "$LEAK" > stash.txt
    git add stash.txt && git commit -q -m "keep this" && git rm -q stash.txt && git commit -q -m "and forget it" ;;
clean) (env | grep -c sk-cohort-test-SECRET || true) >> "work-$COHORT_TASK_ID.txt" ;;
esac
"#,
    )
    .unwrap();
    let tasks = s.request("tasks.txt", "key\nenv\ntoken\ncommitted\nclean\n");
    let prompt = s.request("prompt.txt", "{task}\n");
    let cmd = format!("sh {} {{task}}", agent.display());
    let out = s
        .cohort()
        .env("OPENAI_API_KEY", KEY)
        .env("LEAK", KEY) // never reaches the agent: it holds the key's value
        .args(["run", "--runtime", "host", "--agent", "command", "-j", "2"])
        .args(["--agent-command", &cmd, "--tasks"])
        .arg(&tasks)
        .arg("--prompt")
        .arg(&prompt)
        .output()
        .unwrap();
    assert_eq!(code(&out), 1, "{}", text(&out));
    let report = s.status_json();
    let task = |n: usize| report["tasks"][n - 1].clone();
    for (n, file, what) in [
        (1, "leak.txt", "the configured API key"),
        (2, ".env", ".env-style file"),
        (3, "conf.py", "GitHub token"),
        (4, "stash.txt", "the configured API key"),
    ] {
        let t = task(n);
        assert_eq!(t["status"], "secret", "task {n}: {t}");
        let reason = t["reason"].as_str().unwrap();
        assert!(reason.contains(file) && reason.contains(what), "task {n}: {reason}");
        assert!(!reason.contains(KEY), "the reason repeats the key");
        assert_eq!(t["merge_commit"], serde_json::Value::Null, "task {n} merged");
    }
    assert_eq!(task(5)["status"], "merged");
    assert!(
        !contains(&all_objects(&s), KEY),
        "the key is in an object of the repository"
    );
    assert!(!contains(&all_objects(&s), "ghp_abcdefghijklmnopqrstuvwxyz0123456789"));
    let logs = files_under(&s.work.join(".git/cohort"));
    for f in logs {
        if f.ends_with("agent.sh") {
            continue;
        }
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(!contains(&bytes, KEY), "the key is in {}", f.display());
    }
}

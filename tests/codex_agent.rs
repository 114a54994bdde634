//! The real Codex CLI (pinned, from npm) as the agent, against the local
//! OpenAI stand-in (real HTTP, real SSE).

mod support;
use cohort_standin::{Mode, Options, Standin};
use support::*;

const KEY: &str = "sk-cohort-test-key-5d41402abc4b2a76b9719d911017c592";

/// A config outside the repository (so the snapshot does not commit it). codex runs through
/// a wrapper that records the environment it was given (outside the repository too).
fn config(s: &Scratch) -> std::path::PathBuf {
    let wrapper = s.tmp.path().join("codex-recording-env.sh");
    let envs = s.tmp.path().join("envs");
    std::fs::create_dir_all(&envs).unwrap();
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nenv > {}/$$.env\nexec {} \"$@\"\n", envs.display(), codex()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = s.tmp.path().join("cohort.toml");
    std::fs::write(
        &p,
        format!("[agent]\nkind = \"codex\"\nmodel = \"gpt-5-codex\"\ncodex_path = {wrapper:?}\n"),
    )
    .unwrap();
    p
}

/// The environments codex was started with, one per attempt.
fn codex_envs(s: &Scratch) -> Vec<String> {
    files_under(&s.tmp.path().join("envs"))
        .into_iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect()
}

fn run_codex(s: &Scratch, standin: &Standin, doc: &str) -> std::process::Output {
    let req = s.request("req.md", doc);
    let cfg = config(s);
    let base = standin.base_url();
    s.cohort()
        .env("OPENAI_API_KEY", KEY)
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "run",
            req.to_str().unwrap(),
            "-j",
            "2",
            "--base-url",
            &base,
        ])
        .output()
        .unwrap()
}

#[test]
fn codex_tasks_merge_and_the_key_goes_only_to_the_api() {
    let standin = Standin::start(Options::default()).unwrap();
    let s = Scratch::new();
    let out = run_codex(&s, &standin, "- add a greeting file\n- add a farewell file\n");
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.merged_tasks("cohort/service").len(), 2);
    let files = s.git(&["ls-tree", "--name-only", "cohort/service"]);
    assert!(files.lines().filter(|f| f.ends_with(".txt")).count() >= 2, "{files}");

    // Thread id, commands and token usage were recorded and reported.
    let report = s.status_json();
    for t in report["tasks"].as_array().unwrap() {
        assert_eq!(t["status"], "merged", "{t}");
        assert!(t["tokens"]["output"].as_u64().unwrap() > 0, "{t}");
        assert!(t["thread_id"].as_str().is_some_and(|id| !id.is_empty()), "{t}");
    }
    let log = String::from_utf8(s.run(&["logs", "1"]).stdout).unwrap();
    assert!(
        log.contains("thread.started") && log.contains("turn.completed"),
        "{log}"
    );
    assert!(log.contains("model gpt-5-codex"), "{log}");

    // The key reached the API only as a bearer header.
    let records = standin.records();
    let posts: Vec<_> = records.iter().filter(|r| r["method"] == "POST").collect();
    assert!(!posts.is_empty());
    for r in &records {
        let auth = r["headers"]["authorization"].as_str().unwrap_or_default();
        assert_eq!(auth, format!("Bearer {KEY}"), "{r}");
        let mut without = r.clone();
        without["headers"]["authorization"] = serde_json::Value::Null;
        assert!(!without.to_string().contains(KEY), "the key leaked into a request: {r}");
    }
    // ... and nowhere on disk: state DB, logs, codex homes, commits.
    for f in files_under(&s.work.join(".git")) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "key found in {}",
            f.display()
        );
    }
    let all = s.git(&["log", "--all", "-p", "--format=%B"]);
    assert!(!all.contains(KEY));

    // codex held no key: a per-task token for cohort's gateway, its base URL on loopback.
    let envs = codex_envs(&s);
    assert_eq!(envs.len(), 2, "one codex per task");
    let mut tokens = Vec::new();
    for env in &envs {
        assert!(!env.contains(KEY), "codex was given the key:\n{env}");
        let token = env
            .lines()
            .find_map(|l| l.strip_prefix("COHORT_CODEX_KEY="))
            .expect("codex's provider token");
        assert!(token.starts_with("cohort-") && token.len() > 40, "{token}");
        assert!(env.contains("OPENAI_BASE_URL=http://127.0.0.1:"), "{env}");
        tokens.push(token.to_string());
    }
    assert_ne!(tokens[0], tokens[1], "each task has its own token");
    for r in &records {
        let body = r.to_string();
        assert!(
            tokens.iter().all(|t| !body.contains(t.as_str())),
            "a token reached the endpoint: {r}"
        );
    }
    // The gateway counted what codex spent, request by request, beside codex's own figures.
    for t in report["tasks"].as_array().unwrap() {
        let g = &t["gateway"];
        assert_eq!(g["requests"], 2, "{t}");
        assert_eq!(g["input"], t["tokens"]["input"], "{t}");
        assert_eq!(g["output"], t["tokens"]["output"], "{t}");
    }
    let spend = &report["spend"];
    assert_eq!(spend["requests"], 4, "{report}");
    assert_eq!(spend["output"], 2 * 75, "{report}");
}

#[test]
fn codex_failures_fail_the_task_with_the_reason() {
    let standin = Standin::start(Options {
        mode: Mode::Fail,
        ..Options::default()
    })
    .unwrap();
    let s = Scratch::new();
    let out = run_codex(&s, &standin, "- this will fail\n");
    assert_eq!(code(&out), 1, "{}", text(&out));
    let report = s.status_json();
    let t = &report["tasks"][0];
    assert_eq!(t["status"], "failed");
    let reason = t["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("codex exited with code 1: ") && reason.len() > 30,
        "{t}"
    );
}

#[test]
fn a_model_the_endpoint_does_not_offer_fails_before_any_task() {
    let opts = Options {
        models: Some(vec!["other-model".into()]),
        ..Options::default()
    };
    let standin = Standin::start(opts).unwrap();
    let s = Scratch::new();
    let out = run_codex(&s, &standin, "- anything\n");
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("gpt-5-codex"), "{}", text(&out));
    assert!(
        standin.records().iter().all(|r| r["path"] != "/v1/responses"),
        "no task may start"
    );
}

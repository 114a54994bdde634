//! The verify gate with the real Codex CLI (pinned) against the stand-in: the first turn
//! breaks the check, cohort hands the failure back with `codex exec resume <thread>`, and the
//! resumed conversation, seeing the failure, fixes it.

mod support;
use cohort_standin::{Options, Standin};
use support::*;

const KEY: &str = "sk-cohort-test-key-verify-0123456789abcdef";

#[test]
fn codex_resumes_its_thread_with_the_failure_and_fixes_it() {
    let standin = Standin::start(Options::default()).unwrap();
    let s = Scratch::new();
    let cfg = s.request(
        "cohort.toml",
        &format!(
            "[agent]\nkind = \"codex\"\nmodel = \"gpt-5-codex\"\ncodex_path = {:?}\n",
            codex()
        ),
    );
    let tasks = s.request("tasks.txt", "set the value\n");
    let prompt = s.request(
        "prompt.txt",
        "Task: {task}\nSTANDIN-CMD: echo broken > value.txt\nSTANDIN-FIX: echo ok > value.txt\n",
    );
    let verify =
        "sh -c 'test \"$(cat value.txt)\" = ok || { echo \"value.txt is broken: $(cat value.txt)\"; exit 1; }'";
    let out = s
        .cohort()
        .env("OPENAI_API_KEY", KEY)
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "run",
            "--no-sync",
            "--runtime",
            "host",
        ])
        .args(["--tasks", tasks.to_str().unwrap(), "--prompt", prompt.to_str().unwrap()])
        .args(["--base-url", &standin.base_url(), "--verify", verify])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.git(&["show", "cohort/service:value.txt"]), "ok\n");
    let r = s.status_json();
    let t = &r["tasks"][0];
    assert_eq!(t["attempts"], 1, "{t}");
    let v = t["verifies"].as_array().unwrap();
    assert_eq!(v.len(), 2, "{v:?}");
    assert_eq!(
        (v[0]["passed"].as_bool(), v[1]["passed"].as_bool()),
        (Some(false), Some(true))
    );

    let records = standin.records();
    let turns: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["path"] == "/v1/responses")
        .map(|r| &r["body"])
        .collect();
    assert_eq!(turns.len(), 4, "two turns of two requests each");
    let prompts = |b: &serde_json::Value| cohort_standin::prompts(b);
    // The resumed turn: the same conversation (the first turn's prompt and tool output are
    // in it), and a new prompt carrying the failure.
    let resumed = turns[2];
    let all = prompts(resumed);
    assert_eq!(all.len(), 2, "{resumed}");
    assert!(all[0].1.contains("Task: set the value"), "{:?}", all[0]);
    assert!(all[1].1.contains("value.txt is broken: broken"), "{:?}", all[1]);
    assert!(all[1].1.contains("exited with code 1"), "{:?}", all[1]);
    assert!(
        resumed.to_string().contains("function_call_output"),
        "the first turn's tool call is in it"
    );
    let key = |b: &serde_json::Value| b["prompt_cache_key"].clone();
    assert!(key(resumed).is_string(), "{resumed}");
    assert_eq!(key(turns[0]), key(resumed), "one conversation");
    // Never the key in what cohort kept.
    let state = std::fs::read(s.work.join(".git/cohort/state.db")).unwrap();
    assert!(!String::from_utf8_lossy(&state).contains(KEY));
}

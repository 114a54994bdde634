//! `cohort plan --planner llm` through the binary, against the stand-in.

mod support;
use cohort_standin::{Mode, Options, Standin};
use support::*;

const KEY: &str = "sk-cohort-planner-test-0123456789abcdef";

fn plan(s: &Scratch, standin: &Standin, doc: &str, out: &std::path::Path) -> std::process::Output {
    let req = s.request("req.md", doc);
    s.cohort()
        .env("OPENAI_API_KEY", KEY)
        .env("COHORT_LOG", "cohort=debug")
        .args([
            "plan",
            req.to_str().unwrap(),
            "--planner",
            "llm",
            "--model",
            "gpt-5-nano",
        ])
        .args(["--base-url", &standin.base_url(), "-o", out.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn llm_plan_writes_a_validated_plan() {
    let standin = Standin::start(Options::default()).unwrap();
    let s = Scratch::new();
    let out_dir = s.tmp.path().join("plan");
    let out = plan(&s, &standin, "- add a login page\n- write the docs\n", &out_dir);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let tasks = std::fs::read_to_string(out_dir.join("tasks.txt")).unwrap();
    assert!(tasks.contains("login") && tasks.contains("docs"), "{tasks}");
    assert!(std::fs::read_to_string(out_dir.join("prompt.txt"))
        .unwrap()
        .contains("{task}"));
    let records = standin.records();
    let chat = records
        .iter()
        .find(|r| r["path"] == "/v1/chat/completions")
        .expect("a chat request");
    assert_eq!(chat["body"]["model"], "gpt-5-nano");
    assert_eq!(chat["body"]["response_format"]["type"], "json_schema");
    assert_eq!(chat["headers"]["authorization"], format!("Bearer {KEY}"));
    // The planner spoke to cohort's gateway, which added the key on the way out.
    assert!(
        text(&out).contains("planning through the model gateway"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains(KEY));
}

#[test]
fn an_invalid_plan_twice_exits_2_and_writes_nothing() {
    let standin = Standin::start(Options {
        mode: Mode::InvalidPlan,
        ..Options::default()
    })
    .unwrap();
    let s = Scratch::new();
    let out_dir = s.tmp.path().join("plan");
    let out = plan(&s, &standin, "- a task\n", &out_dir);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("{task}"), "{}", text(&out));
    assert!(!out_dir.exists(), "no half-written plan");
    assert!(!text(&out).contains(KEY));
}

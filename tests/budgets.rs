//! Token budgets at the gateway, with the real codex against the stand-in (every codex turn
//! here is two requests: 1000 in / 50 out, then 1200 in / 25 out; fixtures/standin/README.md).
//! A task over its budget is refused its next request and ends as `over budget`, its work
//! committed on its branch and not merged; a run over its budget starts no new task.

mod support;
use cohort_standin::{Options, Standin};
use support::*;

const KEY: &str = "sk-cohort-test-key-budget-0123456789abcdef";

fn run_with_budget(s: &Scratch, standin: &Standin, budget: &str, doc: &str) -> std::process::Output {
    let cfg = s.tmp.path().join("cohort.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nkind = \"codex\"\nmodel = \"gpt-5-codex\"\ncodex_path = {:?}\n\n[run]\nbudget = {budget}\n",
            codex()
        ),
    )
    .unwrap();
    let req = s.request("req.md", doc);
    s.cohort()
        .env("OPENAI_API_KEY", KEY)
        .args(["--config", cfg.to_str().unwrap(), "run", "-j", "1", "--runtime", "host"])
        .arg(&req)
        .args(["--base-url", &standin.base_url()])
        .output()
        .unwrap()
}

#[test]
fn a_task_budget_stops_the_task_mid_run() {
    let standin = Standin::start(Options::default()).unwrap();
    let s = Scratch::new();
    // 1000 tokens: the first request (1050) crosses it, the second is refused.
    let out = run_with_budget(&s, &standin, "{ task = \"1000\" }", "- write the greeting\n");
    assert_eq!(code(&out), 1, "{}", text(&out));
    let report = s.status_json();
    let t = &report["tasks"][0];
    assert_eq!(t["status"], "over budget", "{t}");
    assert!(t["reason"].as_str().unwrap().contains("budget"), "{t}");
    // The tool call of the first request ran: its file is committed on the branch, not merged.
    assert!(!t["files_changed"].as_array().unwrap().is_empty(), "{t}");
    assert_eq!(t["merge_commit"], serde_json::Value::Null);
    assert!(s.merged_tasks("cohort/service").is_empty());
    assert_eq!(t["gateway"]["requests"], 1, "one request forwarded: {t}");
    let posts = standin
        .records()
        .iter()
        .filter(|r| r["path"] == "/v1/responses")
        .count();
    assert_eq!(posts, 1, "the refused request never reached the endpoint");
    let log = String::from_utf8(s.run(&["logs", "1"]).stdout).unwrap();
    assert!(log.contains("over the task budget of 1000 tokens"), "{log}");
}

#[test]
fn a_run_budget_starts_no_new_task() {
    let standin = Standin::start(Options::default()).unwrap();
    let s = Scratch::new();
    // 2000 tokens: the first task's turn (2275) spends it; the next tasks do not start.
    let out = run_with_budget(
        &s,
        &standin,
        "{ run = \"2000\" }",
        "- first task\n- second task\n- third task\n",
    );
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("budget"), "{}", text(&out));
    let report = s.status_json();
    assert_eq!(report["tasks"][0]["status"], "merged", "{report}");
    for i in 1..3 {
        assert_eq!(report["tasks"][i]["status"], "pending", "{report}");
    }
    assert_eq!(report["run"]["status"], "over budget", "{report}");
    assert_eq!(report["spend"]["tokens"], 2275, "{report}");
    let status = s.run(&["status"]);
    assert!(text(&status).contains("over budget"), "{}", text(&status));
}

#[test]
fn a_dollar_budget_needs_a_price() {
    let standin = Standin::start(Options::default()).unwrap();
    let s = Scratch::new();
    let out = run_with_budget(&s, &standin, "{ task = \"$0.50\" }", "- anything\n");
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("[agent] price"), "{}", text(&out));
    assert!(standin.records().is_empty(), "nothing may start");
}

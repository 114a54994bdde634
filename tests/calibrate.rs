//! `--calibrate`: task 1 runs alone first; the run fans out only once it merges. With the
//! rules planner a failing task 1 stops the run; with the model planner the model revises the
//! template from task 1's log (the stand-in, over real HTTP), and task 1 runs once more.

mod support;
use cohort_standin::{Options, Standin};
use support::*;

#[test]
fn with_the_rules_planner_a_failing_first_task_stops_the_fan_out() {
    let s = Scratch::new();
    let mark = s.tmp.path().join("mark");
    std::fs::create_dir(&mark).unwrap();
    std::fs::write(mark.join("broken"), "").unwrap();
    let req = s.request("req.md", "- one\n- two\n- three\n");
    let a = agent("fail-while-marked.sh");
    let out = s
        .cohort()
        .args([
            "run",
            req.to_str().unwrap(),
            "--no-sync",
            "--runtime",
            "host",
            "--calibrate",
        ])
        .args(["--agent", "command", "--agent-command", &a, "-j", "3"])
        .env("COHORT_TEST_MARK", &mark)
        .output()
        .unwrap();
    assert_eq!(code(&out), 1, "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("calibration: task 1 ended failed"), "{said}");
    assert!(said.contains("something is broken"), "task 1's log is shown: {said}");
    let r = s.status_json();
    assert_eq!(r["run"]["status"], "calibration failed");
    let status: Vec<_> = r["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].clone())
        .collect();
    assert_eq!(status, ["failed", "pending", "pending"]);
    assert!(r["tasks"][1]["started_at"].is_null(), "task 2 never started");
}

#[test]
fn with_the_model_planner_the_template_is_revised_from_task_1s_log() {
    let standin = Standin::start(Options::default()).unwrap();
    let s = Scratch::new();
    let req = s.request("req.md", "- one\n- two\n- three\n");
    let a = agent("calibrated.sh");
    let out = s
        .cohort()
        .args([
            "run",
            req.to_str().unwrap(),
            "--no-sync",
            "--runtime",
            "host",
            "--calibrate",
        ])
        .args(["--planner", "llm", "--planner-base-url", &standin.base_url()])
        .args(["--agent", "command", "--agent-command", &a, "-j", "3"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    let r = s.status_json();
    let tasks = r["tasks"].as_array().unwrap();
    assert!(tasks.iter().all(|t| t["status"] == "merged"), "{tasks:?}");
    assert_eq!(tasks[0]["attempts"], 2, "task 1 ran twice");
    assert_eq!(
        tasks[1]["attempts"], 1,
        "the others ran once, with the revised template"
    );
    // The revision request carried task 1's log, and the template is kept and shown.
    let records = standin.records();
    let chats: Vec<_> = records.iter().filter(|r| r["path"] == "/v1/chat/completions").collect();
    assert_eq!(chats.len(), 2, "the plan, then the revision");
    assert!(chats[1]["body"].to_string().contains("the prompt does not say how"));
    let run_dir = s.work.join(".git/cohort/runs").join(r["run"]["id"].as_str().unwrap());
    let revised = std::fs::read_to_string(run_dir.join("prompt.revised.txt")).unwrap();
    assert_eq!(revised, "REVISED prompt.\nDo this: {task}");
    assert_eq!(r["calibration"]["after"], revised.as_str());
    let report = text(&s.run(&["report"]));
    assert!(
        report.contains("+ REVISED prompt.") && report.contains("- Task: {task}"),
        "{report}"
    );
}

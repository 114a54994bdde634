//! Tests of the model-backed planner against the local stand-in (real HTTP).
use super::*;
use cohort_standin::{Mode, Options, Standin};
use serde_json::Value;
use std::time::Instant;

const KEY: &str = "sk-test-planner-0123456789";

fn planner(s: &Standin) -> LlmPlanner {
    let mut p = LlmPlanner::new("gpt-5-nano");
    p.base_url = Some(s.base_url());
    p.key = Some(Secret::new(KEY));
    p.request_timeout = Duration::from_secs(10);
    p.total_timeout = Duration::from_secs(30);
    p
}

fn start(opts: Options) -> Standin {
    Standin::start(opts).expect("start the stand-in")
}

const DOC: &str = "# Backlog\nShip the first version.\n\n- [ ] Add a README\n- [x] Set up CI\n- Fix the login bug\n";

#[tokio::test]
async fn good_answer_with_structured_output_and_bearer_key_only() {
    let s = start(Options::default());
    let plan = planner(&s).plan(DOC).await.unwrap();
    assert_eq!(plan.tasks, vec!["Add a README", "Fix the login bug"]);
    assert!(plan.template.contains("{task}"));
    let r = s.records();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["path"], "/v1/chat/completions");
    assert_eq!(r[0]["headers"]["authorization"], format!("Bearer {KEY}"));
    let body = &r[0]["body"];
    assert_eq!(body["model"], "gpt-5-nano");
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(body["response_format"]["json_schema"]["schema"], plan_schema());
    assert_eq!(body["messages"][1]["content"], DOC.trim_end());
    // The key is in the bearer header and nowhere else.
    let mut rest = r[0].clone();
    rest["headers"].as_object_mut().unwrap().remove("authorization");
    assert!(!rest.to_string().contains(KEY));
}

#[tokio::test]
async fn plain_content_fallback_without_response_format() {
    let s = start(Options::default());
    let mut p = planner(&s);
    p.structured_output = false;
    let plan = p.plan(DOC).await.unwrap();
    assert_eq!(plan.tasks.len(), 2);
    assert!(s.records()[0]["body"].get("response_format").is_none());
}

#[tokio::test]
async fn rate_limit_is_retried_after_retry_after() {
    let s = start(Options {
        mode: Mode::RateLimit,
        times: Some(1),
        retry_after: 1,
        ..Default::default()
    });
    let t = Instant::now();
    let plan = planner(&s).plan(DOC).await.unwrap();
    assert_eq!(plan.tasks.len(), 2);
    assert!(t.elapsed() >= Duration::from_secs(1), "Retry-After not honoured");
    let statuses: Vec<Value> = s.records().iter().map(|r| r["status"].clone()).collect();
    assert_eq!(statuses, vec![429, 200]);
}

#[tokio::test]
async fn server_error_is_retried() {
    let s = start(Options {
        mode: Mode::ServerError,
        times: Some(2),
        ..Default::default()
    });
    planner(&s).plan(DOC).await.unwrap();
    assert_eq!(s.records().len(), 3);
}

#[tokio::test]
async fn persistent_rate_limit_fails_with_a_hint_and_no_key() {
    let s = start(Options {
        mode: Mode::RateLimit,
        retry_after: 0,
        ..Default::default()
    });
    let e = planner(&s).plan(DOC).await.unwrap_err().to_string();
    assert!(e.contains("HTTP 429") && e.contains("rate limited"), "{e}");
    assert!(!e.contains(KEY));
    assert_eq!(s.records().len(), 4, "one try and async-openai's 3 retries");
}

#[tokio::test]
async fn malformed_content_then_valid_is_retried_with_the_error() {
    let s = start(Options::default());
    let doc = format!("{DOC}STANDIN:malformed=1\n");
    let plan = planner(&s).plan(&doc).await.unwrap();
    assert_eq!(plan.tasks, vec!["Add a README", "Fix the login bug"]);
    let r = s.records();
    assert_eq!(r.len(), 2);
    let msgs = r[1]["body"]["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 4, "system, document, bad answer, feedback");
    assert_eq!(msgs[2]["role"], "assistant");
    assert!(msgs[3]["content"].as_str().unwrap().contains("rejected"));
}

#[tokio::test]
async fn malformed_body_then_valid() {
    let s = start(Options {
        mode: Mode::MalformedBody,
        times: Some(1),
        ..Default::default()
    });
    planner(&s).plan(DOC).await.unwrap();
    assert_eq!(s.records().len(), 2);
}

#[tokio::test]
async fn invalid_plan_then_valid_feeds_back_the_error() {
    let s = start(Options::default());
    let doc = format!("{DOC}STANDIN:invalid-plan=1\n");
    let plan = planner(&s).plan(&doc).await.unwrap();
    assert!(plan.template.contains("{task}"));
    let r = s.records();
    assert_eq!(r.len(), 2);
    let feedback = r[1]["body"]["messages"][3]["content"].as_str().unwrap().to_string();
    assert!(feedback.contains("placeholder"), "{feedback}");
}

#[tokio::test]
async fn invalid_plan_twice_is_an_error() {
    let s = start(Options {
        mode: Mode::InvalidPlan,
        ..Default::default()
    });
    let e = planner(&s).plan(DOC).await.unwrap_err();
    assert!(matches!(e, PlanError::Model(_)));
    assert!(e.to_string().contains("still invalid after one retry"), "{e}");
    assert!(e.to_string().contains("{task}"), "{e}");
    assert_eq!(s.records().len(), 2);
}

#[tokio::test]
async fn request_and_total_timeouts() {
    let s = start(Options {
        mode: Mode::Slow,
        delay: Duration::from_secs(3),
        ..Default::default()
    });
    let mut p = planner(&s);
    p.request_timeout = Duration::from_millis(300);
    let t = Instant::now();
    let e = p.plan(DOC).await.unwrap_err().to_string();
    assert!(e.contains("request timeout"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
    p.request_timeout = Duration::from_secs(10);
    p.total_timeout = Duration::from_millis(400);
    let e = p.plan(DOC).await.unwrap_err().to_string();
    assert!(e.contains("total timeout"), "{e}");
}

#[tokio::test]
async fn wrong_model_and_unreachable_server_say_what_to_fix() {
    let s = start(Options {
        models: Some(vec!["gpt-5-nano".into()]),
        ..Default::default()
    });
    let mut p = planner(&s);
    p.model = "gpt-nope".into();
    let e = p.plan(DOC).await.unwrap_err().to_string();
    assert!(e.contains("HTTP 404") && e.contains("check the model name"), "{e}");
    let closed = s.addr();
    drop(s);
    p.base_url = Some(format!("http://{closed}/v1"));
    let e = p.plan(DOC).await.unwrap_err().to_string();
    assert!(e.contains("cannot connect"), "{e}");
}

#[tokio::test]
async fn long_documents_are_chunked_and_merged_in_order() {
    let s = start(Options::default());
    let mut doc = String::from("# Big backlog\n\n");
    let mut expected = Vec::new();
    for para in 0..6 {
        for i in 0..5 {
            let t = format!("Task {para}-{i}: change module {para} part {i}");
            doc.push_str(&format!("- {t}\n"));
            expected.push(t);
        }
        doc.push('\n');
    }
    doc.push_str("- task 0-0: change module 0 part 0.\n"); // a repeat, differently cased
    let mut p = planner(&s);
    p.chunk_chars = 400;
    let plan = p.plan(&doc).await.unwrap();
    assert_eq!(plan.tasks, expected);
    let r = s.records();
    assert!(r.len() >= 3, "expected several chunks, got {} requests", r.len());
    let system = r[1]["body"]["messages"][0]["content"].as_str().unwrap();
    assert!(system.contains(&format!("part 2 of {}", r.len())), "{system}");
}

#[test]
fn parse_plan_accepts_bare_fenced_and_embedded_json() {
    let bare = r#"{"tasks": [" a "], "template": "do {task}"}"#;
    assert_eq!(parse_plan(bare).unwrap().tasks, vec!["a"]);
    let fenced = format!("Sure.\n```json\n{bare}\n```\nBye");
    assert_eq!(parse_plan(&fenced).unwrap().template, "do {task}");
    let embedded = format!("Plan: {bare} -- end");
    assert!(parse_plan(&embedded).is_ok());
    assert!(parse_plan(r#"{"tasks": ["a"#)
        .unwrap_err()
        .contains("not the JSON object"));
    assert!(parse_plan("  ").is_err());
}

#[test]
fn check_rejects_what_validate_rejects() {
    let p = |tasks: &[&str], t: &str| Plan {
        tasks: tasks.iter().map(|s| s.to_string()).collect(),
        template: t.into(),
    };
    assert!(check(p(&["a\nb"], "{task}"), false)
        .unwrap_err()
        .contains("single line"));
    assert!(check(p(&[], "{task}"), false).is_err());
    assert!(check(p(&[], "{task}"), true).is_ok());
    assert!(check(p(&["a"], "no placeholder"), true).is_err());
}

#[test]
fn chunks_keep_order_and_never_split_lines() {
    let doc = "aaaa\nbbbb\n\ncccc\n\n\ndddddddddddd\n";
    assert_eq!(chunks(doc, 100), vec!["aaaa\nbbbb\n\ncccc\n\ndddddddddddd"]);
    assert_eq!(chunks(doc, 10), vec!["aaaa\nbbbb", "cccc", "dddddddddddd"]);
    assert_eq!(chunks(doc, 4), vec!["aaaa", "bbbb", "cccc", "dddddddddddd"]);
    assert!(chunks(" \n\n \n", 10).is_empty());
}

#[test]
fn merge_drops_repeats_and_keeps_the_first_template() {
    let a = Plan {
        tasks: vec!["Fix  it".into(), "Add x".into()],
        template: "one {task}".into(),
    };
    let b = Plan {
        tasks: vec!["fix it.".into(), "Add y".into()],
        template: "two {task}".into(),
    };
    let m = merge(vec![a, b]);
    assert_eq!(m.tasks, vec!["Fix  it", "Add x", "Add y"]);
    assert_eq!(m.template, "one {task}");
}

#[tokio::test]
async fn openai_without_a_key_fails_before_any_request() {
    let e = LlmPlanner::new("gpt-5-nano").plan(DOC).await.unwrap_err().to_string();
    assert!(e.contains("OPENAI_API_KEY"), "{e}");
}

#[test]
fn the_key_never_prints() {
    let mut p = LlmPlanner::new("m");
    p.key = Some(Secret::new(KEY));
    assert!(!format!("{p:?}").contains(KEY));
    assert_eq!(p.scrub(format!("bad key {KEY}!")), "bad key ***!");
}

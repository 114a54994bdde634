//! The stand-in over a real socket, spoken to with plain HTTP/1.1 by hand so
//! these checks do not depend on any client library.

use std::io::{Read, Write};
use std::net::TcpStream;

use cohort_standin::{Mode, Options, Standin};
use serde_json::{json, Value};

/// Sends one request with `Connection: close` and returns (status, head, body).
fn send(s: &Standin, method: &str, path: &str, body: &Value) -> (u16, String, String) {
    let mut c = TcpStream::connect(s.addr()).unwrap();
    let b = body.to_string();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-wire\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        b.len()
    );
    c.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head.to_lowercase(), body.to_string())
}

fn user(text: &str) -> Value {
    json!({"model": "gpt-5-nano", "messages": [{"role": "system", "content": "plan"}, {"role": "user", "content": text}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "plan", "schema": {}}}})
}

#[test]
fn chat_plans_from_list_items_and_records_the_request() {
    let s = Standin::start(Options::default()).unwrap();
    let (status, _, body) = send(&s, "POST", "/v1/chat/completions", &user("# T\n- one\n- two\n"));
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let plan: Value = serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(plan["tasks"], json!(["one", "two"]));
    assert!(plan["template"].as_str().unwrap().contains("{task}"));
    let r = s.records();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["headers"]["authorization"], "Bearer sk-test-wire");
    assert_eq!(r[0]["body"]["messages"][1]["content"], "# T\n- one\n- two\n");
}

#[test]
fn rate_limit_first_then_normal() {
    let s = Standin::start(Options {
        mode: Mode::RateLimit,
        times: Some(1),
        retry_after: 2,
        ..Options::default()
    })
    .unwrap();
    let (status, head, _) = send(&s, "POST", "/v1/chat/completions", &user("- a"));
    assert_eq!(status, 429);
    assert!(head.contains("retry-after: 2"), "{head}");
    let (status, _, _) = send(&s, "POST", "/v1/chat/completions", &user("- a"));
    assert_eq!(status, 200);
}

#[test]
fn invalid_plan_marker_counts_per_document() {
    let s = Standin::start(Options::default()).unwrap();
    let doc = "- a\nSTANDIN:invalid-plan=1";
    let content = |b: &str| -> Value {
        let v: Value = serde_json::from_str(b).unwrap();
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap()
    };
    let first = content(&send(&s, "POST", "/v1/chat/completions", &user(doc)).2);
    assert!(!first["template"].as_str().unwrap().contains("{task}"));
    let second = content(&send(&s, "POST", "/v1/chat/completions", &user(doc)).2);
    assert!(second["template"].as_str().unwrap().contains("{task}"));
    assert_eq!(second["tasks"], json!(["a"]));
}

#[test]
fn responses_stream_a_tool_call_then_a_final_message() {
    let s = Standin::start(Options::default()).unwrap();
    let msg = |t: &str| json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": t}]});
    let first = json!({"model": "m", "stream": true, "input": [msg("Task: add x")]});
    let (status, head, body) = send(&s, "POST", "/v1/responses", &first);
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/event-stream"));
    let events: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.first(), Some(&"response.created"));
    assert_eq!(types.last(), Some(&"response.completed"));
    let call = events
        .iter()
        .find(|e| e["type"] == "response.output_item.done")
        .unwrap()["item"]
        .clone();
    assert_eq!(call["name"], "exec_command");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(args["cmd"].as_str().unwrap().contains("task-add-x-"));

    let output = json!({"type": "function_call_output", "call_id": call["call_id"], "output": "ok"});
    let second = json!({"model": "m", "stream": true, "input": [msg("Task: add x"), call, output]});
    let (_, _, body) = send(&s, "POST", "/v1/responses", &second);
    assert!(body.contains("\"type\":\"output_text\""), "{body}");
    assert!(body.contains("response.completed"));
    assert_eq!(s.records()[1]["usage"], cohort_standin::usage_final());
}

#[test]
fn unknown_model_is_404_when_models_are_listed() {
    let s = Standin::start(Options {
        models: Some(vec!["gpt-5-nano".into()]),
        ..Options::default()
    })
    .unwrap();
    let mut body = user("- a");
    body["model"] = json!("nope");
    assert_eq!(send(&s, "POST", "/v1/chat/completions", &body).0, 404);
    let (status, _, list) = send(&s, "GET", "/v1/models", &json!({}));
    assert_eq!(status, 200);
    assert!(list.contains("\"id\":\"gpt-5-nano\""));
}

#[test]
fn chat_streams_when_asked() {
    let s = Standin::start(Options::default()).unwrap();
    let mut body = user("- one\n- two");
    body["stream"] = json!(true);
    let (status, head, text) = send(&s, "POST", "/v1/chat/completions", &body);
    assert_eq!(status, 200);
    assert!(head.contains("text/event-stream"));
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let content: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(String::from))
        .collect();
    let plan: Value = serde_json::from_str(&content).unwrap();
    assert_eq!(plan["tasks"], json!(["one", "two"]));
}

#[test]
fn large_streams_many_text_deltas_then_completes() {
    let s = Standin::start(Options::default()).unwrap();
    let body = json!({"model": "gpt-5-codex", "stream": true, "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go STANDIN:large=64"}]}]});
    let (status, _, text) = send(&s, "POST", "/v1/responses", &body);
    assert_eq!(status, 200);
    let deltas = text.matches("event: response.output_text.delta").count();
    assert_eq!(deltas, 64);
    assert!(text.len() > 64 * 1024, "{}", text.len());
    assert!(text.contains("response.completed"));
    assert_eq!(s.records()[0]["mode"], "large");
}

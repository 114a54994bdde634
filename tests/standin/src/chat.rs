//! `POST /v1/chat/completions`: the planner's endpoint.
//!
//! The answer is a plan `{tasks, template}` built from the document, which is
//! the first user message: its list items if it has any, else its non-empty
//! lines (headings, code fences and `STANDIN` marker lines skipped). With
//! `response_format` `json_schema`/`json_object` the content is bare JSON;
//! without it the JSON sits in a fenced block inside prose, the way servers that
//! ignore the schema answer, so clients' fallback parsing gets exercised.

use std::time::Duration;

use hyper::body::Bytes;
use hyper::StatusCode;
use serde_json::{json, Value};

use crate::modes::{Chosen, Mode};
use crate::{content_texts, error_response, json_response, Outcome};

pub const TEMPLATE: &str = "You are working in a git repository.\nTask: {task}\nMake the change and keep it small.";
pub const INVALID_TEMPLATE: &str = "You are working in a git repository. Do the task.";

pub fn texts(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for m in body.get("messages").and_then(Value::as_array).into_iter().flatten() {
        if let Some(c) = m.get("content") {
            content_texts(c, &mut out);
        }
    }
    out
}

fn document(body: &Value) -> String {
    for m in body.get("messages").and_then(Value::as_array).into_iter().flatten() {
        if m.get("role").and_then(Value::as_str) == Some("user") {
            let mut parts = Vec::new();
            if let Some(c) = m.get("content") {
                content_texts(c, &mut parts);
            }
            return parts.join("\n");
        }
    }
    String::new()
}

/// The task list a sensible planner would produce for `doc`.
pub fn tasks_from(doc: &str) -> Vec<String> {
    let mut in_fence = false;
    let mut lines = Vec::new();
    let mut items = Vec::new();
    for raw in doc.lines() {
        let l = raw.trim();
        if l.starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence || l.is_empty() || l.starts_with('#') || l.contains("STANDIN:") {
            continue;
        }
        if let Some(item) = list_item(l) {
            let item = item.trim();
            if item.starts_with("[x]") || item.starts_with("[X]") {
                continue; // done already
            }
            let item = item.strip_prefix("[ ]").unwrap_or(item).trim();
            if !item.is_empty() {
                items.push(item.to_string());
            }
        } else {
            lines.push(l.to_string());
        }
    }
    if items.is_empty() {
        lines
    } else {
        items
    }
}

fn list_item(l: &str) -> Option<&str> {
    for p in ["- ", "* ", "+ "] {
        if let Some(rest) = l.strip_prefix(p) {
            return Some(rest);
        }
    }
    let digits = l.chars().take_while(char::is_ascii_digit).count();
    if digits > 0 {
        let rest = &l[digits..];
        return rest.strip_prefix(". ").or_else(|| rest.strip_prefix(") "));
    }
    None
}

pub async fn answer(body: &Value, chosen: Chosen) -> Outcome {
    let model = body.get("model").and_then(Value::as_str).unwrap_or("").to_string();
    if chosen.mode == Mode::Fail {
        let r = error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "scripted failure from the stand-in",
        );
        return Outcome {
            response: r,
            mode: chosen.mode.name(),
            usage: None,
        };
    }
    let doc = document(body);
    // A `STANDIN-TEMPLATE: <text>` line in the document (`\n` for new lines) is the template
    // a model would propose after reading it, e.g. in a log it was asked to learn from.
    let proposed = doc.lines().rev().find_map(|l| {
        let at = l.find("STANDIN-TEMPLATE:")?;
        Some(l[at + "STANDIN-TEMPLATE:".len()..].trim().replace("\\n", "\n"))
    });
    let template = if chosen.mode == Mode::InvalidPlan {
        INVALID_TEMPLATE.to_string()
    } else {
        proposed.unwrap_or_else(|| TEMPLATE.to_string())
    };
    let plan = json!({"tasks": tasks_from(&doc), "template": template}).to_string();
    let format = body
        .pointer("/response_format/type")
        .and_then(Value::as_str)
        .unwrap_or("text");
    let content = if chosen.mode == Mode::Malformed {
        // Valid HTTP, broken plan: the JSON is cut off half way.
        plan[..plan.len() / 2].to_string()
    } else if format == "json_schema" || format == "json_object" {
        plan
    } else {
        format!("Here is the plan.\n\n```json\n{plan}\n```\n")
    };
    let prompt_tokens = (body.to_string().len() / 4) as u64;
    let completion_tokens = (content.len() / 4) as u64;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens});
    let id = format!("chatcmpl-standin-{}", crate::modes::fnv1a(doc.as_bytes()) as u32);

    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        let delay = if chosen.mode == Mode::Slow {
            chosen.delay
        } else {
            Duration::ZERO
        };
        let chunk = |delta: Value, finish: Value, usage: Value| {
            let v = json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": usage});
            Bytes::from(format!("data: {v}\n\n"))
        };
        let events = vec![
            chunk(json!({"role": "assistant", "content": ""}), Value::Null, Value::Null),
            chunk(json!({"content": content}), Value::Null, Value::Null),
            chunk(json!({}), json!("stop"), usage.clone()),
            Bytes::from("data: [DONE]\n\n"),
        ];
        let r = crate::responses::stream(events, delay);
        return Outcome {
            response: r,
            mode: chosen.mode.name(),
            usage: Some(usage),
        };
    }
    let v = json!({
        "id": id, "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null},
            "finish_reason": "stop", "logprobs": null}],
        "usage": usage,
    });
    Outcome {
        response: json_response(StatusCode::OK, &v),
        mode: chosen.mode.name(),
        usage: Some(usage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_prefer_list_items() {
        let doc =
            "# Backlog\nSome intro.\n- [ ] Add a README\n- [x] Done already\n2. Fix the bug\n```\n- not this\n```\n";
        assert_eq!(tasks_from(doc), vec!["Add a README", "Fix the bug"]);
        assert_eq!(
            tasks_from("first\n\nsecond STANDIN:fail\nthird"),
            vec!["first", "third"]
        );
    }
}

//! `POST /v1/responses`: the Responses API as Server-Sent Events, the way the
//! Codex CLI (0.169.0) reads it.
//!
//! The scripted "edit" turn is two requests: the first is answered with a
//! `function_call` to `exec_command` whose `cmd` edits the checkout; codex runs
//! it and sends a second request carrying the `function_call_output`, which is
//! answered with a final assistant message (no tool call, so the turn ends).

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::channel::Channel;
use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use crate::modes::{fnv1a, Chosen, Mode};
use crate::{content_texts, Outcome};

/// Prefix of the call ids we hand out, to recognise our own tool outputs.
const CALL_PREFIX: &str = "call_standin_";

/// Usage reported by the tool-call response and by the final response. Fixed
/// so tests can state what a turn costs: codex adds both into `turn.completed`.
pub fn usage_tool_call() -> Value {
    usage(1000, 200, 50, 10)
}
pub fn usage_final() -> Value {
    usage(1200, 1000, 25, 0)
}

fn usage(input: u64, cached: u64, output: u64, reasoning: u64) -> Value {
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input + output,
    })
}

/// The texts of every message in `input`, for marker lookup.
pub fn texts(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(items) = body.get("input").and_then(Value::as_array) {
        for item in items {
            if item.get("type").and_then(Value::as_str).unwrap_or("message") == "message" {
                if let Some(c) = item.get("content") {
                    content_texts(c, &mut out);
                }
            }
        }
    } else if let Some(s) = body.get("input").and_then(Value::as_str) {
        out.push(s.to_string());
    }
    out
}

/// The task prompts of the conversation, oldest first, with their positions in `input`:
/// every user message that is not one of codex's own context blocks (environment context,
/// AGENTS.md instructions). A resumed conversation (`codex exec resume`) has more than one.
pub fn prompts(body: &Value) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    if let Some(s) = body.get("input").and_then(Value::as_str) {
        return vec![(0, s.to_string())];
    }
    for (i, item) in body
        .get("input")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let is_msg = item.get("type").and_then(Value::as_str).unwrap_or("message") == "message";
        if !is_msg || item.get("role").and_then(Value::as_str) != Some("user") {
            continue;
        }
        let mut parts = Vec::new();
        if let Some(c) = item.get("content") {
            content_texts(c, &mut parts);
        }
        let text = parts.join("\n");
        let t = text.trim_start();
        if t.starts_with("<environment_context>")
            || t.starts_with("<user_instructions>")
            || t.starts_with("# AGENTS.md")
        {
            continue;
        }
        found.push((i, text));
    }
    found
}

/// The task prompt: the last of [`prompts`].
pub fn prompt(body: &Value) -> String {
    prompts(body).pop().map(|(_, p)| p).unwrap_or_default()
}

/// In a resumed conversation, the first prompt's `STANDIN-FIX: <shell>` lines: what a model
/// that remembers the task does once told that its first try failed.
pub fn fix_command(body: &Value) -> Option<String> {
    let all = prompts(body);
    if all.len() < 2 {
        return None;
    }
    let fixes: Vec<&str> = all[0]
        .1
        .lines()
        .filter_map(|l| l.trim().strip_prefix("STANDIN-FIX:"))
        .map(str::trim)
        .collect();
    (!fixes.is_empty()).then(|| fixes.join(" && "))
}

/// The shell command that performs the scripted edit for `prompt`, and a short
/// description of it for the final message.
pub fn edit_command(prompt: &str) -> (String, String) {
    // A multi-line script (e.g. an `apply_patch` heredoc): every line after
    // `STANDIN-SCRIPT:` up to `STANDIN-END` or the end of the prompt.
    if let Some(at) = prompt.find("STANDIN-SCRIPT:") {
        let rest = prompt[at + "STANDIN-SCRIPT:".len()..].trim_start_matches([' ', '\t']);
        let rest = rest.strip_prefix('\n').unwrap_or(rest);
        let script = rest.split("STANDIN-END").next().unwrap_or("").trim_end();
        return (script.to_string(), "ran the scripted command".to_string());
    }
    let cmds: Vec<&str> = prompt
        .lines()
        .filter_map(|l| l.trim().strip_prefix("STANDIN-CMD:"))
        .map(str::trim)
        .collect();
    if !cmds.is_empty() {
        return (cmds.join(" && "), "ran the scripted command".to_string());
    }
    let first = prompt.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("task");
    let name = format!("{}-{:08x}.txt", slug(first, 40), fnv1a(prompt.as_bytes()) as u32);
    let cmd = format!("printf '%s\\n' {} > {}", shell_quote(prompt.trim()), name);
    (cmd, format!("wrote {name}"))
}

/// Lowercase ASCII letters and digits, runs of anything else as one `-`.
pub fn slug(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
        if out.len() >= max {
            break;
        }
    }
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "task".to_string()
    } else {
        out
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// One SSE event: `event:` names it, `data:` carries the JSON with its `type`.
fn sse(v: &Value) -> Bytes {
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("message");
    Bytes::from(format!("event: {kind}\ndata: {v}\n\n"))
}

pub fn answer(body: &Value, chosen: Chosen) -> Outcome {
    let model = body.get("model").and_then(Value::as_str).unwrap_or("").to_string();
    let n = body.get("input").map(|v| v.to_string().len()).unwrap_or(0);
    let id = format!("resp_standin_{:08x}", fnv1a(format!("{n}{}", body).as_bytes()) as u32);
    let prompt = prompt(body);
    let (cmd, what) = match fix_command(body) {
        Some(fix) => (fix, "fixed what the check found".to_string()),
        None => edit_command(&prompt),
    };
    // Only this turn's tool outputs count: those after the latest prompt (a resumed
    // conversation carries the earlier turns' too).
    let turn_start = prompts(body).last().map(|(i, _)| *i).unwrap_or(0);
    let outputs: Vec<&Value> = body
        .get("input")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .skip(turn_start)
        .filter(|i| i.get("type").and_then(Value::as_str) == Some("function_call_output"))
        .filter(|i| {
            i.get("call_id")
                .and_then(Value::as_str)
                .is_some_and(|c| c.starts_with(CALL_PREFIX))
        })
        .collect();

    let created = json!({"type": "response.created", "response": {"id": id, "object": "response", "status": "in_progress", "model": model}});
    let mut events: Vec<Bytes> = vec![sse(&created)];
    let mut usage_out = None;
    match chosen.mode {
        Mode::Fail => {
            events.push(sse(&json!({"type": "response.failed", "response": {
                "id": id, "object": "response", "status": "failed", "model": model,
                "error": {"code": "server_error", "message": "scripted failure from the stand-in"}}})));
        }
        Mode::Large => {
            // Many small events, as a long answer streams: `deltas` KiB of text in all.
            let msg_id = format!("msg_{id}");
            let text: String = "All work and no play. ".repeat(47)[..1024].to_string();
            let delta = sse(&json!({"type": "response.output_text.delta", "item_id": msg_id,
                "output_index": 0, "content_index": 0, "delta": text}));
            events.extend(std::iter::repeat_n(delta, chosen.deltas as usize));
            let item = json!({"type": "message", "id": msg_id, "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": format!("({} KiB of text)", chosen.deltas), "annotations": []}]});
            events.push(sse(
                &json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
            ));
            let u = usage_final();
            events.push(completed(&id, &model, &u));
            usage_out = Some(u);
        }
        Mode::Malformed => {
            // Not JSON: a truncated object, then the stream just ends.
            events.push(Bytes::from(
                "event: response.output_item.done\ndata: {\"type\":\"response.output_item.done\",\"item\":{\n\n",
            ));
        }
        _ if outputs.is_empty() => {
            let call_id = format!("{CALL_PREFIX}{:08x}", fnv1a(prompt.as_bytes()) as u32);
            let args = json!({"cmd": cmd}).to_string();
            let item = json!({"type": "function_call", "id": format!("fc_{call_id}"), "call_id": call_id,
                "name": "exec_command", "arguments": args, "status": "completed"});
            events.push(sse(
                &json!({"type": "response.output_item.added", "output_index": 0, "item": item}),
            ));
            events.push(sse(
                &json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
            ));
            let u = usage_tool_call();
            events.push(completed(&id, &model, &u));
            usage_out = Some(u);
        }
        _ => {
            let text = format!("Done: {what}.");
            let msg_id = format!("msg_{id}");
            let empty =
                json!({"type": "message", "id": msg_id, "role": "assistant", "status": "in_progress", "content": []});
            events.push(sse(
                &json!({"type": "response.output_item.added", "output_index": 0, "item": empty}),
            ));
            events.push(sse(
                &json!({"type": "response.output_text.delta", "item_id": msg_id, "output_index": 0,
                "content_index": 0, "delta": text}),
            ));
            let item = json!({"type": "message", "id": msg_id, "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]});
            events.push(sse(
                &json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
            ));
            let u = usage_final();
            events.push(completed(&id, &model, &u));
            usage_out = Some(u);
        }
    }
    let delay = if chosen.mode == Mode::Slow {
        chosen.delay
    } else {
        Duration::ZERO
    };
    Outcome {
        response: stream(events, delay),
        mode: chosen.mode.name(),
        usage: usage_out,
    }
}

fn completed(id: &str, model: &str, usage: &Value) -> Bytes {
    sse(
        &json!({"type": "response.completed", "response": {"id": id, "object": "response",
        "status": "completed", "model": model, "usage": usage}}),
    )
}

/// Sends `events` one by one over a chunked body, `delay` apart, then closes.
pub fn stream(events: Vec<Bytes>, delay: Duration) -> Response<crate::Body> {
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(4);
    tokio::spawn(async move {
        for (i, e) in events.into_iter().enumerate() {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx.send_data(e).await.is_err() {
                return; // the client went away
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body.boxed())
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_command_is_derived_from_the_prompt() {
        let (cmd, what) = edit_command("Task: Add a README\nBe brief, it's fine.");
        assert!(what.starts_with("wrote task-add-a-readme-"), "{what}");
        assert!(cmd.starts_with("printf '%s\\n' 'Task: Add a README\nBe brief, it'\\''s fine.' > task-add-a-readme-"));
        let (cmd, _) = edit_command("do it\nSTANDIN-CMD: echo hi > a.txt\n");
        assert_eq!(cmd, "echo hi > a.txt");
        let (cmd, _) = edit_command("do it\nSTANDIN-SCRIPT:\ncat > a <<'EOF'\nx\nEOF\nSTANDIN-END\nignored");
        assert_eq!(cmd, "cat > a <<'EOF'\nx\nEOF");
    }

    #[test]
    fn prompt_skips_codex_context_messages() {
        let body = json!({"input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Fix the bug"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context>x</environment_context>"}]},
        ]});
        assert_eq!(prompt(&body), "Fix the bug");
    }
}
